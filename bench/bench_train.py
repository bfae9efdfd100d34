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
    """The baseline: the same steps as train_loop_per_worker, in this process, no Ray Train."""
    import torch

    from rag_ray.datasets import read_questions
    from rag_ray.training import Prefetcher, build_model, build_optimizer, qa_rows

    torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, torch.device("cpu"))
    model.train()
    optimizer, scheduler = build_optimizer(model, cfg)
    rows = qa_rows(read_questions(cfg.train))
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    prefetch = Prefetcher(model, retriever, cfg.n_docs, cfg.prefetch)
    start = time.perf_counter()  # same span as the Ray loop's: first retrieval to last update
    pending = prefetch.submit([r["question"] for r in batches[0]])
    for step in range(cfg.max_steps):
        batch = batches[step]
        questions = [r["question"] for r in batch]
        result = prefetch.get(pending, questions)
        pending = prefetch.submit([r["question"] for r in batches[step + 1]])
        out = model.loss(questions, [r["answer"] for r in batch], result.hits, result.vectors)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
        optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    prefetch.close()
    return {"steps": cfg.max_steps, "seconds": seconds, "samples_per_s": cfg.max_steps * cfg.batch_size / seconds}


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
    common = {"index": args.index, "train": args.train, "dev": None, "eval_questions": 0, "init_from": args.init_from,
              "n_docs": args.n_docs, "batch_size": args.batch_size, "max_steps": args.steps,
              "checkpoint_every": 10**6, "eval_every": 10**6, "storage_path": storage, "max_failures": 0,
              "shuffle": False}  # both sides read the training questions in file order: identical batches
    cfg = load_config(TrainConfig, overrides={**common, "torch_threads": args.threads})
    retriever = Retriever.load(args.index)
    base = plain_loop(cfg, retriever)
    retriever.shutdown()
    print(f"plain loop: {base['samples_per_s']:.2f} samples/s", flush=True)

    rows = {}
    for workers in (1, 2):
        threads = max(1, args.threads // workers)
        run = load_config(TrainConfig, overrides={**common, "torch_threads": threads, "num_workers": workers,
                                                  "cpus_per_worker": threads, "name": f"bench-{workers}w"})
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
