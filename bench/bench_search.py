"""Sharded search vs. one in-process FAISS index: latency and QPS for query batches of 1/16/64.

Synthetic unit vectors (the scale matters here, not the text): N vectors of dimension D split
over 1, 2 and 4 IndexShard actors (placed and given FAISS threads as ShardSet does), searched
through the Retriever client (fan-out, merge and payload fetch included), against
faiss.IndexFlatIP over all N in this process (FAISS defaults: all cores; and again with the BLAS
threshold the shards use). The sides, and the
retriever forced to one or two round trips, are timed call by call in turn:

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


def time_pairs(fns: dict, repeats: int) -> dict:
    """Median seconds per function, the functions called in turn (a, b, c, a, b, c, ...) so that
    every side sees the same background noise; one warm-up call each. A pause precedes each call:
    OpenMP threads keep spinning for a while after a parallel FAISS call, and would otherwise
    steal the cores from whichever side runs next."""
    for fn in fns.values():
        fn()
    samples: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            time.sleep(0.1)
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in samples.items()}


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

    import rag_ray.retriever as retriever_module
    from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo
    from rag_ray.retriever import Retriever
    from rag_ray.runtime import init_ray
    from rag_ray.shard import BLAS_THRESHOLD
    from rag_ray.shards import shard_actor_class, shard_threads, spread_placement

    default_blas = faiss.cvar.distance_compute_blas_threshold

    def single_search(b: int, blas_threshold: int):
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
        single.search(queries[:b], args.k)

    rng = np.random.default_rng(1)
    queries = rng.standard_normal((max(args.batches), args.dim), dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    single = faiss.IndexFlatIP(args.dim)
    for _, v in make_vectors(args.n, args.dim):
        single.add(v)
    _, ref_rows = single.search(queries[:4], args.k)
    driver_rss = rss_mb()

    init_ray(num_cpus=os.cpu_count() or 2, object_store_memory=3 * 1024**3)
    actor = shard_actor_class()
    one_round = retriever_module.ONE_ROUND_ROWS
    results = {"bench": "search", "n": args.n, "dim": args.dim, "k": args.k, "faiss_threads": faiss.omp_get_max_threads(),
               "one_round_rows": one_round, "baseline_driver_rss_mb": driver_rss, "sharded": {}}
    for n_shards in args.shards:
        group, placement = spread_placement(n_shards, 0.0)
        threads = shard_threads(group)
        shards = [actor.options(**opts).remote(args.dim, "flat", threads=t) for opts, t in zip(placement, threads)]
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

        def sharded(b: int, rounds: int):
            retriever.one_round_rows = one_round if rounds == 0 else (10**9 if rounds == 1 else 0)
            retriever.search(queries[:b], args.k)

        row = {"build_s": build_s, "threads_per_shard": threads, "single_ms": {}, "sharded_ms": {},
               "one_round_ms": {}, "two_rounds_ms": {}, "ratio_qps_vs_single": {}}
        with RaySampler() as mem:
            for b in args.batches:
                t = time_pairs({"single": lambda b=b: single_search(b, default_blas),
                                "single_tuned": lambda b=b: single_search(b, BLAS_THRESHOLD),
                                "sharded": lambda b=b: sharded(b, 0),
                                "one_round": lambda b=b: sharded(b, 1),
                                "two_rounds": lambda b=b: sharded(b, 2)}, args.repeats)
                row["single_ms"][b], row["sharded_ms"][b] = t["single"] * 1e3, t["sharded"] * 1e3
                row.setdefault("single_tuned_ms", {})[b] = t["single_tuned"] * 1e3
                row.setdefault("ratio_qps_vs_single_tuned", {})[b] = t["single_tuned"] / t["sharded"]
                row["one_round_ms"][b], row["two_rounds_ms"][b] = t["one_round"] * 1e3, t["two_rounds"] * 1e3
                row["ratio_qps_vs_single"][b] = t["single"] / t["sharded"]
                print(f"{n_shards} shard(s) x {threads} thread(s), batch {b}: single {t['single'] * 1e3:.1f} ms "
                      f"(BLAS from query 1: {t['single_tuned'] * 1e3:.1f} ms), sharded {t['sharded'] * 1e3:.1f} ms "
                      f"(x{t['single'] / t['sharded']:.2f} / x{t['single_tuned'] / t['sharded']:.2f} QPS of single); "
                      f"one round {t['one_round'] * 1e3:.1f} ms, two rounds {t['two_rounds'] * 1e3:.1f} ms", flush=True)
        row["shard_max_rss_mb"] = [s["max_rss_mb"] for s in retriever.stats()]
        row["peak_total_rss_mb"] = mem.peak_total
        results["sharded"][n_shards] = row
        for s in shards:
            ray.kill(s)
        ray.util.remove_placement_group(group)
    emit(results)


if __name__ == "__main__":
    main()
