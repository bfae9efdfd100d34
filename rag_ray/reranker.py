"""A cross-encoder reranker: question and passage read together, one relevance score out.

Why: a bi-encoder squeezes each passage into one vector before it sees the question, so its
first place is often a passage about the right topic rather than the one holding the answer. A
cross-encoder attends across the question's and the passage's tokens (Nogueira & Cho, 2019,
"Passage Re-ranking with BERT"); it is far too slow to scan an index but cheap on the
retriever's top N. It only decides *which* K passages the generator reads and in what order:
p(z|x) stays softmax(scale · q·d) of the stored vectors, so the answer loss still trains the
query encoder. It is part of a saved RagModel (``<model>/reranker``) when one was trained.

Its order also weighs where the retriever ranked each candidate (``rank_prior``): the score is
logit - w·ln(1 + rank), a Zipf prior over the retriever's ranks. The two disagree usefully: on
squad-open dev (DPR towers, hybrid top 20), w = 1 moved recall@5 from 96.8 to 97.9, +1.2
[+0.5, +1.9] paired, and recall@1 from 85.6 to 86.9 (not separated); w was chosen on training
questions (docs/results.md).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rag_ray.corpus import embedding_text
from rag_ray.encoders import bf16_is_native, resolve_model_path
from rag_ray.errors import RagRayError
from rag_ray.types import Hit, SearchResult

_SETTINGS_FILE = "rag_ray_reranker.json"
#: w in logit - w·ln(1 + retriever rank) for a reranker saved without one (and a new one)
DEFAULT_RANK_PRIOR = 1.0


def check_rank_prior(value: float, where: str = "rank_prior") -> float:
    """A usable prior weight (finite, >= 0: a negative one would favour the retriever's last places)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise RagRayError(f"{where} must be a finite number >= 0, got {value!r}")
    return float(value)


class Reranker(torch.nn.Module):
    """A transformer with a one-logit head over "[CLS] question [SEP] title. passage [SEP]"."""

    def __init__(self, model, tokenizer, max_length: int = 256, name: str = "",
                 rank_prior: float = DEFAULT_RANK_PRIOR) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        #: where the weights came from (a hub id or path), recorded with the saved model
        self.name = name
        #: w in logit - w·ln(1 + retriever rank); 0 orders by the logit alone
        self.rank_prior = check_rank_prior(rank_prior)

    @classmethod
    def from_pretrained(cls, name_or_path: str, max_length: int | None = None,
                        device: str | torch.device | None = None) -> "Reranker":
        """A saved reranker, or a new one from any encoder checkpoint (its score head then starts
        at random: train it with ``objective: reranker``)."""
        path = resolve_model_path(name_or_path)
        settings_file = Path(path) / _SETTINGS_FILE
        settings = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
        except OSError as exc:
            raise RagRayError(f"cannot load a reranker from {name_or_path!r}: {exc}") from None
        limit = min(getattr(tokenizer, "model_max_length", 512), getattr(model.config, "max_position_embeddings", 512))
        length = min(max_length or settings.get("max_length") or 256, limit)
        prior = check_rank_prior(settings.get("rank_prior", DEFAULT_RANK_PRIOR), f"{settings_file}: rank_prior")
        reranker = cls(model, tokenizer, int(length), settings.get("name", name_or_path), prior)
        return reranker.to(device) if device is not None else reranker

    def save_pretrained(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self.model.save_pretrained(path)  # safetensors
        self.tokenizer.save_pretrained(path)
        (path / _SETTINGS_FILE).write_text(json.dumps({"max_length": self.max_length, "name": self.name,
                                                          "rank_prior": self.rank_prior}))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, questions: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        """[N] logits for N (question, passage text) pairs, cut to ``max_length`` tokens from the
        longer of the two (the passage, unless a question is longer than it)."""
        batch = self.tokenizer(list(questions), list(texts), truncation="longest_first", max_length=self.max_length,
                               padding=True, return_tensors="pt").to(self.device)
        return self.model(**batch).logits.squeeze(-1).float()

    def listwise_loss(self, questions: Sequence[str], candidates: Sequence[Sequence[str]]) -> torch.Tensor:
        """Cross-entropy of the first candidate (the gold passage) against the others of its own
        question: each question's list may be a different length."""
        if not questions or len(questions) != len(candidates) or any(not c for c in candidates):
            raise RagRayError("listwise_loss needs one non-empty candidate list per question, gold passage first")
        pairs_q = [q for q, c in zip(questions, candidates) for _ in c]
        logits = self(pairs_q, [t for c in candidates for t in c])
        per_question = torch.split(logits, [len(c) for c in candidates])
        table = torch.nn.utils.rnn.pad_sequence(per_question, batch_first=True, padding_value=float("-inf"))
        return torch.nn.functional.cross_entropy(table, torch.zeros(len(candidates), dtype=torch.long,
                                                                    device=table.device))

    @torch.no_grad()
    def scores(self, questions: Sequence[str], candidates: Sequence[Sequence[str]],
               batch_size: int = 64) -> list[np.ndarray]:
        """Each question's candidate scores (higher: more relevant), in batches of ``batch_size`` pairs."""
        if not candidates:
            return []
        pairs = [(q, t) for q, c in zip(questions, candidates) for t in c]
        flat: list[np.ndarray] = []
        was_training = self.training
        self.eval()  # no dropout, also when a model with a reranker is in training
        bf16 = bf16_is_native(self.device)
        try:
            for i in range(0, len(pairs), batch_size):
                chunk = pairs[i : i + batch_size]
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                    flat.append(self([q for q, _ in chunk], [t for _, t in chunk]).cpu().numpy())
        finally:
            self.train(was_training)
        all_scores = np.concatenate(flat) if flat else np.zeros(0, np.float32)
        return np.split(all_scores, np.cumsum([len(c) for c in candidates])[:-1])

    def order(self, questions: Sequence[str], hits: Sequence[Sequence[Hit]]) -> list[list[int]]:
        """For each question, its hits' positions best first, by logit - rank_prior·ln(1 + position):
        ``hits`` in the retriever's order."""
        texts = [[embedding_text(h.title, h.text) for h in row] for row in hits]
        return [list(np.argsort(-(s - self.rank_prior * np.log1p(np.arange(len(s)))), kind="stable"))
                for s in self.scores(questions, texts)]

    def rerank(self, questions: Sequence[str], result: SearchResult, k: int) -> SearchResult:
        """The top ``k`` of each question's hits by this reranker (their stored vectors follow)."""
        orders = [o[:k] for o in self.order(questions, result.hits)]
        hits = [[row[j] for j in o] for row, o in zip(result.hits, orders)]
        vectors = None
        if result.vectors is not None:
            vectors = np.zeros((len(hits), k, result.vectors.shape[-1]), dtype=np.float32)
            for i, o in enumerate(orders):
                vectors[i, : len(o)] = result.vectors[i, o]
        return SearchResult(hits=hits, vectors=vectors)
