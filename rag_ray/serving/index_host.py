"""IndexHost: the one owner of the served index. It starts (or attaches to) the shard actors of one
index version, hands model replicas a Retriever over them, and swaps to a new version with no
failed request: the new shards start and answer a search before any request is sent to them, and
the old ones are retired only after a grace period, once requests that hold them have finished.

Model replicas never load an index themselves; they ask here for the current Retriever (a client
holding actor handles) and search the shard actors directly.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import numpy as np
from ray import serve

from rag_ray.errors import RagRayError
from rag_ray.manifest import EncoderInfo, resolve_index

log = logging.getLogger(__name__)


def check_under_roots(index: str, roots: list[str]) -> Path:
    """The resolved index directory, if it lies under one of ``roots`` (symlinks resolved)."""
    path = Path(index).resolve()
    for root in roots:
        if path == Path(root).resolve() or Path(root).resolve() in path.parents:
            return path
    raise RagRayError(f"index_dir {index!r} is outside the directories this service may serve ({', '.join(roots)})")


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
class IndexHost:
    def __init__(self, roots: list[str], query_encoder: dict, grace_s: float = 10.0) -> None:
        self.roots = roots
        self.query_encoder = EncoderInfo(**query_encoder)
        self.grace_s = grace_s
        self.shards = None  # the current ShardSet
        self.retriever = None
        self.swapped_at: float | None = None
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._retiring: set = set()

    # -- Serve hooks -------------------------------------------------------------------------
    async def reconfigure(self, user_config: dict) -> None:
        """``user_config: {index: DIR}``. Never raises: a failed load keeps the current version
        and is reported by ``info()`` (a raising reconfigure would stop the replica)."""
        index = (user_config or {}).get("index")
        if not index:
            return
        try:
            await self.swap(index)
        except Exception as exc:  # noqa: BLE001 - kept and reported, the old version keeps serving
            self.last_error = f"loading {index}: {exc}"
            log.error("index load failed, still serving %s: %s", self.version, exc)

    def __del__(self) -> None:  # Serve calls it when the replica shuts down
        """Retire the shard sets this host started; ones it attached to belong to someone else."""
        for shard_set in [self.shards, *self._retiring]:
            if shard_set is not None and shard_set.owned:
                try:
                    shard_set.retire()
                except Exception:  # noqa: BLE001 - best effort at shutdown
                    pass

    # -- what replicas and the ingress call --------------------------------------------------
    @property
    def version(self) -> str | None:
        return None if self.shards is None else f"{self.shards.name}/{self.shards.version}"

    def current(self):
        """(index version, Retriever) that requests should use now."""
        if self.retriever is None:
            raise RagRayError("no index is loaded" + (f" ({self.last_error})" if self.last_error else ""))
        return self.version, self.retriever

    async def swap(self, index: str) -> dict:
        """Start the shards of ``index`` (under an allowed root), check they answer, make them
        current, and retire the previous version after the grace period. A failure raises a
        RagRayError and leaves the current version serving."""
        from rag_ray.shards import ShardSet

        async with self._lock:
            start = time.perf_counter()
            directory = resolve_index(check_under_roots(index, self.roots))
            previous = self.shards
            if previous is not None and previous.directory == directory:
                return {"index_version": self.version, "changed": False, "seconds": 0.0}
            new = await asyncio.to_thread(ShardSet.start, directory, query_encoder=self.query_encoder, detached=True)
            retriever = new.retriever()
            try:  # one real search end to end before any request goes to it
                await retriever.search_async(np.zeros((1, retriever.dim), dtype=np.float32), 1)
            except Exception:
                if new.owned:
                    new.retire()
                raise
            self.shards, self.retriever, self.swapped_at, self.last_error = new, retriever, time.time(), None
            if previous is not None:
                self._retire_later(previous)
            log.info("serving index %s (%.1f s to load)", self.version, time.perf_counter() - start)
            return {"index_version": self.version, "changed": True, "previous": None if previous is None else
                    f"{previous.name}/{previous.version}", "seconds": round(time.perf_counter() - start, 2)}

    def _retire_later(self, shard_set) -> None:
        self._retiring.add(shard_set)

        async def retire() -> None:
            await asyncio.sleep(self.grace_s)
            await asyncio.to_thread(shard_set.retire)
            self._retiring.discard(shard_set)

        asyncio.get_running_loop().create_task(retire())

    async def info(self) -> dict:
        """Version, manifest summary and shard health, for GET /v1/index and /healthz."""
        if self.shards is None:
            return {"index_version": None, "healthy": False, "error": self.last_error}
        m = self.shards.manifest
        health = await asyncio.to_thread(self.shards.health, 2.0)
        return {"index_version": self.version, "directory": str(self.shards.directory),
                "healthy": all(h["healthy"] for h in health), "error": self.last_error,
                "swapped_at": self.swapped_at,
                "manifest": {"passages": m.passage_count, "shards": m.shard_count, "index_type": m.index_type,
                             "encoder": m.encoder.name, "dim": m.encoder.dim},
                "shards": health}
