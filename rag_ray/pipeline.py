"""RagPipeline: question in, answer with its sources out. The one path that evaluation, the CLI
(``rag-ray ask``) and Serve use, so they cannot drift apart.

A question is embedded once per request: the same vector searches the shards and gives p(z|x)
to the generator (q·d against the stored passage vectors). ``answer`` runs the steps in order;
``embed`` / ``retriever.search_async`` / ``read`` are the same steps for callers that interleave
them with an event loop (a Serve replica awaits the search and runs the model off the loop).

Answers are read back from the source (``span_recovery``, on by default): where the generated
tokens occur contiguously in a retrieved passage, the answer is the passage's own text ("2,000",
"U.S.") instead of the uncased tokenizer's decode ("2, 000", "u. s."); see ``spans.py``.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from rag_ray.errors import RagRayError
from rag_ray.spans import recover_span
from rag_ray.types import Mode, SearchResult

if TYPE_CHECKING:
    from rag_ray.retriever import Retriever


@dataclass(frozen=True)
class SourcePassage:
    """A passage the answer was read from: ``score`` q·d, ``prior`` p(z|x), ``posterior`` p(z|x,y);
    ``source``: which candidate list found it (dense, lexical or both; see Hit)."""

    passage_id: str
    doc_id: str
    title: str
    text: str
    score: float
    prior: float
    posterior: float
    source: str = "dense"


@dataclass(frozen=True)
class RagAnswer:
    """One answered question; ``score`` is log p(answer|question) under the decoding's model."""

    question: str
    answer: str
    score: float
    passages: list[SourcePassage]

    def to_dict(self) -> dict:
        return asdict(self)


class RagPipeline:
    """A RagModel plus a Retriever (None for closed-book models). ``span_recovery``: answers that
    occur in a retrieved passage are returned as written there (False: the tokenizer's decode).
    ``hybrid``: searches also send the question strings, so BM25 candidates (top ``lexical_k``,
    default the k asked for) are fused with the dense ones. ``rerank``: when the model has a
    reranker, each search fetches ``model.config.rerank_candidates`` and keeps the reranker's top k
    (False: the retriever's top k)."""

    def __init__(self, model, retriever=None, *, span_recovery: bool = True, hybrid: bool = False,
                 lexical_k: int | None = None, rerank: bool = True) -> None:
        self.model = model
        self.retriever = retriever
        self.span_recovery = span_recovery
        self.hybrid = hybrid
        self.lexical_k = lexical_k
        self.use_reranker = rerank and getattr(model, "reranker", None) is not None

    def embed(self, questions: Sequence[str]) -> np.ndarray:
        """[B, D] float32 query vectors from the model's (possibly fine-tuned) query encoder."""
        return self.model.query_encoder.encode(list(questions), batch_size=max(1, len(questions)))

    def retrieve(self, questions: Sequence[str], k: int) -> SearchResult:
        """Top-k passages and their stored vectors for each question."""
        return self.search(questions, self.embed(questions), k)

    def search(self, questions: Sequence[str], question_vectors: np.ndarray, k: int) -> SearchResult:
        """The top-k for already embedded questions; hybrid when the pipeline is, reranked when
        it reranks."""
        result = self._retriever().search(question_vectors, self.candidates(k), **self.search_options(questions))
        return self.rerank(questions, result, k)

    async def search_async(self, retriever: Retriever, questions: Sequence[str], question_vectors: np.ndarray, k: int, *,
                           hybrid: bool | None = None, vectors: bool = True) -> SearchResult:
        """``search`` for an async caller (Serve) on the retriever it names (the index host's current
        one): the shard calls are awaited and the reranker runs on a thread."""
        result = await retriever.search_async(question_vectors, self.candidates(k), vectors=vectors,
                                              **self.search_options(questions, hybrid))
        if self.use_reranker:
            result = await asyncio.to_thread(self.rerank, questions, result, k)
        return result

    def candidates(self, k: int) -> int:
        """How many passages a search for the top k fetches: more when a reranker chooses among them."""
        return max(k, self.model.config.rerank_candidates) if self.use_reranker else k

    def rerank(self, questions: Sequence[str], result: SearchResult, k: int) -> SearchResult:
        """The reranker's top k of a search's candidates; the result itself when not reranking."""
        return self.model.reranker.rerank(list(questions), result, k) if self.use_reranker else result

    def search_options(self, questions: Sequence[str], hybrid: bool | None = None) -> dict:
        """The extra ``Retriever.search`` arguments that make a search hybrid (the questions and
        ``lexical_k``) when ``hybrid`` says so, or (None) when the pipeline is; else none."""
        if not (self.hybrid if hybrid is None else hybrid):
            return {}
        return {"questions": list(questions), "lexical_k": self.lexical_k}

    def answer(self, questions: Sequence[str], *, mode: str | Mode | None = None, n_docs: int | None = None,
               decoding: str | None = None, num_beams: int | None = None,
               max_new_tokens: int | None = None) -> list[RagAnswer]:
        """Retrieve (unless closed-book) and generate one answer per question, with its passages."""
        mode = Mode.parse(mode or self.model.config.mode)
        n_docs = n_docs or self.model.config.n_docs
        vectors = self.embed(questions)
        result = self.search(questions, vectors, n_docs) if mode.retrieves else None
        return self.read(questions, vectors, result, mode=mode, n_docs=n_docs, decoding=decoding,
                         num_beams=num_beams, max_new_tokens=max_new_tokens)

    def read(self, questions: Sequence[str], question_vectors: np.ndarray, result: SearchResult | None, *,
             mode: str | Mode | None = None, n_docs: int | None = None, decoding: str | None = None,
             num_beams: int | None = None, max_new_tokens: int | None = None) -> list[RagAnswer]:
        """Generate answers from already retrieved passages (``result`` None for closed-book)."""
        import torch

        mode = Mode.parse(mode or self.model.config.mode)
        n_docs = n_docs or self.model.config.n_docs
        if mode.retrieves and result is not None:
            n_docs = min(n_docs, min(len(h) for h in result.hits))
            if n_docs < 1:
                raise RagRayError("the index returned no passages for a question")
        q = torch.from_numpy(np.asarray(question_vectors, dtype=np.float32)).to(self.model.device)
        answers = self.model.generate(list(questions), result.hits if result else None,
                                      result.vectors if result else None, mode=mode, n_docs=n_docs,
                                      decoding=decoding, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                      question_vectors=q)
        out = []
        for i, (question, a) in enumerate(zip(questions, answers)):
            hits = result.hits[i][:n_docs] if result else []
            out.append(RagAnswer(question, self._answer_text(a, hits), a.score, [
                SourcePassage(h.passage_id, h.doc_id, h.title, h.text, h.score, float(prior), float(post), h.source)
                for h, prior, post in zip(hits, a.doc_prior, a.doc_posterior)]))
        return out

    def _answer_text(self, answer, hits) -> str:
        """The answer as written in the most probable passage (by p(z|x,y)) that holds its tokens
        contiguously, else its decode."""
        if not self.span_recovery or not hits or not answer.token_ids:
            return answer.text
        order = sorted(range(len(hits)), key=lambda j: -answer.doc_posterior[j])
        return recover_span(self.model.generator.tokenizer, answer.token_ids, [hits[j] for j in order], answer.text)

    def close(self) -> None:
        """Retire the shard actors if this pipeline's retriever started them."""
        if self.retriever is not None:
            self.retriever.shutdown()

    def _retriever(self):
        if self.retriever is None:
            raise RagRayError("this pipeline has no index: give one (--index) or use mode closed_book")
        return self.retriever
