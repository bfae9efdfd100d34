"""Index build: Ray Data reads and embeds the corpus, rows land in IndexShard actors, and the
shards write themselves into a new version directory that is renamed into place only when complete.

Phases (each finishes before the next): start shards -> stream (read -> split -> embed on an
actor pool -> route each row to its shard, which spills it to local disk) -> finalize shards
(sort, build FAISS; one shard per node at a time) -> save + manifest.
The driver only ever sees per-batch counts; vectors go straight from embedding actors to the
shard that owns them (``crc32(passage_id) % shards``).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from rag_ray.config import EncoderConfig, IndexConfig
from rag_ray.corpus import embedding_text, read_corpus
from rag_ray.errors import RagRayError
from rag_ray.io import atomic_dir
from rag_ray.manifest import (CURRENT, MANIFEST, EncoderInfo, IndexManifest, ShardInfo, next_version, set_current,
                              version_dirs)

log = logging.getLogger(__name__)


class EmbedPassages:
    """Ray Data stage: passages batch -> the same batch plus a ``vector`` column.

    A callable class so the encoder loads once per actor; it runs without Ray too
    (``EmbedPassages(cfg)(batch)``), which is how the benchmark's single-process baseline runs it.
    """

    def __init__(self, encoder: EncoderConfig, torch_threads: int | None = None) -> None:
        # torch and transformers are imported here, not by the module: every Ray worker that runs
        # this module's other stages (route_to_shards, the skip counter) would otherwise import
        # them too, about 3 s of CPU and some 400 MiB of peak RSS in a build (docs/benchmarks.md).
        import torch

        from rag_ray.encoders import Encoder, resolve_precision

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.encoder = Encoder.from_pretrained(encoder.name, encoder.pooling, encoder.normalize, encoder.max_length)
        self.batch_size = encoder.batch_size
        self.precision = resolve_precision(encoder.precision, self.encoder.device)
        self.bf16 = self.precision == "bf16"
        log.info("embedding in %s on %s (precision %r)", self.precision, self.encoder.device, encoder.precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        texts = [embedding_text(t, x) for t, x in zip(batch["title"], batch["text"])]
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
        return {"ivf_nlist": cfg.ivf_nlist, "pq_m": cfg.pq_m, "nprobe": cfg.nprobe, "refine": cfg.refine}
    return {}


def embedding_resources(cfg: IndexConfig, cluster: dict) -> tuple[int, float, float, int]:
    """(max embedding actors, CPUs, GPUs and torch threads per actor): what the config says, and
    for what it leaves unset (None), a size from the cluster's resources (``ray.cluster_resources()``).

    With GPUs, one actor per GPU. On CPUs, one single-threaded actor per logical CPU: on 2 cores
    two 1-thread actors embedded squad-open at 31.1 passages/s against 27.1 for one 2-thread actor
    and 28.6 for one 1-thread actor (docs/benchmarks.md), since independent actors never wait for
    each other's intra-op barriers. Threads are set explicitly: a Ray actor's torch otherwise runs
    one thread (Ray sets OMP_NUM_THREADS=1 unless told), whatever CPUs it holds.
    """
    gpus_total = int(cluster.get("GPU", 0))
    cpus_total = max(1, int(cluster.get("CPU", 1)))
    gpus = cfg.embedder_gpus if cfg.embedder_gpus is not None else (1.0 if gpus_total else 0.0)
    cpus = cfg.embedder_cpus if cfg.embedder_cpus is not None else 1.0
    if cfg.embedders is not None:
        embedders = cfg.embedders
    elif gpus:
        embedders = max(1, int(gpus_total / gpus))
    else:
        embedders = max(1, int(cpus_total / cpus))
    threads = cfg.torch_threads or max(1, int(cpus))
    return embedders, cpus, gpus, threads


def build_index(cfg: IndexConfig) -> IndexManifest:
    """Build a new version of the index at ``cfg.out`` and make it current.

    ``cfg.out`` is an index root: the build writes ``<out>/vNNNN`` aside and renames it into place,
    then points ``<out>/current`` at it (one atomic rename each). Versions that shard actors still
    serve are never touched; ``cfg.overwrite`` deletes older versions that nothing on the connected
    Ray cluster serves.
    """
    import ray
    from ray.data import ActorPoolStrategy

    root = Path(cfg.out).resolve()
    _check_root(root)
    info = EncoderInfo.from_checkpoint(cfg.encoder.name, cfg.encoder.pooling, cfg.encoder.normalize,
                                       cfg.encoder.max_length)
    skips = ray.remote(num_cpus=0)(SkipCounter).remote()
    try:
        ds = read_corpus(cfg.corpus, cfg.format, cfg.max_words, cfg.on_error, skip_counter=skips)
        pool = embedding_resources(cfg, ray.cluster_resources())
        log.info("embedding with up to %d actors x (%g CPU, %g GPU, %d torch threads)", *pool)
        embedders, cpus, gpus, threads = pool
        ds = ds.map_batches(
            EmbedPassages,
            fn_constructor_kwargs={"encoder": cfg.encoder, "torch_threads": threads},
            batch_size=max(cfg.encoder.batch_size, 256),
            # The whole pool from the start: Ray Data's pool autoscaler did not add a second actor
            # for a corpus of a few blocks, which left one 1-thread actor embedding squad-open
            # alone at 0.47 of a plain 2-thread process (docs/benchmarks.md).
            compute=ActorPoolStrategy(min_size=embedders, max_size=embedders),
            num_cpus=cpus,
            num_gpus=gpus,
        )

        def describe(total: int, seconds: float) -> dict:
            skipped, examples = ray.get(skips.get.remote())
            if total == 0:
                raise RagRayError(f"no passages in corpus {cfg.corpus}" + (f" ({skipped} rows skipped)" if skipped else ""))
            # absolute, so a later re-embedding (index_refresh) finds them from any working directory
            paths = [str(p) if "://" in str(p) else str(Path(p).resolve()) for p in cfg.corpus]
            return {"paths": paths, "format": cfg.format, "max_words": cfg.max_words,
                    "precision": cfg.encoder.precision, "skipped_rows": skipped,
                    "skipped_examples": examples, "embed_seconds": round(seconds, 2)}

        return write_index(ds, cfg, info, describe)
    finally:
        ray.kill(skips)


def write_index(ds, cfg: IndexConfig, encoder: EncoderInfo, describe: Callable[[int, float], dict]) -> IndexManifest:
    """Stream a dataset of passages that carry a ``vector`` column into new shard actors, build
    each shard's FAISS index, and write them as a new version of the index root ``cfg.out``.

    Rows go straight from the dataset's last stage to the shard that owns them; shards spill to
    local disk while the corpus streams. Shards then finalize one per node at a time, each with
    all of its node's CPUs: memory peaks at one shard's index per node, not all of them.
    ``describe(passages, seconds)`` returns the manifest's ``corpus`` record once the stream ends.
    """
    import ray

    from rag_ray.shards import bundle_nodes, node_cpus, running_shards, shard_actor_class, spread_placement

    root = Path(cfg.out).resolve()
    _check_root(root)
    params = _index_params(cfg)
    group, placement = spread_placement(cfg.shards, 0.0)
    actor = shard_actor_class()
    shards = [actor.options(**opts).remote(encoder.dim, cfg.index_type, spill_dir=cfg.spill_dir, **params)
              for opts in placement]
    try:
        ds = ds.map_batches(route_to_shards, fn_kwargs={"shards": shards}, batch_size=None, num_cpus=0)
        start, total, last_log = time.perf_counter(), 0, 0.0
        for batch in ds.iter_batches(batch_size=None):
            total += int(batch["added"].sum())
            now = time.perf_counter() - start
            if now - last_log > 10:
                log.info("indexed %d passages (%.1f passages/s)", total, total / max(now, 1e-9))
                last_log = now
        elapsed = time.perf_counter() - start
        log.debug("Ray Data stages:\n%s", ds.stats())
        corpus = describe(total, elapsed)
        t0 = time.perf_counter()
        counts = _finalize(shards, bundle_nodes(group), node_cpus())
        corpus["finalize_seconds"] = round(time.perf_counter() - t0, 2)
        corpus["shard_max_rss_mb"] = [round(st["max_rss_mb"]) for st in ray.get([s.stats.remote() for s in shards])]
        t0 = time.perf_counter()
        version = next_version(root)
        with atomic_dir(root / version) as tmp:
            files = ray.get([s.save.remote(str(tmp / f"shard-{i:05d}")) for i, s in enumerate(shards)])
            manifest = IndexManifest(
                encoder=encoder, index_type=cfg.index_type, index_params=params,
                shards=[ShardInfo(f"shard-{i:05d}", int(n), f) for i, (n, f) in enumerate(zip(counts, files))],
                passage_count=int(sum(counts)), corpus=corpus,
            )
            corpus["save_seconds"] = round(time.perf_counter() - t0, 2)
            manifest.write(tmp)
        set_current(root, version)
        log.info("wrote %s/%s: %d passages in %d shards (%.1f passages/s)", root, version, total, cfg.shards,
                 total / max(time.perf_counter() - start, 1e-9))
        if cfg.overwrite:
            for old in version_dirs(root):
                if old.name != version and not running_shards(root.name, old.name):
                    shutil.rmtree(old, ignore_errors=True)
        return manifest
    finally:
        try:  # ray.kill skips the actors' cleanup: delete their spill files first
            ray.get([s.discard.remote() for s in shards], timeout=120)
        except Exception as exc:  # noqa: BLE001 (a dead shard has nothing left to delete)
            log.warning("could not clean a shard's spill files: %s", exc)
        for s in shards:
            ray.kill(s)
        ray.util.remove_placement_group(group)


def _finalize(shards: list, nodes: list, cpus: dict) -> list[int]:
    """Finalize the shards one per node at a time (in parallel across nodes), each with its node's
    CPUs as FAISS threads; returns each shard's row count."""
    import ray

    queues: dict = {}
    for i, node in enumerate(nodes):
        queues.setdefault(node, []).append(i)
    counts: list[int] = [0] * len(shards)
    while any(queues.values()):
        batch = [q.pop(0) for q in queues.values() if q]
        started = time.perf_counter()
        done = ray.get([shards[i].finalize.remote(max(1, int(cpus.get(nodes[i], 1)))) for i in batch])
        for i, n in zip(batch, done):
            counts[i] = n
        log.info("finalized shard(s) %s: %s passages in %.1f s", batch, done, time.perf_counter() - started)
    return counts


