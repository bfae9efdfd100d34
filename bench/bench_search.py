"""Sharded search vs. one in-process FAISS index: latency and QPS for query batches of 1/16/64.

Synthetic unit vectors (the scale matters here, not the text): N vectors of dimension D split
over 1, 2 and 4 IndexShard actors, searched through the Retriever client (fan-out, merge and
payload fetch included), against faiss.IndexFlatIP over all N in this process:

    python bench/bench_search.py --n 1000000 --dim 384 --k 10 --shards 1 2 4 --batches 1 16 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from _common import RaySampler, emit, rss_mb  # noqa: E402


def make_vectors(n: int, dim: int, seed: int = 0, chunk: int = 100_000):
    rng = np.random.default_rng(seed)
    for start in range(0, n, chunk):
        v = rng.standard_normal((min(chunk, n - start), dim), dtype=np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        yield start, v


def time_it(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()

    import faiss
    import ray

    from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo
    from rag_ray.retriever import Retriever
    from rag_ray.shards import shard_actor_class
    from rag_ray.runtime import init_ray

    rng = np.random.default_rng(1)
    queries = rng.standard_normal((max(args.batches), args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    single = faiss.IndexFlatIP(args.dim)
    for _, v in make_vectors(args.n, args.dim):
        single.add(v)
    base = {b: time_it(lambda b=b: single.search(queries[:b], args.k), args.repeats) for b in args.batches}
    _, ref_rows = single.search(queries[:4], args.k)
    print(f"one in-process IndexFlatIP over {args.n:,} x {args.dim}: "
          + ", ".join(f"batch {b}: {base[b] * 1e3:.1f} ms ({b / base[b]:.0f} QPS)" for b in args.batches), flush=True)
    driver_rss = rss_mb()
    single.reset()  # free its memory before the shards are built

    init_ray(num_cpus=max(2, os.cpu_count() or 2), object_store_memory=3 * 1024**3)
    actor = shard_actor_class()
    results = {"bench": "search", "n": args.n, "dim": args.dim, "k": args.k, "faiss_threads": faiss.omp_get_max_threads(),
               "baseline_ms": {b: base[b] * 1e3 for b in args.batches}, "baseline_driver_rss_mb": driver_rss, "sharded": {}}
    for n_shards in args.shards:
        shards = [actor.remote(args.dim, "flat") for _ in range(n_shards)]
        t0 = time.perf_counter()
        for start, v in make_vectors(args.n, args.dim):
            owner = (np.arange(start, start + len(v)) % n_shards)
            refs = []
            for s in range(n_shards):
                idx = np.nonzero(owner == s)[0]
                ids = [f"p{start + i:08d}" for i in idx]
                refs.append(shards[s].add.remote(ids, ids, [""] * len(ids), [""] * len(ids), v[idx]))
            ray.get(refs)
        counts = ray.get([s.finalize.remote() for s in shards])
        build_s = time.perf_counter() - t0
        manifest = IndexManifest(EncoderInfo("synthetic", args.dim, "mean", True, 0), "flat", {},
                                 [ShardInfo(f"shard-{i}", c, {}) for i, c in enumerate(counts)], int(sum(counts)))
        retriever = Retriever(shards, manifest)
        got = retriever.search(queries[:4], args.k)
        assert [[h.passage_id for h in hits] for hits in got.hits] == [[f"p{r:08d}" for r in row] for row in ref_rows]
        with RaySampler() as mem:
            lat = {b: time_it(lambda b=b: retriever.search(queries[:b], args.k), args.repeats) for b in args.batches}
        row = {"build_s": build_s, "latency_ms": {b: lat[b] * 1e3 for b in args.batches},
               "qps": {b: b / lat[b] for b in args.batches},
               "ratio_qps_vs_single": {b: base[b] / lat[b] for b in args.batches},
               "shard_max_rss_mb": [s["max_rss_mb"] for s in retriever.stats()], "peak_total_rss_mb": mem.peak_total}
        results["sharded"][n_shards] = row
        print(f"{n_shards} shard(s): " + ", ".join(
            f"batch {b}: {lat[b] * 1e3:.1f} ms ({b / lat[b]:.0f} QPS, x{base[b] / lat[b]:.2f} of single)" for b in args.batches)
            + f"; shard RSS {[round(x) for x in row['shard_max_rss_mb']]} MiB", flush=True)
        for s in shards:
            ray.kill(s)
    emit(results)


if __name__ == "__main__":
    main()
