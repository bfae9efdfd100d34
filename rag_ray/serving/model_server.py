"""RagModelServer: the autoscaled model replicas. Each holds one RagModel (query encoder,
generator and, when trained, a reranker) and nothing of the index: it asks the IndexHost for the current Retriever and searches
the shard actors itself, awaiting their ObjectRefs. Concurrent requests are grouped by
``@serve.batch``; encoding and generation run in a worker thread, so the event loop keeps
accepting requests while the model computes.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from ray import serve

from rag_ray.pipeline import RagPipeline
from rag_ray.types import Mode


@serve.deployment
class RagModelServer:
    def __init__(self, model_dir: str, index_host, torch_threads: int, max_batch_size: int,
                 batch_wait_timeout_s: float, n_docs: int | None = None, span_recovery: bool = True,
                 hybrid: bool = False, lexical_k: int | None = None) -> None:
        import torch

        from rag_ray.model import RagModel

        torch.set_num_threads(torch_threads)
        self.pipeline = RagPipeline(RagModel.from_pretrained(model_dir).eval(), span_recovery=span_recovery,
                                    hybrid=hybrid, lexical_k=lexical_k)
        self.index_host = index_host
        self.n_docs = n_docs or self.pipeline.model.config.n_docs
        self.batch_sizes: list[int] = []  # recent batch sizes, for tests and the benchmark
        self._answer_batch.set_max_batch_size(max_batch_size)
        self._answer_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def answer(self, question: str, params: dict[str, Any]) -> dict:
        """One question; concurrent calls are batched. ``params``: mode, decoding, n_docs,
        num_beams, max_new_tokens (None: the model's defaults), hybrid (None: the service's)."""
        return await self._answer_batch((question, params))

    async def retrieve(self, questions: list[str], k: int, hybrid: bool | None = None) -> dict:
        version, retriever = await self.index_host.current.remote()
        t0 = time.perf_counter()
        vectors = await asyncio.to_thread(self.pipeline.embed, questions)
        t1 = time.perf_counter()
        # with a reranker: the model's cross-encoder picks the k it would read
        result = await self.pipeline.search_async(retriever, questions, vectors, k, hybrid=hybrid, vectors=False)
        t2 = time.perf_counter()
        return {"index_version": version, "hits": [[h.__dict__ for h in hits] for hits in result.hits],
                "timings_ms": {"embed": _ms(t1 - t0), "search": _ms(t2 - t1)}}

    def stats(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _answer_batch(self, items: list[tuple[str, dict]]) -> list[dict]:
        self.batch_sizes = (self.batch_sizes + [len(items)])[-1000:]
        version, retriever = await self.index_host.current.remote()
        out: list[dict | None] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}  # only requests with the same decoding settings share a batch
        for i, (_, params) in enumerate(items):
            groups.setdefault(tuple(sorted(params.items())), []).append(i)
        for key, rows in groups.items():
            params = dict(key)
            questions = [items[i][0] for i in rows]
            n_docs = params.pop("n_docs", None) or self.n_docs
            hybrid = params.pop("hybrid", None)
            t0 = time.perf_counter()
            vectors = await asyncio.to_thread(self.pipeline.embed, questions)
            t1 = time.perf_counter()
            mode = Mode.parse(params.get("mode") or self.pipeline.model.config.mode)
            result = None
            if mode.retrieves:
                result = await self.pipeline.search_async(retriever, questions, vectors, n_docs, hybrid=hybrid)
            t2 = time.perf_counter()
            answers = await asyncio.to_thread(self.pipeline.read, questions, vectors, result, n_docs=n_docs, **params)
            t3 = time.perf_counter()
            timings = {"embed": _ms(t1 - t0), "search": _ms(t2 - t1), "generate": _ms(t3 - t2), "batch": len(rows)}
            for i, answer in zip(rows, answers):
                out[i] = {**answer.to_dict(), "index_version": version, "timings_ms": timings}
        return out


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)
