"""The main job: from a fresh checkout to a served, evaluated RAG model in one command.

``rag-ray quickstart`` starts a private local Ray and runs every part of the system in order:
index squad-open with Ray Data into FAISS shard actors, warm up the reader and fine-tune RAG with
Ray Train within a time budget, evaluate (EM/F1 on dev questions; recall@5 dense vs. BM25), deploy
the Ray Serve application, ask three dev questions over HTTP and print the answers with their
passages. A finished index and model are reused on the next run. Ray's own output goes to a log
file; the terminal gets one line per step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from rag_ray.errors import RagRayError

REPO = Path(__file__).resolve().parents[1]
#: measured on 2 cores with bf16 (docs/results.md): seconds per optimizer step
READER_STEP_S, RAG_STEP_S = 1.65, 2.6


@dataclass(frozen=True)
class QuickstartConfig:
    data: str | None = None                 # a squad-open directory; default $RAG_RAY_DATA, ../shared/data, or download
    index: str = "indexes/squad-open"
    workdir: str = "runs/quickstart"
    budget_minutes: float = 13.0            # training time (reader warm-up, then RAG): ~17 min in all on 2 cores
    reader_share: float = 0.75
    eval_questions: int = 200
    port: int = 8000
    keep: bool = True
    log_file: str = "runs/quickstart/quickstart.log"


class Steps:
    """Numbered one-line progress: ``[2/7] indexing squad-open ... done in 1m52s: 3,526 passages``."""

    def __init__(self, total: int, out=sys.stdout) -> None:
        self.total, self.n, self.out = total, 0, out

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[dict]:
        self.n += 1
        print(f"[{self.n}/{self.total}] {what} ...", end="", file=self.out, flush=True)
        start, note = time.perf_counter(), {}
        try:
            yield note
        except BaseException:
            print(" failed", file=self.out, flush=True)
            raise
        seconds = time.perf_counter() - start
        print(f" done in {int(seconds // 60)}m{int(seconds % 60):02d}s" + (f": {note['text']}" if note else ""),
              file=self.out, flush=True)


@contextlib.contextmanager
def ray_output_to(log_file: Path) -> Iterator:
    """Send stdout and stderr (Ray's INFO chatter, progress bars, worker prints, C++ logs) and
    Python logging to ``log_file``; yields a stream to the real terminal for the progress lines."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
    with open(log_file, "a") as f:
        for fd in (1, 2):
            os.dup2(f.fileno(), fd)
        handler = logging.StreamHandler(f)
        root = logging.getLogger()
        old_handlers, root.handlers = root.handlers, [handler]
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.handlers = old_handlers
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.close()


def run_quickstart(cfg: QuickstartConfig) -> dict:
    from rag_ray.runtime import init_ray

    if cfg.data:
        os.environ["RAG_RAY_DATA"] = str(Path(cfg.data).resolve())
    workdir = Path(cfg.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = Path(cfg.log_file)
    print(f"rag_ray quickstart: training budget {cfg.budget_minutes:g} min; Ray's output goes to {log_file}",
          flush=True)
    with ray_output_to(log_file) as terminal:
        import ray.data

        steps = Steps(6, terminal)
        with steps.step("starting a private Ray on 127.0.0.1") as note:
            init_ray(num_cpus=4, log_to_driver=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            note["text"] = f"{int(ray.cluster_resources().get('CPU', 0))} logical CPUs"
        with steps.step("indexing squad-open (Ray Data -> 2 FAISS shard actors)") as note:
            note["text"] = build_or_reuse_index(cfg.index)
        with steps.step(f"training: reader warm-up, then RAG-Sequence (Ray Train, {cfg.budget_minutes:g} min)") as note:
            model_dir, note["text"] = train_or_reuse(cfg, workdir)
        with steps.step(f"evaluating on {cfg.eval_questions} squad-open dev questions") as note:
            report = evaluate(model_dir, cfg)
            note["text"] = (f"EM {100 * report['dev_em']:.1f}, F1 {100 * report['dev_f1']:.1f}; recall@5 dense "
                            f"{report['recall@5_dense']:.3f} vs BM25 {report['recall@5_bm25']:.3f} (1,024 questions)")
        with steps.step("starting Ray Serve (HTTP on 127.0.0.1)") as note:
            url = serve_model(model_dir, cfg)
            note["text"] = url + "/"
        with steps.step("asking three dev questions over HTTP") as note:
            answers = ask_over_http(url, 3)
            note["text"] = f"{len(answers)} answers"
        (workdir / "quickstart.json").write_text(json.dumps({"config": asdict(cfg), "report": report}, indent=2))
    for a in answers:
        print(f"\nQ: {a['question']}\nA: {a['answer']}   (gold: {' | '.join(a['gold'])}; index {a['index_version']})")
        for p in a["passages"]:
            text = p["text"] if len(p["text"]) <= 200 else p["text"][:197] + "..."
            print(f"   posterior {p['posterior']:.2f}  {p['title']}: {text}")
    if cfg.keep:
        from ray import serve

        print(f"\nServing at {url}/ (web page) and {url}/docs (API). Ctrl-C stops.", flush=True)
        _stop_on_signals()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping...", flush=True)
        with ray_output_to(log_file):
            serve.shutdown()
    return {"url": url, "report": report, "answers": answers}


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (``kill``, a container stop) both shut Serve down cleanly, also where the
    shell started us in the background with SIGINT ignored (``make quickstart &``)."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def build_or_reuse_index(index: str) -> str:
    """The squad-open index at ``index``: reused when its current version was built from the same
    corpus file, else built as a new version."""
    from rag_ray.config import IndexConfig, load_config
    from rag_ray.datasets import resolve_data_path
    from rag_ray.indexing import run_index
    from rag_ray.manifest import IndexManifest, resolve_index

    corpus = resolve_data_path("squad-open")
    if (Path(index) / "current").is_file():
        manifest = IndexManifest.read(resolve_index(index))
        if manifest.corpus.get("paths") == [corpus]:
            return f"reused {resolve_index(index)} ({manifest.passage_count:,} passages)"
    report = run_index(load_config(IndexConfig, REPO / "jobs/configs/index_squad_open.yaml",
                                   {"out": index, "overwrite": True}))
    return f"{report['passages']:,} passages at {report['passages_per_second']} passages/s -> {report['version']}"


def train_or_reuse(cfg: QuickstartConfig, workdir: Path) -> tuple[Path, str]:
    """Reader warm-up then joint RAG training, each stopped by its share of the budget; the final
    model is kept at ``workdir/model`` and reused while its budget is at least the one asked for."""
    from rag_ray.config import TrainConfig, load_config
    from rag_ray.io import atomic_dir
    from rag_ray.training import run_training

    final = workdir / "model"
    record = workdir / "model.json"
    if (final / "rag_config.json").is_file() and record.is_file():
        done = json.loads(record.read_text())
        if done.get("budget_minutes", 0) >= cfg.budget_minutes and done.get("index") == str(Path(cfg.index).resolve()):
            return final, f"reused {final} (trained for {done['budget_minutes']:g} min)"
    for scratch in ("reader", "rag-seq"):  # Ray Train would resume a run dir of the same name
        shutil.rmtree(workdir / scratch, ignore_errors=True)
    reader_min = cfg.budget_minutes * cfg.reader_share
    rag_min = cfg.budget_minutes - reader_min
    runs = str(workdir.resolve())
    common = {"index": cfg.index, "checkpoint.storage_path": runs, "eval.questions": 0}
    reader = run_training(load_config(TrainConfig, REPO / "jobs/configs/train_reader_squad_open_cpu.yaml", {
        **common, "checkpoint.name": "reader", "optim.max_minutes": reader_min,
        "optim.max_steps": max(20, int(60 * reader_min / READER_STEP_S))}))
    rag = run_training(load_config(TrainConfig, REPO / "jobs/configs/train_squad_open_cpu.yaml", {
        **common, "checkpoint.name": "rag-seq", "model.init_from": reader["model"], "optim.max_minutes": rag_min,
        "optim.max_steps": max(10, int(60 * rag_min / RAG_STEP_S)), "optim.warmup_steps": 5}))
    if rag["model"] is None:
        raise RagRayError(f"training wrote no checkpoint; see {cfg.log_file}")
    with atomic_dir(final) as tmp:
        shutil.copytree(rag["model"], tmp, dirs_exist_ok=True)
    record.write_text(json.dumps({"budget_minutes": cfg.budget_minutes, "index": str(Path(cfg.index).resolve()),
                                  "reader_steps": reader["metrics"].get("step"), "rag_steps": rag["metrics"].get("step")}))
    return final, (f"reader {reader['metrics'].get('step')} steps, RAG {rag['metrics'].get('step')} steps "
                   f"(final loss {rag['metrics'].get('loss', float('nan')):.2f})")


def evaluate(model_dir: Path, cfg: QuickstartConfig) -> dict:
    """EM/F1/NLL on the first ``eval_questions`` dev questions (RAG-Sequence, K=3, fast decoding)
    and recall@5 of the trained query encoder vs. BM25 on all dev questions."""
    from rag_ray.datasets import read_questions
    from rag_ray.evaluation import evaluate_qa, evaluate_retrieval
    from rag_ray.model import RagModel
    from rag_ray.retriever import Retriever

    model = RagModel.from_pretrained(model_dir)
    retriever = Retriever.load(cfg.index, query_encoder=model.query_encoder)
    try:
        dev = read_questions("squad-open:dev")
        rows = [{"question": e.question, "answers": list(e.answers), "doc_id": e.doc_id or ""}
                for e in dev[: cfg.eval_questions]]
        report = evaluate_qa(model, retriever, rows, mode="sequence", n_docs=3, decoding="fast", num_beams=1,
                             max_new_tokens=16)
        recall = evaluate_retrieval(retriever, model.query_encoder, dev, cfg.index, ks=(5,))
    finally:
        retriever.shutdown()
    report["recall@5_dense"] = recall["dense"]["recall@5"]
    report["recall@5_bm25"] = recall["bm25"]["recall@5"]
    return report


def serve_model(model_dir: Path, cfg: QuickstartConfig) -> str:
    import socket

    from rag_ray.config import ServeConfig, load_config
    from rag_ray.serving.app import run_serve

    port = cfg.port
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:  # taken: let the OS pick a free one
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                port = free.getsockname()[1]
    url = run_serve(load_config(ServeConfig, overrides={"model": str(model_dir), "index": cfg.index, "port": port}))
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return url
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RagRayError(f"the service at {url} did not become healthy within 120 s; see {cfg.log_file}")
        time.sleep(1)


def ask_over_http(url: str, n: int) -> list[dict]:
    """Three real dev questions through POST /v1/answer, as any client would send them."""
    from rag_ray.datasets import read_questions

    out = []
    for e in read_questions("squad-open:dev")[:n]:
        body = json.dumps({"question": e.question, "decoding": "sequence-fast", "n_docs": 3}).encode()
        request = urllib.request.Request(url + "/v1/answer", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            out.append({**json.loads(r.read()), "gold": list(e.answers)})
    return out
