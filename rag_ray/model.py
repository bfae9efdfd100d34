"""RAG: a query encoder and a seq2seq generator joined by the retrieval posterior p(z|x).

Retrieval results come in as plain data (passages with ``.title``/``.text`` and their stored
vectors ``[B, K, D]``), so this module runs without Ray and without an index. The question is
re-embedded here and ``doc_scores = q·d`` recomputed in torch (as transformers' ``RagModel``
does), so the loss trains the query encoder while the passage vectors stay fixed. p(z|x) is
``softmax(scale · q·d)`` with a learned scale: normalised encoders make q·d a cosine in [-1, 1],
over which a plain softmax is nearly uniform. The formulas
live in ``losses.py`` and the search algorithms in ``decoding.py``; this module validates input,
holds the components and saves/loads them.

Shapes: B questions, K passages per question, D vector size, L source tokens, T target tokens,
V vocabulary. Generator inputs are flattened question-major to ``[B*K, ...]``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rag_ray.decoding import (
    Answer,
    decode_closed_book,
    decode_sequence_fast,
    decode_sequence_thorough,
    decode_token,
    rag_token_search,
)
from rag_ray.encoders import DEFAULT_ENCODER, Encoder, default_device
from rag_ray.errors import RagRayError
from rag_ray.generator import Generator, PassageLike
from rag_ray.io import atomic_dir
from rag_ray.losses import LossOutput, per_doc_log_likelihood, rag_sequence_nll, rag_token_nll
from rag_ray.reranker import Reranker
from rag_ray.types import Mode

_CONFIG_FILE = "rag_config.json"
_SCALE_FILE = "doc_score_scale.safetensors"
_RERANKER_DIR = "reranker"
_FORMAT = "rag_ray.RagModel"


@dataclass(frozen=True)
class RagConfig:
    """Defaults of the RAG model; every one can be overridden per call. ``mode`` may be given
    as its string and is stored as a ``Mode``."""

    mode: Mode = Mode.SEQUENCE
    n_docs: int = 5
    label_smoothing: float = 0.0
    num_beams: int = 4
    max_new_tokens: int = 20
    dedup: bool = True
    #: p(z|x) = softmax(doc_score_scale · q·d); the scale a new model starts from (a saved model
    #: keeps its learned value). 20 rather than 1: q·d of normalised vectors is a cosine, and at
    #: scale 1 the prior over K passages is nearly uniform (measured on squad-open dev: the
    #: reader's EM 19 -> 21, F1 24.5 -> 30.2 at scale 20).
    doc_score_scale: float = 20.0
    #: whether the loss trains the scale (it is a parameter of the model either way)
    learn_doc_score_scale: bool = True
    #: with a reranker: how many retrieved candidates it reads to choose the n_docs the generator
    #: reads (squad-open dev, hybrid: the gold document is in the top 20 for 98.8% of questions)
    rerank_candidates: int = 20

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", Mode.parse(self.mode))
        if not (math.isfinite(self.doc_score_scale) and self.doc_score_scale > 0):
            raise RagRayError(f"doc_score_scale must be a finite number > 0, got {self.doc_score_scale}")
        if self.n_docs < 1:
            raise RagRayError(f"n_docs must be >= 1, got {self.n_docs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise RagRayError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 1 <= self.rerank_candidates <= 2048:  # the retriever's largest k
            raise RagRayError(f"rerank_candidates must be in 1..2048, got {self.rerank_candidates}")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise RagRayError(
                f"num_beams and max_new_tokens must be >= 1, got {self.num_beams}, {self.max_new_tokens}"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "RagConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise RagRayError(f"unknown RagConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """JSON-able fields (``mode`` as its string); ``from_dict`` reads them back."""
        return {**asdict(self), "mode": self.mode.value}


class RagModel(nn.Module):
    """Query encoder + generator + RAG config; see ``loss`` and ``generate``."""

    def __init__(self, query_encoder: Encoder, generator: Generator, config: RagConfig | None = None) -> None:
        super().__init__()
        self.query_encoder = query_encoder
        self.generator = generator
        self.config = config or RagConfig()
        #: log of the scale on q·d: stored as a log so it stays positive and Adam's steps are relative
        self.log_doc_score_scale = nn.Parameter(
            torch.tensor(math.log(self.config.doc_score_scale), dtype=torch.float32, device=generator.device),
            requires_grad=self.config.learn_doc_score_scale,
        )
        #: provenance saved with the model (training config, index version); see save_pretrained
        self.metadata: dict = {}
        #: a cross-encoder that picks the n_docs passages read from the top ``rerank_candidates``
        #: (rag_ray.reranker); None: the retriever's order
        self.reranker: Reranker | None = None

    # -- construction / persistence ----------------------------------------------------------

    @classmethod
    def from_components(
        cls,
        query_encoder: str | Encoder = DEFAULT_ENCODER,
        generator: str | Generator = DEFAULT_ENCODER,
        *,
        copy_head: bool | None = None,
        pointer_init: str | None = None,
        device: str | torch.device | None = None,
        **config,
    ) -> "RagModel":
        """A fresh model from checkpoints (names/paths) or ready components. The defaults work
        offline: MiniLM query encoder, BERT2BERT-from-MiniLM generator with the copy head."""
        device = device or default_device()
        if isinstance(query_encoder, str):
            query_encoder = Encoder.from_pretrained(query_encoder, device=device)
        if isinstance(generator, str):
            generator = Generator.from_pretrained(generator, copy_head=copy_head, pointer_init=pointer_init,
                                                  device=device)
        return cls(query_encoder, generator, RagConfig(**config)).to(device)

    @staticmethod
    def _saved(path: Path) -> dict:
        cfg_file = path / _CONFIG_FILE
        if not cfg_file.is_file():
            raise RagRayError(f"{path} is not a saved RagModel (no {_CONFIG_FILE}); write one with save_pretrained")
        data = json.loads(cfg_file.read_text())
        if data.get("format") != _FORMAT:
            raise RagRayError(f"{cfg_file} has format {data.get('format')!r}, expected {_FORMAT!r}")
        return data

    @classmethod
    def saved_config(cls, path: str | os.PathLike) -> RagConfig:
        """The RagConfig of a model saved at ``path``, without loading its weights (a model saved
        before the scale on q·d existed has scale 1)."""
        return cls._config_of(cls._saved(Path(path)))

    @staticmethod
    def _config_of(saved: dict) -> RagConfig:
        return RagConfig.from_dict({"doc_score_scale": 1.0, **saved["config"]})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "RagModel":
        """Load a directory written by ``save_pretrained`` (works in a fresh process). A model
        saved before the scale on q·d existed loads with scale 1, so it scores as it did."""
        path = Path(path)
        data = cls._saved(path)
        device = device or default_device()
        enc_settings = json.loads((path / "query_encoder" / "rag_ray_encoder.json").read_text())
        query_encoder = Encoder.from_pretrained(
            str(path / "query_encoder"), max_length=enc_settings.get("max_length", 256), device=device
        )
        query_encoder.name = enc_settings.get("name", query_encoder.name)
        generator = Generator.from_pretrained(str(path / "generator"), device=device)
        model = cls(query_encoder, generator, cls._config_of(data)).to(device)  # the file read once
        scale_file = path / _SCALE_FILE
        if scale_file.is_file():
            saved = load_file(str(scale_file))
            if "log_doc_score_scale" not in saved:
                raise RagRayError(f"{scale_file} holds {sorted(saved)}, expected 'log_doc_score_scale'")
            with torch.no_grad():
                model.log_doc_score_scale.copy_(saved["log_doc_score_scale"])
        model.metadata = dict(data.get("metadata") or {})
        if (path / _RERANKER_DIR).is_dir():
            model.reranker = Reranker.from_pretrained(str(path / _RERANKER_DIR), device=device)
        return model

    def save_pretrained(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Query encoder, generator (safetensors + tokenizers) and config in one directory,
        written beside the target and renamed into place, so a crash never leaves half a model.

        ``metadata`` (JSON-able; default: the model's own ``metadata``) records where the weights
        came from, e.g. the TrainConfig and the index version they were trained against."""
        # the config records the current scale for readers; the exact (learned) value is the tensor
        config = {**self.config.to_dict(), "doc_score_scale": self.doc_score_scale}
        meta = {"format": _FORMAT, "version": 1, "config": config,
                "metadata": metadata if metadata is not None else self.metadata}
        with atomic_dir(path) as tmp:
            self.query_encoder.save_pretrained(tmp / "query_encoder")
            self.generator.save_pretrained(tmp / "generator")
            if self.reranker is not None:
                self.reranker.save_pretrained(tmp / _RERANKER_DIR)
            save_file({"log_doc_score_scale": self.log_doc_score_scale.detach().cpu().reshape(())},
                      str(tmp / _SCALE_FILE))
            (tmp / _CONFIG_FILE).write_text(json.dumps(meta, indent=2))

    @property
    def device(self) -> torch.device:
        return self.generator.device

    # -- retrieval posterior -----------------------------------------------------------------

    @property
    def doc_score_scale(self) -> float:
        """The current scale on q·d (p(z|x) = softmax(scale · q·d))."""
        return float(self.log_doc_score_scale.detach().exp())

    def set_doc_score_scale(self, value: float) -> None:
        """Set the scale (e.g. to start training an already trained reader from another value)."""
        if not (math.isfinite(value) and value > 0):
            raise RagRayError(f"doc_score_scale must be a finite number > 0, got {value}")
        with torch.no_grad():
            self.log_doc_score_scale.fill_(math.log(value))

    def set_rerank_prior(self, value: float, where: str = "rerank_prior") -> None:
        """Set the reranker's w in logit - w·ln(1 + retriever rank) (saved with it); ``where`` names
        the setting in the errors."""
        from rag_ray.reranker import check_rank_prior

        if self.reranker is None:
            raise RagRayError(f"{where}: the model has no reranker (objective: reranker trains one)")
        self.reranker.rank_prior = check_rank_prior(value, where)

    def doc_scores(self, question_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        """q·d for each retrieved passage: [B, D], [B, K, D] -> [B, K] (differentiable in q).
        Always fp32, also under autocast: p(z|x) is a softmax over close scores."""
        with torch.autocast(question_vectors.device.type, enabled=False):
            return torch.bmm(question_vectors.float().unsqueeze(1), doc_vectors.float().transpose(1, 2)).squeeze(1)

    def doc_logits(self, question_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        """scale · q·d, the logits of p(z|x) that every loss and decoder takes as its doc scores:
        [B, D], [B, K, D] -> [B, K], differentiable in q and in the scale; fp32 like ``doc_scores``."""
        with torch.autocast(question_vectors.device.type, enabled=False):
            return self.doc_scores(question_vectors, doc_vectors) * self.log_doc_score_scale.float().exp()

    def _prepare(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]] | None,
        doc_vectors: torch.Tensor | np.ndarray | None,
        mode: Mode,
        n_docs: int | None,
        question_vectors: torch.Tensor | None,
    ) -> tuple[list[list[PassageLike]] | None, torch.Tensor | None]:
        """Validate inputs; return the first n_docs passages and their scaled scores
        scale · q·d [B, K] (the logits of p(z|x))."""
        if isinstance(questions, str) or not questions:
            raise RagRayError("questions must be a non-empty list of strings (one per example)")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise RagRayError(f"question {i} is empty ({q!r}); every question needs text")
        if not mode.retrieves:
            return None, None
        b = len(questions)
        if passages is None or doc_vectors is None:
            raise RagRayError(
                f"mode {mode.value!r} needs passages and doc_vectors; use mode='closed_book' without retrieval"
            )
        if len(passages) != b:
            raise RagRayError(f"got {len(passages)} passage lists for {b} questions; give one list per question")
        k = n_docs or self.config.n_docs
        if k < 1:
            raise RagRayError(f"n_docs must be >= 1, got {k}")
        for i, row in enumerate(passages):
            if len(row) < k:
                raise RagRayError(
                    f"n_docs={k} but question {i} has only {len(row)} passages; retrieve at least {k} "
                    f"or pass n_docs<={len(row)}"
                )
        if isinstance(doc_vectors, np.ndarray):
            doc_vectors = torch.from_numpy(doc_vectors)
        if not isinstance(doc_vectors, torch.Tensor) or doc_vectors.dim() != 3:
            raise RagRayError(
                f"doc_vectors must be a [B, K, D] tensor or array, got shape {tuple(getattr(doc_vectors, 'shape', ()))}"
            )
        if doc_vectors.shape[0] != b or doc_vectors.shape[1] < k:
            raise RagRayError(
                f"doc_vectors has shape {tuple(doc_vectors.shape)}, need [{b}, >={k}, D] for {b} questions "
                f"and n_docs={k}"
            )
        dim = self.query_encoder.dim
        if doc_vectors.shape[2] != dim:
            raise RagRayError(
                f"doc_vectors have dimension {doc_vectors.shape[2]} but the query encoder outputs {dim}; "
                "the index must be built with a passage encoder of the same size"
            )
        doc_vectors = doc_vectors[:, :k].to(self.device, torch.float32)
        if question_vectors is None:
            question_vectors = self.query_encoder.embed(list(questions))
        elif tuple(question_vectors.shape) != (b, dim):
            raise RagRayError(f"question_vectors has shape {tuple(question_vectors.shape)}, expected ({b}, {dim})")
        scores = self.doc_logits(question_vectors.float(), doc_vectors)
        return [list(row[:k]) for row in passages], scores

    # -- training ----------------------------------------------------------------------------

    def loss(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        passages: Sequence[Sequence[PassageLike]] | None = None,
        doc_vectors: torch.Tensor | np.ndarray | None = None,
        *,
        mode: str | Mode | None = None,
        n_docs: int | None = None,
        label_smoothing: float | None = None,
        question_vectors: torch.Tensor | None = None,
    ) -> LossOutput:
        """Marginal NLL of the answers. ``question_vectors`` (with grad) may be passed when the
        caller already embedded the questions for retrieval; otherwise they are embedded here."""
        mode = Mode.parse(mode or self.config.mode)
        if isinstance(answers, str) or len(answers) != len(questions):
            raise RagRayError(
                f"need one answer string per question: {len(questions)} questions, answers={answers!r:.80}"
            )
        eps = self.config.label_smoothing if label_smoothing is None else label_smoothing
        rows, scores = self._prepare(questions, passages, doc_vectors, mode, n_docs, question_vectors)
        gen = self.generator
        target = gen.build_targets(answers)
        inputs = gen.build_inputs(questions, rows)
        k = 1 if scores is None else scores.shape[1]
        logits = gen(inputs["input_ids"], inputs["attention_mask"], target.repeat_interleave(k, 0)).float()
        if scores is None:
            zero = torch.zeros(len(questions), 1, device=logits.device)
            nll = rag_token_nll(logits, zero, target, gen.pad_token_id, eps)
            empty = zero[:, :0]
            return LossOutput(nll.mean(), nll, empty, empty, empty)
        if mode is Mode.SEQUENCE:
            nll = rag_sequence_nll(logits, scores, target, gen.pad_token_id, gen.bos_token_id, eps)
        else:
            nll = rag_token_nll(logits, scores, target, gen.pad_token_id, eps)
        prior = scores.log_softmax(1)
        with torch.no_grad():
            post = (prior + per_doc_log_likelihood(logits, target, k, gen.pad_token_id)).log_softmax(1)
        return LossOutput(nll.mean(), nll, scores, prior, post)

    def retrieval_loss(
        self,
        questions: Sequence[str],
        positives: torch.Tensor,
        positive_ids: Sequence[str],
        negatives: torch.Tensor | None = None,
        negative_ids: Sequence[Sequence[str]] | None = None,
    ) -> torch.Tensor:
        """DPR's objective for the query encoder: -log softmax(scale · q·d) over every passage in
        the batch (each question's gold passage [B, D], everyone's hard negatives [B, H, D]) at the
        question's own gold passage. A candidate that is the question's gold passage under another
        column (two questions about one passage) is masked, not counted as a negative. The scale is
        the one p(z|x) uses, so this warm-up also calibrates it."""
        b, dim = positives.shape
        if len(questions) != b or len(positive_ids) != b:
            raise RagRayError(f"need one gold passage per question: {len(questions)} questions, "
                              f"{b} positive vectors, {len(positive_ids)} positive ids")
        ids = list(positive_ids)
        candidates = [positives.to(self.device, torch.float32)]
        if negatives is not None and negatives.numel():
            if negative_ids is None or len(negative_ids) != b or negatives.shape[:2] != (b, len(negative_ids[0])):
                raise RagRayError(f"negatives have shape {tuple(negatives.shape)}, expected [{b}, H, {dim}] "
                                  "with H ids per question")
            ids += [pid for row in negative_ids for pid in row]
            candidates.append(negatives.reshape(-1, dim).to(self.device, torch.float32))
        cand = torch.cat(candidates)  # [C, D]
        q = self.query_encoder.embed(list(questions))
        logits = self.doc_logits(q.float(), cand.unsqueeze(0).expand(b, -1, -1))  # [B, C]
        same = torch.tensor([[c != i and ids[c] == ids[i] for c in range(len(ids))] for i in range(b)],
                            device=logits.device)
        logits = logits.masked_fill(same, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, torch.arange(b, device=logits.device))

    # -- decoding ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]] | None = None,
        doc_vectors: torch.Tensor | np.ndarray | None = None,
        *,
        mode: str | Mode | None = None,
        decoding: str | None = None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        n_docs: int | None = None,
        dedup: bool | None = None,
        question_vectors: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> list[Answer]:
        """One answer per question, with p(z|x) and p(z|x,answer) for each passage used.

        Decodings: ``token`` mode: ``greedy``/``beam`` (beam search over the marginal next-token
        distribution); ``sequence`` mode: ``thorough`` (beam per passage, union of hypotheses
        rescored on every passage) or ``fast`` (no rescoring: a hypothesis not in a passage's
        beam gets probability 0 there); ``closed_book``: ``greedy``/``beam`` on the question alone.
        ``use_cache=False``: RAG-Token recomputes every answer prefix (the reference, for benchmarks).
        """
        mode = Mode.parse(mode or self.config.mode)
        num_beams = num_beams or self.config.num_beams
        if not decoding:  # sequence: thorough; token and closed-book: beam unless num_beams == 1
            decoding = "beam" if num_beams > 1 and "beam" in mode.decodings else mode.decodings[0]
        if decoding not in mode.decodings:
            raise RagRayError(
                f"decoding {decoding!r} does not apply to mode {mode.value!r}; use one of {mode.decodings}"
            )
        if decoding == "greedy":
            num_beams = 1
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        dedup = self.config.dedup if dedup is None else dedup
        rows, scores = self._prepare(questions, passages, doc_vectors, mode, n_docs, question_vectors)
        inputs = self.generator.build_inputs(questions, rows)
        if mode is Mode.CLOSED_BOOK:
            return decode_closed_book(self.generator, inputs, num_beams, max_new_tokens)
        if mode is Mode.TOKEN:
            return decode_token(self.generator, inputs, scores, num_beams, max_new_tokens, use_cache)
        if decoding == "fast":
            return decode_sequence_fast(self.generator, inputs, scores, num_beams, max_new_tokens)
        return decode_sequence_thorough(self.generator, inputs, scores, num_beams, max_new_tokens, dedup)

    def generate_token_ids(
        self,
        inputs: dict[str, torch.Tensor],
        doc_scores: torch.Tensor,
        num_beams: int,
        max_new_tokens: int,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """RAG-Token search on prepared inputs: [B*K, L] prompts, [B, K] scores -> [B, T] ids
        (``use_cache=False``: recompute every prefix, the slow reference)."""
        return rag_token_search(self.generator, inputs, doc_scores, num_beams, max_new_tokens, use_cache)
