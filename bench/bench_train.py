"""Training throughput: the Ray Train loop vs. a plain single-process PyTorch loop.

Same model (the offline default unless --init-from), same batches (squad-open train questions),
same retrieval (the same IndexShard actors), same threads. Then Ray Train with 2 workers:

    python bench/bench_train.py --index indexes/squad-open --steps 20 --batch-size 4 --n-docs 3 --threads 2 --pairs 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import emit  # noqa: E402


def plain_loop(cfg, retriever) -> dict:
    """The baseline: train_loop_per_worker's ``setup`` and ``train_step`` in this process, no Ray Train."""
    import torch

    from rag_ray.datasets import read_questions
    from rag_ray.training import Prefetcher, qa_rows, setup, train_step

    state = setup(cfg, torch.device("cpu"))
    rows = qa_rows(read_questions(cfg.data.train))
    size = cfg.optim.batch_size
    batches = [{key: [r[key] for r in rows[i : i + size]] for key in ("question", "answer")}
               for i in range(0, len(rows), size)]
    prefetch = Prefetcher(state.model, retriever, cfg.model.n_docs, cfg.prefetch)
    start = time.perf_counter()  # same span as the Ray loop's: first retrieval to last update
    pending = prefetch.submit(batches[0]["question"])
    for step in range(cfg.optim.max_steps):
        t0 = time.perf_counter()
        result = prefetch.get(pending, batches[step]["question"])
        pending = prefetch.submit(batches[step + 1]["question"])
        state.timings["retrieve"] += time.perf_counter() - t0
        train_step(state, batches[step], result)
    seconds = time.perf_counter() - start
    prefetch.close()
    return {"steps": cfg.optim.max_steps, "seconds": seconds,
            "samples_per_s": cfg.optim.max_steps * size / seconds,
            "time_split_s": {k: round(v, 2) for k, v in state.timings.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="indexes/squad-open")
    parser.add_argument("--train", default="squad-open:train")
    parser.add_argument("--init-from")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--n-docs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pairs", type=int, default=3, help="plain / Ray Train pairs run in turn (median reported)")
    parser.add_argument("--two-workers", action="store_true", help="also 2 workers x threads/2 (DDP)")
    args = parser.parse_args()

    from rag_ray.config import TrainConfig, load_config
    from rag_ray.retriever import Retriever
    from rag_ray.runtime import init_ray
    from rag_ray.training import run_training

    init_ray(num_cpus=max(4, os.cpu_count() or 2))
    storage = tempfile.mkdtemp(prefix="bench_train_")
    common = {"index": args.index, "data.train": args.train, "data.dev": None, "eval.questions": 0,
              "model.init_from": args.init_from, "model.n_docs": args.n_docs, "optim.batch_size": args.batch_size,
              "optim.max_steps": args.steps, "checkpoint.every": 10**6, "eval.every": 10**6,
              "checkpoint.storage_path": storage, "checkpoint.max_failures": 0,
              "shuffle": False}  # both sides read the training questions in file order: identical batches
    cfg = load_config(TrainConfig, overrides={**common, "scaling.torch_threads": args.threads})
    retriever = Retriever.load(args.index)

    def ray_train(workers: int, tag: str) -> dict:
        threads = max(1, args.threads // workers)
        run = load_config(TrainConfig, overrides={**common, "scaling.torch_threads": threads,
                                                  "scaling.num_workers": workers, "scaling.cpus_per_worker": threads,
                                                  "checkpoint.name": f"bench-{workers}w-{tag}"})
        report = run_training(run)
        m = report["metrics"]
        row = {"samples_per_s": m["samples_per_s"], "steps": m["step"], "threads_per_worker": threads,
               "time_split_s": {k: m[f"time_{k}_s"] for k in ("retrieve", "forward", "backward", "optimizer")},
               "wall_seconds": report["wall_seconds"]}
        print(f"ray train, {workers} worker(s) x {threads} thread(s): {m['samples_per_s']:.2f} samples/s; "
              f"split {row['time_split_s']}", flush=True)
        return row

    # Pairs in turn (plain, Ray Train 1 worker, plain, ...): runs on this machine drift by +-10%,
    # so each ratio compares neighbours and the median of the pairs is reported.
    pairs = []
    for i in range(args.pairs):
        base = plain_loop(cfg, retriever)
        print(f"plain loop: {base['samples_per_s']:.2f} samples/s; split {base['time_split_s']}", flush=True)
        one = ray_train(1, str(i))
        pairs.append({"plain": base, "ray_train_1": one, "ratio": one["samples_per_s"] / base["samples_per_s"]})
        print(f"pair {i + 1}: ratio {pairs[-1]['ratio']:.2f}", flush=True)
    retriever.shutdown()
    result = {"bench": "train", "batch_size": args.batch_size, "n_docs": args.n_docs, "threads": args.threads,
              "pairs": pairs, "median_ratio_1_worker": statistics.median(p["ratio"] for p in pairs)}
    if args.two_workers:
        two = ray_train(2, "x")
        result["ray_train_2"] = two
        result["ratio_2_workers_vs_median_plain"] = two["samples_per_s"] / statistics.median(
            p["plain"]["samples_per_s"] for p in pairs)
    print(f"median ratio, Ray Train 1 worker / plain: {result['median_ratio_1_worker']:.2f}", flush=True)
    emit(result)


if __name__ == "__main__":
    main()