def run_index(cfg: IndexConfig) -> dict:
    """The index job, as ``rag-ray index`` and ``jobs/build_index.py`` run it: start or join Ray as
    ``cfg.ray`` says, build a new index version, and report what was built."""
    from rag_ray.datasets import resolve_data_path
    from rag_ray.runtime import init_ray_from

    cfg = dataclasses.replace(cfg, corpus=[resolve_data_path(c) for c in cfg.corpus])
    init_ray_from(cfg.ray)
    start = time.perf_counter()
    manifest = build_index(cfg)
    seconds = time.perf_counter() - start
    root = Path(cfg.out).resolve()
    return {"index": str(root), "version": (root / CURRENT).read_text().strip(), "passages": manifest.passage_count,
            "shards": manifest.shard_count, "shard_passages": [s.passages for s in manifest.shards],
            "index_type": manifest.index_type, "encoder": manifest.encoder.name, "dim": manifest.encoder.dim,
            "seconds": round(seconds, 1), "passages_per_second": round(manifest.passage_count / seconds, 2),
            "skipped_rows": manifest.corpus.get("skipped_rows", 0),
            "skipped_examples": manifest.corpus.get("skipped_examples", [])}


def _check_root(root: Path) -> None:
    """``root`` must be new, empty, or an index root; anything else is refused, never overwritten."""
    if not root.exists() or (root / CURRENT).is_file() or (root.is_dir() and not any(root.iterdir())):
        return
    if (root / MANIFEST).is_file():
        raise RagRayError(f"{root} is an unversioned index from an older rag_ray; move it away or build into "
                          "another --out (new builds are versioned: <out>/vNNNN plus a 'current' pointer)")
    raise RagRayError(f"{root} exists and is not a rag_ray index root; give an empty or new --out directory")


class SkipCounter:
    """Collects rows skipped under ``on_error='skip'`` from the read tasks."""

    def __init__(self) -> None:
        self.count, self.examples = 0, []

    def add(self, count: int, examples: list[str]) -> None:
        self.count += count
        self.examples = (self.examples + examples)[:5]

    def get(self) -> tuple[int, list[str]]:
        return self.count, self.examples
