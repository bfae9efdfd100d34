"""Training throughput: the Ray Train loop vs. a plain single-process PyTorch loop.

Same model (the offline default unless --init-from), same batches (squad-open train questions),
same retrieval (the same IndexShard actors), same threads. Then Ray Train with 2 workers:

    python bench/bench_train.py --index indexes/squad-open --steps 30 --batch-size 4 --n-docs 3 --threads 2
"""

from __future__ import annotations

import argparse
import os
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
    base = plain_loop(cfg, retriever)
    retriever.shutdown()
    print(f"plain loop: {base['samples_per_s']:.2f} samples/s; split {base['time_split_s']}", flush=True)

    rows = {}
    for workers in (1, 2):
        threads = max(1, args.threads // workers)
        run = load_config(TrainConfig, overrides={**common, "scaling.torch_threads": threads,
                                                  "scaling.num_workers": workers, "scaling.cpus_per_worker": threads,
                                                  "checkpoint.name": f"bench-{workers}w"})
        report = run_training(run)
        m = report["metrics"]
        rows[workers] = {"samples_per_s": m["samples_per_s"], "steps": m["step"], "threads_per_worker": threads,
                         "time_split_s": {k: m[f"time_{k}_s"] for k in ("retrieve", "forward", "backward", "optimizer")},
                         "wall_seconds": report["wall_seconds"]}
        print(f"ray train, {workers} worker(s) x {threads} thread(s): {m['samples_per_s']:.2f} samples/s "
              f"(x{m['samples_per_s'] / base['samples_per_s']:.2f} of plain); split {rows[workers]['time_split_s']}", flush=True)
    emit({"bench": "train", "batch_size": args.batch_size, "n_docs": args.n_docs, "threads": args.threads,
          "plain": base, "ray_train": rows,
          "ratio_1_worker": rows[1]["samples_per_s"] / base["samples_per_s"],
          "ratio_2_workers": rows[2]["samples_per_s"] / base["samples_per_s"]})


if __name__ == "__main__":
    main()
