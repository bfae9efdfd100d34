"""Index build: Ray Data reads and embeds the corpus, rows land in IndexShard actors, and the
shards write themselves into a directory that is renamed into place only when complete.

Phases (each finishes before the next): start shards -> stream (read -> split -> embed on an
actor pool -> route each row to its shard) -> finalize shards (build FAISS) -> save + manifest.
The driver only ever sees per-batch counts; vectors go straight from embedding actors to the
shard that owns them (``crc32(passage_id) % shards``).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
import zlib
from pathlib import Path

import numpy as np

from rag_ray.config import EncoderConfig, IndexConfig
from rag_ray.corpus import read_corpus
from rag_ray.encoders import Encoder
from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo

log = logging.getLogger(__name__)


class EmbedPassages:
    """Ray Data stage: passages batch -> the same batch plus a ``vector`` column.

    A callable class so the encoder loads once per actor; it runs without Ray too
    (``EmbedPassages(cfg)(batch)``), which is how the benchmark's single-process baseline runs it.
    """

    def __init__(self, encoder: EncoderConfig, torch_threads: int | None = None) -> None:
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.encoder = Encoder.from_pretrained(encoder.name, encoder.pooling, encoder.normalize, encoder.max_length)
        self.batch_size = encoder.batch_size
        self.bf16 = encoder.precision == "bf16"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = [f"{t} {x}" if t else str(x) for t, x in zip(batch["title"], batch["text"])]
        with torch.autocast(self.encoder.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            batch["vector"] = self.encoder.encode(texts, batch_size=self.batch_size)
        return batch


def shard_of(passage_id: str, shards: int) -> int:
    """Stable owner shard of a passage (independent of Python's per-process hash seed)."""
    return zlib.crc32(passage_id.encode("utf-8")) % shards


def route_to_shards(batch: dict[str, np.ndarray], shards: list) -> dict[str, np.ndarray]:
    """Ray Data stage: send each row to its owner shard actor, wait for the adds, emit counts."""
    import ray

    owner = np.array([shard_of(str(p), len(shards)) for p in batch["passage_id"]], dtype=np.int64)
    refs = []
    for s in np.unique(owner):
        idx = np.nonzero(owner == s)[0]
        refs.append(shards[s].add.remote(
            [str(x) for x in batch["passage_id"][idx]], [str(x) for x in batch["doc_id"][idx]],
            [str(x) for x in batch["title"][idx]], [str(x) for x in batch["text"][idx]],
            np.asarray(batch["vector"][idx], dtype=np.float32)))
    ray.get(refs)
    return {"added": np.array([len(owner)], dtype=np.int64)}


def _index_params(cfg: IndexConfig) -> dict:
    if cfg.index_type == "hnsw":
        return {"hnsw_m": cfg.hnsw_m, "ef_search": cfg.ef_search}
    if cfg.index_type == "ivfpq":
        return {"ivf_nlist": cfg.ivf_nlist, "pq_m": cfg.pq_m, "nprobe": cfg.nprobe}
    return {}


def build_index(cfg: IndexConfig) -> IndexManifest:
    """Build and persist a sharded index for ``cfg.corpus`` under ``cfg.out`` (atomically)."""
    import ray
    from ray.data import ActorPoolStrategy

    from rag_ray.retriever import shard_actor_class, spread_options

    out = Path(cfg.out).resolve()
    if out.exists() and not cfg.overwrite:
        raise ValueError(f"{out} already exists; pass --overwrite to replace it")
    info = EncoderInfo.from_checkpoint(cfg.encoder.name, cfg.encoder.pooling, cfg.encoder.normalize,
                                       cfg.encoder.max_length)
    params = _index_params(cfg)
    actor = shard_actor_class()
    shards = [actor.options(**opts).remote(info.dim, cfg.index_type, **params) for opts in spread_options(cfg.shards)]
    skips = ray.remote(num_cpus=0)(SkipCounter).remote()
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        ds = read_corpus(cfg.corpus, cfg.format, cfg.max_words, cfg.on_error, skip_counter=skips)
        ds = ds.map_batches(
            EmbedPassages,
            fn_constructor_kwargs={"encoder": cfg.encoder, "torch_threads": cfg.torch_threads},
            batch_size=max(cfg.encoder.batch_size, 256),
            compute=ActorPoolStrategy(min_size=1, max_size=cfg.embedders),
            num_cpus=cfg.embedder_cpus,
            num_gpus=cfg.embedder_gpus,
        )
        ds = ds.map_batches(route_to_shards, fn_kwargs={"shards": shards}, batch_size=None, num_cpus=0.1)
        start, total, last_log = time.perf_counter(), 0, 0.0
        for batch in ds.iter_batches(batch_size=None):
            total += int(batch["added"].sum())
            now = time.perf_counter() - start
            if now - last_log > 10:
                log.info("indexed %d passages (%.1f passages/s)", total, total / max(now, 1e-9))
                last_log = now
        elapsed = time.perf_counter() - start
        skipped, examples = ray.get(skips.get.remote())
        if total == 0:
            raise ValueError(f"no passages in corpus {cfg.corpus}" + (f" ({skipped} rows skipped)" if skipped else ""))
        counts = ray.get([s.finalize.remote() for s in shards])
        tmp.mkdir(parents=True)
        files = ray.get([s.save.remote(str(tmp / f"shard-{i:05d}")) for i, s in enumerate(shards)])
        manifest = IndexManifest(
            encoder=info, index_type=cfg.index_type, index_params=params,
            shards=[ShardInfo(f"shard-{i:05d}", int(n), f) for i, (n, f) in enumerate(zip(counts, files))],
            passage_count=int(sum(counts)),
            corpus={"paths": [str(p) for p in cfg.corpus], "max_words": cfg.max_words,
                    "precision": cfg.encoder.precision, "skipped_rows": skipped,
                    "skipped_examples": examples, "embed_seconds": round(elapsed, 2)},
        )
        manifest.write(tmp)
        _replace_dir(tmp, out)
        log.info("wrote %s: %d passages in %d shards (%.1f passages/s)", out, total, cfg.shards, total / elapsed)
        return manifest
    finally:
        for s in shards:
            ray.kill(s)
        ray.kill(skips)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; an existing one is swapped out, then deleted."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class SkipCounter:
    """Collects rows skipped under ``on_error='skip'`` from the read tasks."""

    def __init__(self) -> None:
        self.count, self.examples = 0, []

    def add(self, count: int, examples: list[str]) -> None:
        self.count += count
        self.examples = (self.examples + examples)[:5]

    def get(self) -> tuple[int, list[str]]:
        return self.count, self.examples
