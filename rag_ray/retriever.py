"""The sharded retriever: ``IndexShard`` actors and the client that fans out and merges.

``Retriever.load(index_dir)`` starts one actor per shard, each reading its own files (no process
ever holds the whole index), and ``search(q_vectors, k)`` sends the batch to every shard in
parallel, merges the per-shard top-k on the client, then fetches payload for the winners only.
With Flat shards the merged ids and scores equal one ``faiss.IndexFlatIP`` over all vectors.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from rag_ray.manifest import IndexManifest
from rag_ray.shard import IndexShard, merge_topk
from rag_ray.types import Hit, SearchResult

#: Most queries one search call accepts and most passages per query; beyond, split the batch.
MAX_BATCH = 4096
MAX_K = 2048


def spread_options(n: int) -> list[dict]:
    """Actor options that place n shards round-robin over the cluster's worker nodes.

    Ray's "SPREAD" strategy does not spread zero-CPU actors, so each shard is pinned to a node
    with hard node affinity. (Soft affinity was measured to be ignored for actors on Ray 2.60: 4
    of 6 fresh two-node clusters misplaced a shard.) The nodes were alive a moment ago; a shard
    whose node dies later is not moved, the retriever is reloaded instead. Nodes that offer no CPU
    (a KubeRay head started with num-cpus 0) are left out unless there is nothing else.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = sorted((nd for nd in ray.nodes() if nd.get("Alive")), key=lambda nd: nd["NodeID"])
    workers = [nd for nd in nodes if nd.get("Resources", {}).get("CPU", 0) > 0] or nodes
    if len(workers) < 2:
        return [{} for _ in range(n)]
    return [{"scheduling_strategy": NodeAffinitySchedulingStrategy(workers[i % len(workers)]["NodeID"], soft=False)}
            for i in range(n)]


def shard_actor_class(num_cpus: float = 0.0):
    """IndexShard as a Ray actor. Zero logical CPUs by default: shard actors mostly wait, and on a
    small machine an actor that holds a whole CPU starves the tasks that feed it."""
    import ray

    return ray.remote(num_cpus=num_cpus, max_concurrency=4)(IndexShard)


class Retriever:
    """Client over a list of IndexShard actor handles (safe to pass to Ray tasks and actors)."""

    def __init__(self, shards: Sequence, manifest: IndexManifest) -> None:
        if len(shards) != manifest.shard_count:
            raise ValueError(f"got {len(shards)} shard actors for a {manifest.shard_count}-shard index")
        self.shards = list(shards)
        self.manifest = manifest

    @property
    def dim(self) -> int:
        return self.manifest.encoder.dim

    @classmethod
    def load(cls, index_dir: str | os.PathLike, query_encoder=None, num_cpus: float = 0.0,
             spread: bool = True) -> "Retriever":
        """Start shard actors for a persisted index; each verifies and reads its own files.

        ``query_encoder`` (an :class:`~rag_ray.encoders.Encoder`), when given, is checked against
        the manifest before anything starts. ``spread`` places shards on different nodes.
        """
        import ray

        index_dir = Path(index_dir).resolve()
        manifest = IndexManifest.read(index_dir)
        if query_encoder is not None:
            manifest.check_query_encoder(query_encoder.info)
        actor = shard_actor_class(num_cpus)
        placement = spread_options(manifest.shard_count) if spread else [{}] * manifest.shard_count
        shards = [actor.options(**opts).remote(manifest.encoder.dim, manifest.index_type, **manifest.index_params)
                  for opts in placement]
        # Each actor reads (and checksums) its own files: nothing funnels through the driver.
        try:
            ray.get([s.restore.remote(str(index_dir / info.directory), info.files)
                     for s, info in zip(shards, manifest.shards)])
        except Exception as exc:
            for s in shards:
                ray.kill(s)
            raise _unwrap(exc) from None
        return cls(shards, manifest)

    def search(self, query_vectors: np.ndarray, k: int = 10) -> SearchResult:
        """Top-k passages for each query vector: hits plus stored vectors [B, k, D] float32."""
        import ray

        q = np.asarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must have shape (batch, {self.dim}), got {q.shape}")
        if not 1 <= len(q) <= MAX_BATCH:
            raise ValueError(f"a search batch must hold 1..{MAX_BATCH} queries, got {len(q)}")
        if not 1 <= k <= MAX_K:
            raise ValueError(f"k must be in 1..{MAX_K}, got {k}")
        if not np.isfinite(q).all():
            raise ValueError("query vectors contain NaN or infinity")
        q_ref = ray.put(q)
        parts = ray.get([s.search.remote(q_ref, k) for s in self.shards])
        scores, shard_ids, rows = merge_topk([p[0] for p in parts], [p[1] for p in parts], k)
        # Phase two: payload only for the merged winners, one call per shard that has any.
        wanted = {s: sorted({int(r) for r in rows[shard_ids == s]}) for s in range(len(self.shards))}
        refs = {s: self.shards[s].fetch.remote(rs) for s, rs in wanted.items() if rs}
        payload = {s: ray.get(ref) for s, ref in refs.items()}
        position = {s: {r: i for i, r in enumerate(wanted[s])} for s in payload}
        b, kk = scores.shape
        vectors = np.zeros((b, kk, self.dim), dtype=np.float32)
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
                                    float(scores[i, j])))
                vectors[i, len(row_hits) - 1] = p["vectors"][at]
            hits.append(row_hits)
        return SearchResult(hits=hits, vectors=vectors)

    def stats(self) -> list[dict]:
        import ray

        return ray.get([s.stats.remote() for s in self.shards])

    def shutdown(self) -> None:
        import ray

        for s in self.shards:
            ray.kill(s)
        self.shards = []


def _unwrap(exc: BaseException) -> BaseException:
    """The user's error (e.g. ValueError naming a corrupted file) out of Ray's task wrappers."""
    cause = getattr(exc, "cause", None)
    while cause is not None and getattr(cause, "cause", None) is not None:
        cause = cause.cause
    return cause if isinstance(cause, Exception) else exc
