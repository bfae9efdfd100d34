"""The sharded retriever client: fan a query batch out to the shard actors, merge, fetch payload.

A ``Retriever`` holds actor handles and nothing else (the actors' lifecycle is
:class:`~rag_ray.shards.ShardSet`'s). ``search`` sends the batch to every shard in parallel,
merges the per-shard top-k here, then fetches payload (passages and stored vectors) for the
winners only. ``search_async`` does the same by awaiting ObjectRefs, for event loops (Serve
replicas) where ``ray.get`` must not block. Either every shard answers and the result is the full
merged top-k (equal to one ``faiss.IndexFlatIP`` with Flat shards), or a ``ShardUnavailable``
error says which shard did not: never a partial result. Given the question strings as well, a
search is hybrid: each shard also returns its BM25 top-k, and the client fuses both lists
(:mod:`rag_ray.lexical`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Generator, Iterator, Sequence

import numpy as np

from rag_ray.errors import RagRayError
from rag_ray.lexical import SOURCES, merge_hybrid
from rag_ray.manifest import IndexManifest
from rag_ray.shard import merge_topk
from rag_ray.types import Hit, SearchResult

#: Most queries one search call accepts and most passages per query; beyond, split the batch.
MAX_BATCH = 4096
MAX_K = 2048
#: Up to this many (query, passage) slots a search takes one round trip (payload with the
#: scores); beyond, two (payload for the merged winners only). Measured in bench/bench_search.py.
ONE_ROUND_ROWS = 256
#: Query arrays larger than this go to the object store once instead of inline in every call.
INLINE_BYTES = 100 * 1024


class ShardUnavailable(RuntimeError):
    """A shard did not answer (dead for good, or still restarting when the timeout ran out)."""


class Retriever:
    """Client over a list of IndexShard actor handles (safe to pass to Ray tasks and actors)."""

    def __init__(self, shards: Sequence, manifest: IndexManifest, name: str = "index", timeout_s: float = 300.0,
                 shard_set=None) -> None:
        if len(shards) != manifest.shard_count:
            raise RagRayError(f"got {len(shards)} shard actors for a {manifest.shard_count}-shard index")
        self.shards = list(shards)
        self.manifest = manifest
        self.name = name
        self.timeout_s = timeout_s
        self.shard_set = shard_set  # kept so shutdown() can retire what load() started
        #: batch x candidates up to which a search takes one round trip (bench_search varies it)
        self.one_round_rows = ONE_ROUND_ROWS

    def __reduce__(self):  # the ShardSet stays with its owner; a copy in a task is a pure client
        return (Retriever, (self.shards, self.manifest, self.name, self.timeout_s))

    @property
    def dim(self) -> int:
        return self.manifest.encoder.dim

    @classmethod
    def load(cls, index_dir: str | os.PathLike, query_encoder=None, num_cpus: float = 0.0,
             detached: bool = False) -> "Retriever":
        """Start (or attach to) the shard actors of an index and return a client over them;
        ``shutdown()`` retires the actors if this call started them.

        ``query_encoder`` (an :class:`~rag_ray.encoders.Encoder` or an EncoderInfo), when given, is
        checked against the manifest before anything starts.
        """
        from rag_ray.shards import ShardSet

        info = getattr(query_encoder, "info", query_encoder)
        return ShardSet.start(index_dir, query_encoder=info, num_cpus=num_cpus, detached=detached).retriever()

    def search(self, query_vectors: np.ndarray, k: int = 10, vectors: bool = True,
               questions: Sequence[str] | None = None, lexical_k: int | None = None) -> SearchResult:
        """Top-k passages for each query vector: hits plus stored vectors [B, k, D] float32
        (``vectors=False`` when the caller needs only the hits: none are copied or sent).

        ``questions`` (one string per query vector) makes the search hybrid: the top-k is fused
        by reciprocal rank from the dense top-k and the BM25 top-``lexical_k`` (default k) of the
        questions, each hit still scored by q·d and marked with its ``source``.
        """
        import ray

        steps = self._search_steps(query_vectors, k, vectors, questions, lexical_k)
        try:
            refs = next(steps)
            while True:
                with self._shard_errors():
                    values = ray.get(refs, timeout=self.timeout_s)
                refs = steps.send(values)
        except StopIteration as done:
            return done.value

    async def search_async(self, query_vectors: np.ndarray, k: int = 10, vectors: bool = True,
                           questions: Sequence[str] | None = None, lexical_k: int | None = None) -> SearchResult:
        """``search`` for an event loop: awaits the ObjectRefs, never blocks the loop in ray.get."""
        steps = self._search_steps(query_vectors, k, vectors, questions, lexical_k)
        try:
            refs = next(steps)
            while True:
                with self._shard_errors():
                    values = await asyncio.wait_for(asyncio.gather(*refs), self.timeout_s)
                refs = steps.send(values)
        except StopIteration as done:
            return done.value

    def _search_steps(self, query_vectors: np.ndarray, k: int, vectors: bool, questions: Sequence[str] | None = None,
                      lexical_k: int | None = None) -> Generator[list, list, SearchResult]:
        """The search as steps that yield ObjectRefs and receive their values, so the sync and the
        async path share every line of logic and differ only in how they wait.

        Small batches (batch x candidates <= ONE_ROUND_ROWS) take one round trip: each shard
        returns its candidates with their payload. Larger ones take two: scores first, then
        payload for the merged winners only, so the payload sent does not grow with the number
        of shards.
        """
        import ray

        q = self._check(query_vectors, k)
        arg = ray.put(q) if len(self.shards) > 1 and q.nbytes > INLINE_BYTES else q
        sources = payload = None
        if questions is not None:
            questions, lexical_k = self._check_questions(questions, len(q), k if lexical_k is None else lexical_k)
            if len(q) * (k + lexical_k) <= self.one_round_rows:
                parts = yield [s.hybrid_search_payload.remote(arg, questions, k, lexical_k, vectors) for s in self.shards]
                payload = {s: p[5] for s, p in enumerate(parts)}
            else:
                parts = yield [s.hybrid_search.remote(arg, questions, k, lexical_k) for s in self.shards]
            scores, shard_ids, rows, sources = merge_hybrid(*([p[i] for p in parts] for i in range(5)), k, lexical_k)
        elif len(q) * k <= self.one_round_rows:
            parts = yield [s.search_payload.remote(arg, k, vectors) for s in self.shards]
            scores, shard_ids, rows = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
            payload = {s: p[2] for s, p in enumerate(parts)}
        else:
            parts = yield [s.search.remote(arg, k) for s in self.shards]
            scores, shard_ids, rows = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
        if payload is None:
            wanted = {s: sorted({int(r) for r in rows[shard_ids == s]}) for s in range(len(self.shards))}
            fetch = [s for s, rs in wanted.items() if rs]
            fetched = yield [self.shards[s].fetch.remote(wanted[s], vectors) for s in fetch]
            payload = {s: {"rows": wanted[s], **f} for s, f in zip(fetch, fetched)}
        position = {s: {r: i for i, r in enumerate(p["rows"])} for s, p in payload.items()}
        b, kk = scores.shape
        out = np.zeros((b, kk, self.dim), dtype=np.float32) if vectors else None
        hits: list[list[Hit]] = []
        for i in range(b):
            row_hits = []
            for j in range(kk):
                s = int(shard_ids[i, j])
                if s < 0:
                    continue
                p = payload[s]
                at = position[s][int(rows[i, j])]
                row_hits.append(Hit(p["passage_id"][at], p["doc_id"][at], p["title"][at], p["text"][at],
                                    float(scores[i, j]), SOURCES[sources[i, j]] if sources is not None else "dense"))
                if out is not None:
                    out[i, len(row_hits) - 1] = p["vectors"][at]
            hits.append(row_hits)
        return SearchResult(hits=hits, vectors=out)

    def _check_questions(self, questions: Sequence[str], batch: int, lexical_k: int) -> tuple[list[str], int]:
        if isinstance(questions, str) or not all(isinstance(x, str) for x in questions):
            raise RagRayError("questions must be a list of strings, one per query vector")
        if len(questions) != batch:
            raise RagRayError(f"got {len(questions)} questions for {batch} query vectors; give one question per "
                              "query vector (the question the vector embeds)")
        if not 1 <= lexical_k <= MAX_K:
            raise RagRayError(f"lexical_k must be in 1..{MAX_K}, got {lexical_k}")
        return list(questions), lexical_k

    def _check(self, query_vectors: np.ndarray, k: int) -> np.ndarray:
        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise RagRayError(f"query vectors must have shape (batch, {self.dim}), got {q.shape}")
        if not 1 <= len(q) <= MAX_BATCH:
            raise RagRayError(f"a search batch must hold 1..{MAX_BATCH} queries, got {len(q)}")
        if not 1 <= k <= MAX_K:
            raise RagRayError(f"k must be in 1..{MAX_K}, got {k}")
        if not np.isfinite(q).all():
            raise RagRayError("query vectors contain NaN or infinity")
        return q

    @contextlib.contextmanager
    def _shard_errors(self) -> Iterator[None]:
        """A shard that is dead for good, or still restarting at the timeout, fails the whole search."""
        import ray

        try:
            yield
        except (ray.exceptions.GetTimeoutError, asyncio.TimeoutError):
            raise ShardUnavailable(f"index {self.name}: a shard did not answer within {self.timeout_s} s") from None
        except ray.exceptions.RayActorError as exc:
            raise ShardUnavailable(f"index {self.name}: a shard actor is dead ({str(exc).splitlines()[0]}); "
                                   "restart the index") from None

    def stats(self) -> list[dict]:
        import ray

        return ray.get([s.stats.remote() for s in self.shards])

    def shutdown(self) -> None:
        """Retire the shard actors if this client's ``load`` started them; otherwise just let go."""
        if self.shard_set is not None and self.shard_set.owned:
            self.shard_set.retire()
        self.shards = []
