"""Plain data records shared by indexing, retrieval, training and serving.

They are frozen dataclasses so no flag can change what a function returns (pyserini's
``DenseSearchResult``) and so they cross Ray process boundaries as cheap, predictable values.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Passage:
    """A retrieval unit: at most ``max_words`` words cut from one document (the paper uses 100)."""

    passage_id: str
    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class Hit:
    """One retrieved passage with its inner-product score q·d."""

    passage_id: str
    doc_id: str
    title: str
    text: str
    score: float


@dataclass(frozen=True)
class SearchResult:
    """Top-k for a batch of queries.

    ``hits[i]`` is the ranked list for query i (FAISS ``-1`` padding dropped, so it can be shorter
    than k when the index holds fewer passages); ``vectors[i, j]`` is the stored vector of
    ``hits[i][j]`` as float32 (zeros where a row is padded), which RAG training needs to recompute
    doc scores in torch so that the gradient reaches the query encoder.
    """

    hits: list[list[Hit]]
    vectors: np.ndarray  # [B, k, D] float32

    def __len__(self) -> int:
        return len(self.hits)
