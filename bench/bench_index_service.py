"""The index as a service: attaching to a running index vs. loading it, and async vs. sync search.

Writes a synthetic Flat index (N unit vectors of dimension D in S shards, the versioned layout)
to a temporary directory, then on a local Ray measures, in the same run:
  - load: ``ShardSet.start`` (start S actors; each reads and checksums its own files);
  - attach: ``ShardSet.attach`` of the running index, in this driver and in a second driver
    process (what a Serve replica or a job does instead of loading);
  - search latency through ``Retriever.search`` (ray.get) and ``Retriever.search_async`` (awaited
    ObjectRefs, as a Serve replica calls it) at batch 1 and 16, alternating, median of R each.

    python bench/bench_index_service.py --n 500000 --dim 384 --shards 2 --repeats 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from _common import emit  # noqa: E402
from bench_search import make_vectors  # noqa: E402

ATTACH_SCRIPT = """
import sys, time
from rag_ray.runtime import init_ray
from rag_ray.shards import ShardSet
init_ray(address=sys.argv[1])
t0 = time.perf_counter()
ShardSet.attach(sys.argv[2])
print(time.perf_counter() - t0)
"""


def write_index(root: str, n: int, dim: int, shards: int) -> None:
    from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo, set_current
    from rag_ray.shard import IndexShard

    parts = [IndexShard(dim) for _ in range(shards)]
    for start, v in make_vectors(n, dim):
        owner = np.arange(start, start + len(v)) % shards
        for s, part in enumerate(parts):
            idx = np.nonzero(owner == s)[0]
            ids = [f"p{start + i:08d}" for i in idx]
            part.add(ids, ids, [""] * len(ids), [f"passage {i}" for i in ids], v[idx])
    infos = []
    for s, part in enumerate(parts):
        count = part.finalize()
        infos.append(ShardInfo(f"shard-{s:05d}", count, part.save(os.path.join(root, "v0001", f"shard-{s:05d}"))))
    IndexManifest(EncoderInfo("synthetic", dim, "mean", True, 0), "flat", {}, infos, n).write(os.path.join(root, "v0001"))
    set_current(root, "v0001")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    import ray

    from rag_ray.runtime import init_ray
    from rag_ray.shards import ShardSet

    tmp = tempfile.mkdtemp(prefix="bench_service_")
    root = os.path.join(tmp, "synthetic")
    try:
        t0 = time.perf_counter()
        write_index(root, args.n, args.dim, args.shards)
        print(f"wrote {args.n:,} x {args.dim} in {args.shards} shards in {time.perf_counter() - t0:.1f} s", flush=True)

        init_ray(num_cpus=max(2, os.cpu_count() or 2), object_store_memory=1024**3)
        t0 = time.perf_counter()
        shards = ShardSet.start(root)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ShardSet.attach(root)
        attach_s = time.perf_counter() - t0
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        other = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT, ray.get_runtime_context().gcs_address, root],
                               env=env, capture_output=True, text=True, timeout=300)
        if other.returncode != 0:
            raise SystemExit(f"second driver failed:\n{other.stderr[-2000:]}")
        attach_other_s = float(other.stdout.strip().splitlines()[-1])
        print(f"load (start {args.shards} actors, read + checksum): {load_s:.2f} s; attach: {attach_s * 1e3:.1f} ms "
              f"here, {attach_other_s * 1e3:.1f} ms from a second driver; load/attach = {load_s / attach_other_s:.0f}x",
              flush=True)

        retriever = shards.retriever()
        rng = np.random.default_rng(1)
        queries = rng.standard_normal((max(args.batches), args.dim), dtype=np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        loop = asyncio.new_event_loop()
        latency: dict[int, dict[str, float]] = {}
        for b in args.batches:
            q = queries[:b]
            assert [[h.passage_id for h in hs] for hs in retriever.search(q, args.k).hits] == \
                [[h.passage_id for h in hs] for hs in loop.run_until_complete(retriever.search_async(q, args.k)).hits]
            sync, asyn = [], []
            for _ in range(args.repeats):  # alternate, so drift in the machine hits both paths alike
                t0 = time.perf_counter()
                retriever.search(q, args.k)
                sync.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                loop.run_until_complete(retriever.search_async(q, args.k))
                asyn.append(time.perf_counter() - t0)
            latency[b] = {"sync_ms": statistics.median(sync) * 1e3, "async_ms": statistics.median(asyn) * 1e3,
                          "sync_p95_ms": float(np.percentile(sync, 95)) * 1e3,
                          "async_p95_ms": float(np.percentile(asyn, 95)) * 1e3}
            latency[b]["async_over_sync"] = latency[b]["async_ms"] / latency[b]["sync_ms"]
            print(f"batch {b}: sync {latency[b]['sync_ms']:.2f} ms (p95 {latency[b]['sync_p95_ms']:.2f}), async "
                  f"{latency[b]['async_ms']:.2f} ms (p95 {latency[b]['async_p95_ms']:.2f}); async/sync = "
                  f"{latency[b]['async_over_sync']:.2f}", flush=True)
        shards.retire()
        emit({"bench": "index_service", "n": args.n, "dim": args.dim, "shards": args.shards, "k": args.k,
              "repeats": args.repeats, "load_s": load_s, "attach_s": attach_s, "attach_second_driver_s": attach_other_s,
              "latency": latency})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
