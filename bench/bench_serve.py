"""Ray Serve under load: the HTTP service vs. the same pipeline in one process, batching on/off,
autoscaling under a step of load, and an index swap under load.

Traffic is real questions (NQ-open, ../shared/data/nq-open/questions.jsonl or $RAG_RAY_DATA/..),
sent by closed-loop aiohttp clients (each sends its next request when the last one returns).
The model is ``--model`` or, by default, the untrained default RagModel (MiniLM query encoder,
BERT2BERT-from-MiniLM with the copy head): latency depends on the architecture, not the weights.
The index is ``--index`` or squad-open built here. In one run:
  1. in-process: RagPipeline.answer one question at a time (the baseline), same decoding/threads;
  2. Serve, batching on (max_batch_size 8), 1 replica: 1, 4 and 16 clients;
  3. Serve, batching off (max_batch_size 1), 1 replica: 16 clients;
  4. autoscaling 1..2 replicas: 1 client, a step to 12, back to 1; replicas, QPS and p99 per
     second, plotted to docs/serve-autoscaling.png;
  5. an index swap (to a copy of the index as a new version) under 4 clients.

    python bench/bench_serve.py --seconds 40 --out docs/serve-autoscaling.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402

from _common import emit  # noqa: E402

DECODE = {"decoding": "token-greedy", "n_docs": 3, "max_new_tokens": 8}


def nq_questions(path: str | None) -> list[str]:
    from rag_ray.datasets import read_questions

    candidates = [path, os.path.join(os.environ.get("RAG_RAY_DATA", ""), "nq-open/questions.jsonl"),
                  str(Path(__file__).resolve().parents[2] / "shared/data/nq-open/questions.jsonl")]
    found = next((c for c in candidates if c and os.path.isfile(c)), None)
    if found is None:
        raise SystemExit("NQ-open questions not found: give --questions or set RAG_RAY_DATA")
    return [e.question for e in read_questions(found)]


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    a = np.array(latencies) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99))}


async def closed_loop(url: str, questions: list[str], clients, seconds: float, log: list) -> None:
    """``clients``: a number, or a function of elapsed seconds giving how many clients are active.
    Appends (start, end, status, index_version) per request to ``log``."""
    import aiohttp

    start = time.monotonic()
    active = clients if callable(clients) else (lambda _t: clients)
    n_max = max(active(t) for t in np.arange(0, seconds, 0.5)) if callable(clients) else clients

    async def client(i: int, session) -> None:
        k = i
        while (now := time.monotonic() - start) < seconds:
            if i >= active(now):
                await asyncio.sleep(0.2)
                continue
            body = {"question": questions[k % len(questions)], **DECODE}
            k += n_max
            t0 = time.monotonic()
            try:
                async with session.post(url, json=body) as r:
                    reply = await r.json(content_type=None)
                    log.append((t0, time.monotonic(), r.status, reply.get("index_version")))
            except aiohttp.ClientError:
                log.append((t0, time.monotonic(), 599, None))

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(i, session) for i in range(n_max)))


def summarize(log: list, seconds: float) -> dict:
    ok = [end - start for start, end, status, _ in log if status == 200]
    return {"requests": len(log), "errors": sum(1 for r in log if r[2] != 200), "qps": len(ok) / seconds,
            **percentiles(ok)}


def deploy(model: str, index: str, port: int, max_batch_size: int, min_replicas: int, max_replicas: int,
           threads: int = 1) -> str:
    from ray import serve

    from rag_ray.config import ServeConfig, load_config
    from rag_ray.serving.app import build_app

    if "rag" in serve.status().applications:
        serve.delete("rag")
    cfg = load_config(ServeConfig, overrides={
        "model": model, "index": index, "port": port, "max_batch_size": max_batch_size, "batch_wait_timeout_s": 0.05,
        "autoscaling": {"min_replicas": min_replicas, "max_replicas": max_replicas, "replica_cpus": 0.5,
                        "torch_threads": threads, "target_ongoing_requests": 2, "upscale_delay_s": 5,
                        "downscale_delay_s": 20}})
    serve.run(build_app(cfg), name="rag", route_prefix="/", blocking=False)
    return f"http://127.0.0.1:{port}"


def replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("rag")
    return int(app.deployments["RagModelServer"].replica_states.get("RUNNING", 0)) if app else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a saved RagModel (default: the untrained default model)")
    parser.add_argument("--index", help="an index root (default: squad-open, built here)")
    parser.add_argument("--questions", help="NQ-open questions.jsonl")
    parser.add_argument("--seconds", type=float, default=40.0, help="per load level")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--out", default="docs/serve-autoscaling.png")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per model replica (and in-process)")
    parser.add_argument("--parts", nargs="+", default=["load", "autoscaling", "swap"],
                        choices=["load", "autoscaling", "swap"], help="load = the baseline, 1/4/16 clients, batching")
    args = parser.parse_args()

    from ray import serve

    from rag_ray.config import IndexConfig, load_config
    from rag_ray.indexing import run_index
    from rag_ray.model import RagModel
    from rag_ray.runtime import init_ray
    from rag_ray.shards import ShardSet

    questions = nq_questions(args.questions)
    tmp = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    results: dict = {"bench": "serve", "decode": DECODE, "seconds": args.seconds, "questions": len(questions),
                     "threads": args.threads}
    try:
        init_ray(num_cpus=4, object_store_memory=1024**3)
        index = args.index
        if index is None:
            index = str(tmp / "indexes" / "squad-open")
            run_index(load_config(IndexConfig, overrides={"corpus": ["squad-open"], "out": index, "shards": 2}))
        model_dir = args.model
        if model_dir is None:
            model_dir = str(tmp / "model")
            RagModel.from_components(device="cpu").save_pretrained(model_dir)

        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        shards = ShardSet.start(index)
        if "load" in args.parts:
            load_levels(args, questions, model_dir, index, shards, results)
        if "autoscaling" in args.parts:
            autoscaling(args, questions, model_dir, index, results)
        if "swap" in args.parts:
            swap_under_load(args, questions, model_dir, index, results)
        shards.retire()
        emit(results)
    finally:
        serve.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def load_levels(args, questions, model_dir, index, shards, results) -> None:
    """In-process baseline, then 1 replica with batching on (1/4/16 clients) and off (16 clients)."""
    import torch

    from rag_ray.model import RagModel
    from rag_ray.pipeline import RagPipeline

    torch.set_num_threads(args.threads)
    pipeline = RagPipeline(RagModel.from_pretrained(model_dir, device="cpu").eval(), shards.retriever())
    mode, decoding = DECODE["decoding"].split("-")
    lat, start, i = [], time.monotonic(), 0
    while time.monotonic() - start < args.seconds:
        t0 = time.monotonic()
        pipeline.answer([questions[i % len(questions)]], mode=mode, decoding=decoding, n_docs=DECODE["n_docs"],
                        max_new_tokens=DECODE["max_new_tokens"])
        lat.append(time.monotonic() - t0)
        i += 1
    results["in_process"] = {"requests": len(lat), "qps": len(lat) / args.seconds, **percentiles(lat)}
    print("in-process:", json.dumps(results["in_process"]), flush=True)
    del pipeline

    results["serve"] = {}
    for batch in (8, 1):
        url = deploy(model_dir, index, args.port, batch, 1, 1, args.threads) + "/v1/answer"
        asyncio.run(closed_loop(url, questions, 1, 5.0, []))  # warm-up
        for clients in ((1, 4, 16) if batch == 8 else (16,)):
            log: list = []
            asyncio.run(closed_loop(url, questions, clients, args.seconds, log))
            row = summarize(log, args.seconds)
            results["serve"][f"batch{batch}_clients{clients}"] = row
            print(f"serve batch={batch} clients={clients}:", json.dumps(row), flush=True)
    base = results["in_process"]["p50_ms"]
    results["overhead_p50_1_client"] = results["serve"]["batch8_clients1"]["p50_ms"] / base
    results["batching_qps_ratio_16_clients"] = (results["serve"]["batch8_clients16"]["qps"]
                                                / results["serve"]["batch1_clients16"]["qps"])
    print(f"Serve/in-process p50 at 1 client: {results['overhead_p50_1_client']:.2f}; batching on/off QPS at "
          f"16 clients: {results['batching_qps_ratio_16_clients']:.2f}", flush=True)



def autoscaling(args, questions, model_dir, index, results) -> None:
    """1..2 replicas under 1 client, a step to 12 clients, back to 1; plotted to ``args.out``."""
    url = deploy(model_dir, index, args.port, 8, 1, 2) + "/v1/answer"
    step = (30.0, 30.0 + 2 * args.seconds, 60.0 + 2 * args.seconds + 40.0)
    clients = lambda t: 12 if step[0] <= t < step[1] else 1  # noqa: E731
    timeline: list = []
    stop = threading.Event()
    t_start = time.monotonic()

    def watch() -> None:
        while not stop.is_set():
            timeline.append((time.monotonic() - t_start, replicas()))
            time.sleep(1.0)

    watcher = threading.Thread(target=watch)
    watcher.start()
    log = []
    asyncio.run(closed_loop(url, questions, clients, step[2], log))
    stop.set()
    watcher.join()
    results["autoscaling"] = {"step_s": step, "replicas": timeline, **summarize(log, step[2]),
                              "max_replicas_seen": max(r for _, r in timeline)}
    plot(args.out, log, timeline, step, t_start)
    print("autoscaling:", json.dumps({k: v for k, v in results["autoscaling"].items() if k != "replicas"}),
          flush=True)



def swap_under_load(args, questions, model_dir, index, results) -> None:
    """Serve the current version, then swap to a copy of it (the next version) under 4 clients."""
    from rag_ray.manifest import resolve_index, set_current

    old = resolve_index(index)
    root = old.parent
    new_version = f"v{int(old.name[1:]) + 1:04d}"
    shutil.copytree(old, root / new_version)
    url = deploy(model_dir, str(old), args.port, 8, 1, 1)
    set_current(root, new_version)
    log = []
    swap_times: dict = {}

    def swap_later() -> None:
        from rag_ray.cli import main as cli

        time.sleep(args.seconds / 2)
        swap_times["start"] = time.monotonic()
        cli(["swap-index", "--url", url, "--index", str(root / new_version), "--json"])
        swap_times["end"] = time.monotonic()

    swapper = threading.Thread(target=swap_later)
    swapper.start()
    asyncio.run(closed_loop(url + "/v1/answer", questions, 4, args.seconds * 1.5, log))
    swapper.join()
    during = [r for r in log if r[1] >= swap_times["start"] and r[0] <= swap_times["end"]]
    results["swap"] = {**summarize(log, args.seconds * 1.5), "swap_seconds": swap_times["end"] - swap_times["start"],
                       "during": summarize(during, swap_times["end"] - swap_times["start"]),
                       "versions": sorted({r[3] for r in log if r[3]})}
    print("swap:", json.dumps(results["swap"]), flush=True)


def plot(path: str, log: list, timeline: list, step: tuple, t_start: float) -> None:
    """Replicas, QPS and p99 latency per 5-second window on one time axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = 5.0
    edges = np.arange(0, step[2] + window, window)
    qps, p99 = [], []
    for lo, hi in zip(edges[:-1], edges[1:]):
        done = [end - start for start, end, status, _ in log if status == 200 and lo <= end - t_start < hi]
        qps.append(len(done) / window)
        p99.append(np.percentile(done, 99) if done else np.nan)
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 6.5))
    axes[0].step([t for t, _ in timeline], [r for _, r in timeline], where="post", color="tab:blue")
    axes[0].set_ylabel("model replicas")
    axes[0].set_ylim(0, max(r for _, r in timeline) + 0.5)
    axes[1].plot(edges[:-1] + window / 2, qps, color="tab:green")
    axes[1].set_ylabel("answers/s")
    axes[2].plot(edges[:-1] + window / 2, p99, color="tab:red")
    axes[2].set_ylabel("p99 latency (s)")
    axes[2].set_xlabel("seconds")
    for ax in axes:
        ax.axvspan(step[0], step[1], color="0.9", zorder=0)
        ax.grid(alpha=0.3)
    axes[0].set_title("rag_ray on Ray Serve: 1 client, a step to 12 clients (shaded), back to 1")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
