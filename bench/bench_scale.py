"""Scale: a 10M x 384 IVF-PQ index in 4 shards on one 24 GiB machine, through the index build's
own Ray Data path (write_index: route -> spill -> finalize one shard per node at a time -> save)
minus the embedding stage: vectors come from a seeded generator with cluster structure, since
embedding 10M passages on 2 cores would take days.

    python bench/bench_scale.py --n 10000000 --shards 4 --nlist 2048 --queries 1000 --nprobe 8 16 32 --refine 4 16 64

Reports build time, peak memory (the largest Ray worker, summed Ray processes, each shard's max
RSS), size on disk, search latency at batch 1/16/64 against exact search (the baseline, chunked
brute force over the same fp32 vectors), and recall@10 against exact search for each nprobe.
Cleans up its index directory (and the shards' spill files) when done.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from _common import RaySampler, emit  # noqa: E402

BLOCK = 50_000  # rows generated per block (each block from its own seeded generator)


class ClusteredVectors:
    """Block b -> rows [b*BLOCK, (b+1)*BLOCK): unit vectors around ``clusters`` random centres.

    Deterministic per block, so the exact-search baseline regenerates the very same vectors."""

    def __init__(self, dim: int, clusters: int, seed: int, noise: float = 0.03) -> None:
        rng = np.random.default_rng(seed)
        centres = rng.standard_normal((clusters, dim), dtype=np.float32)
        self.centres = centres / np.linalg.norm(centres, axis=1, keepdims=True)
        self.dim, self.seed, self.noise = dim, seed, noise

    def block(self, b: int, n: int) -> np.ndarray:
        rows = min(BLOCK, n - b * BLOCK)
        rng = np.random.default_rng([self.seed, b])
        v = self.centres[rng.integers(0, len(self.centres), rows)]
        v = v + self.noise * rng.standard_normal((rows, self.dim), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def __call__(self, batch: dict, n: int) -> dict:
        b = int(batch["block"][0])
        ids = np.arange(b * BLOCK, min((b + 1) * BLOCK, n))
        pid = np.array([f"p{i:09d}" for i in ids], dtype=object)
        return {"passage_id": pid, "doc_id": pid, "title": np.full(len(ids), "", dtype=object),
                "text": np.array([f"synthetic passage {i}" for i in ids], dtype=object), "vector": self.block(b, n)}


def exact_topk(gen: ClusteredVectors, n: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Exact top-k ids by brute force over the regenerated vectors, block by block; and the
    seconds the scoring took (generation excluded)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    scoring = 0.0
    for b in range((n + BLOCK - 1) // BLOCK):
        v = gen.block(b, n)
        t0 = time.perf_counter()
        s = queries @ v.T
        top = np.argpartition(-s, k, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        cand_i = np.concatenate([best_i, top + b * BLOCK], 1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, keep, 1), np.take_along_axis(cand_i, keep, 1)
        scoring += time.perf_counter() - t0
        if b % 40 == 39:
            print(f"  exact search: {(b + 1) * BLOCK:,} / {n:,} vectors", flush=True)
    return best_i, scoring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--nlist", type=int, default=2048, help="IVF lists per shard (None: the build's default)")
    parser.add_argument("--clusters", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--refine", type=int, nargs="+", default=[4, 16, 64],
                        help="PQ candidates re-ranked on the stored vectors, as a multiple of k")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", help="index root (default: a temporary directory, removed at the end)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray

    from rag_ray.config import IndexConfig, load_config
    from rag_ray.indexing import write_index
    from rag_ray.manifest import EncoderInfo, resolve_index
    from rag_ray.runtime import init_ray
    from rag_ray.shards import ShardSet

    init_ray(num_cpus=os.cpu_count() or 2)
    out = args.out or tempfile.mkdtemp(prefix="bench_scale_")
    gen = ClusteredVectors(args.dim, args.clusters, args.seed)
    blocks = (args.n + BLOCK - 1) // BLOCK
    result: dict = {"bench": "scale", "n": args.n, "dim": args.dim, "shards": args.shards, "nlist": args.nlist,
                    "clusters": args.clusters, "queries": args.queries, "k": args.k}
    try:
        cfg = load_config(IndexConfig, overrides={"corpus": ["synthetic"], "out": out, "shards": args.shards,
                                                  "index_type": "ivfpq", "ivf_nlist": args.nlist})
        ds = ray.data.from_items([{"block": b} for b in range(blocks)], override_num_blocks=blocks)
        ds = ds.map_batches(gen, fn_kwargs={"n": args.n}, batch_size=1, num_cpus=1)
        info = EncoderInfo("synthetic-clustered", args.dim, "mean", True, 0)
        with RaySampler(interval=1.0) as mem:
            t0 = time.perf_counter()
            manifest = write_index(ds, cfg, info, lambda total, seconds: {"paths": ["synthetic"], "stream_seconds": round(seconds, 1)})
            build_s = time.perf_counter() - t0
        directory = resolve_index(out)
        disk = int(subprocess.run(["du", "-sb", str(directory)], capture_output=True, text=True).stdout.split()[0])
        result.update(build_s=build_s, stream_s=manifest.corpus["stream_seconds"], passages=manifest.passage_count,
                      shard_build_max_rss_mb=manifest.corpus.get("shard_max_rss_mb"),
                      build_peak_single_worker_rss_mb=mem.peak_single, build_peak_total_rss_mb=mem.peak_total,
                      build_peak_single_worker_anon_mb=mem.peak_single_anon,
                      disk_bytes=disk, disk_per_shard={s.directory: {f: v["bytes"] for f, v in s.files.items()}
                                                       for s in manifest.shards})
        print(f"built {manifest.passage_count:,} passages in {build_s / 60:.1f} min (stream {result['stream_s']} s); "
              f"largest worker {mem.peak_single:,.0f} MiB ({mem.peak_single_anon:,.0f} MiB not file-backed), "
              f"all Ray {mem.peak_total:,.0f} MiB; shard max RSS "
              f"{manifest.corpus.get('shard_max_rss_mb')} MiB; {disk / 2**30:.2f} GiB on disk", flush=True)

        t0 = time.perf_counter()
        shard_set = ShardSet.start(out)
        result["load_s"] = time.perf_counter() - t0
        retriever = shard_set.retriever()
        rng = np.random.default_rng(args.seed + 1)
        q = gen.centres[rng.integers(0, args.clusters, args.queries)]
        q = q + gen.noise * rng.standard_normal(q.shape, dtype=np.float32)
        queries = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
        truth, exact_s = exact_topk(gen, args.n, queries, args.k)
        result["exact_ms_per_query"] = exact_s / args.queries * 1e3
        truth_ids = [{f"p{i:09d}" for i in row} for row in truth]
        result["search"] = {}
        for nprobe, refine in [(p, r) for r in args.refine for p in args.nprobe]:
            ray.get([a.tune.remote(nprobe=nprobe, refine=refine) for a in shard_set.actors])
            found = []
            for i in range(0, args.queries, 64):
                res = retriever.search(queries[i : i + 64], args.k, vectors=False)
                found += [[h.passage_id for h in hits] for hits in res.hits]
            recall = float(np.mean([len(truth_ids[i] & set(f)) / args.k for i, f in enumerate(found)]))
            latency = {}
            for b in args.batches:
                retriever.search(queries[:b], args.k)
                times = []
                for r in range(args.repeats):
                    start = (r * b) % (args.queries - b)
                    t1 = time.perf_counter()
                    retriever.search(queries[start : start + b], args.k)
                    times.append(time.perf_counter() - t1)
                latency[b] = statistics.median(times) * 1e3
            result["search"][f"nprobe={nprobe},refine={refine}"] = {"recall@10": recall, "latency_ms": latency}
            print(f"nprobe {nprobe}, refine {refine}: recall@{args.k} {recall:.3f}; latency " + ", ".join(
                f"batch {b}: {ms:.1f} ms" for b, ms in latency.items())
                + f" (exact: {result['exact_ms_per_query']:.1f} ms per query in batches of {args.queries})", flush=True)
        result["serving_shard_max_rss_mb"] = [s["max_rss_mb"] for s in retriever.stats()]
        shard_set.retire()
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    emit(result)


if __name__ == "__main__":
    main()
