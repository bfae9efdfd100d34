"""Joint RAG fine-tuning with Ray Train: one ``train_loop_per_worker``, topology in ScalingConfig.

Each step a worker embeds its batch's questions, asks the ``IndexShard`` actors for the top-K
passages and their stored vectors (workers hold no copy of the index), recomputes p(z|x) from
the query encoder's output so the answer loss trains it, and updates query encoder + generator
under DDP (gloo on CPU, nccl on GPU). Retrieval for the next batch runs in a background thread
while the current batch computes. The passage encoder and the index stay frozen.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Sequence

import torch

from rag_ray.config import TrainConfig, load_config, to_dict
from rag_ray.datasets import QAExample, read_questions
from rag_ray.evaluation import evaluate_qa, retrieve
from rag_ray.types import Passage, SearchResult


TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"


# ----------------------------------------------------------------------------- model setup

def build_model(cfg: TrainConfig, device: torch.device):
    """The RagModel to train: from a saved model directory, or fresh from checkpoints."""
    from rag_ray.model import RagModel

    common = {"mode": model_mode(cfg.mode), "n_docs": cfg.n_docs, "label_smoothing": cfg.label_smoothing}
    if cfg.init_from:
        model = RagModel.from_pretrained(cfg.init_from, device=device)
        model.config = type(model.config)(**{**asdict(model.config), **common})
    else:
        model = RagModel.from_components(cfg.query_encoder, cfg.generator, copy_head=cfg.copy_head,
                                         device=device, **common)
    if cfg.max_source_length:
        model.generator.max_source_length = cfg.max_source_length
    if cfg.max_target_length:
        model.generator.max_target_length = cfg.max_target_length
    if cfg.freeze_query_encoder or cfg.mode in ("closed_book", "reader"):
        model.query_encoder.requires_grad_(False)
    return model


def model_mode(train_mode: str) -> str:
    """The RagModel mode a training mode produces: a reader is used (and evaluated) as RAG-Sequence."""
    return "sequence" if train_mode == "reader" else train_mode


def build_optimizer(model, cfg: TrainConfig):
    """AdamW with a smaller learning rate for the query encoder (it starts well trained), an
    optionally larger one for the copy head (new weights), and linear warm-up then linear decay
    to zero at ``max_steps``."""
    head = [p for p in model.generator.model.head_parameters() if p.requires_grad] if model.generator.copy_head else []
    head_ids = {id(p) for p in head}
    groups = [{"params": [p for p in model.generator.parameters() if p.requires_grad and id(p) not in head_ids],
               "lr": cfg.lr}]
    if head:  # the copy head starts from random weights
        groups.append({"params": head, "lr": cfg.copy_head_lr or cfg.lr})
    q_params = [p for p in model.query_encoder.parameters() if p.requires_grad]
    if q_params:
        groups.append({"params": q_params, "lr": cfg.query_encoder_lr or cfg.lr})
    # fused AdamW: one kernel over all parameters (CPU and CUDA), measured 5.6% of a CPU step unfused
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=True)

    def schedule(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (cfg.max_steps - step) / max(1, cfg.max_steps - cfg.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class LossModule(torch.nn.Module):
    """What DDP wraps: ``forward`` is one RAG loss computation, so DDP's gradient hooks fire."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, questions, answers, passages, doc_vectors, question_vectors=None, n_docs=None):
        out = self.model.loss(questions, answers, passages, doc_vectors, question_vectors=question_vectors,
                              n_docs=n_docs)
        return out.loss, out.doc_log_prior.detach()


# ----------------------------------------------------------------------------- retrieval

class Prefetcher:
    """Runs the retrieval of batch t+1 on a thread while batch t computes (Ray calls release the
    GIL while they wait, so shard search overlaps the local forward/backward)."""

    def __init__(self, model, retriever, k: int, enabled: bool) -> None:
        self.model, self.retriever, self.k = model, retriever, k
        self.pool = ThreadPoolExecutor(max_workers=1) if enabled else None

    def submit(self, questions: Sequence[str]) -> Future | SearchResult | None:
        if self.retriever is None:
            return None
        if self.pool is None:
            return None  # retrieved synchronously in get()
        # Encode in the caller's thread (fast, avoids two threads in one module); search async.
        q = self.model.query_encoder.encode(list(questions), batch_size=len(questions))
        return self.pool.submit(self.retriever.search, q, self.k)

    def get(self, pending, questions: Sequence[str]) -> SearchResult | None:
        if self.retriever is None:
            return None
        if pending is None:
            return retrieve(self.model, self.retriever, questions, self.k)
        return pending.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False)


# ----------------------------------------------------------------------------- data

def qa_rows(examples: Sequence[QAExample]) -> list[dict]:
    """Training rows: the first gold answer is the target; all answers are kept for scoring."""
    return [{"question": e.question, "answer": e.answers[0], "answers": json.dumps(list(e.answers)),
             "doc_id": e.doc_id or ""} for e in examples if e.answers]


def with_gold_passages(rows: list[dict], corpus: str) -> tuple[list[dict], int]:
    """Reader rows: each question's gold passage (title, text), the passage of its doc_id that
    contains its answer, cut exactly as the index cuts documents. Rows whose doc_id is unknown or
    whose answer is in none of the doc's passages (it straddles a cut) are dropped and counted."""
    from rag_ray.corpus import expand_paths, read_passages
    from rag_ray.datasets import resolve_data_path

    by_doc: dict[str, list] = {}
    for path in expand_paths(resolve_data_path(corpus)):
        for passage in read_passages(path):
            by_doc.setdefault(passage.doc_id, []).append(passage)
    out = []
    for row in rows:
        answer = row["answer"].lower()
        gold = next((p for p in by_doc.get(row["doc_id"], []) if answer in p.text.lower()), None)
        if gold is not None:
            out.append({**row, "title": gold.title, "text": gold.text})
    if not out:
        raise ValueError(f"mode 'reader': no training question has a gold passage in {corpus} (questions need "
                         "a doc_id that is a document id of the corpus)")
    return out, len(rows) - len(out)


def cycle_batches(shard, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[dict]:
    """Endless batches from this worker's dataset shard, reshuffled locally each epoch (or in
    file order with ``shuffle=False``, which benchmarks use to feed identical batches)."""
    epoch = 0
    while True:
        n = 0
        shuffling = {"local_shuffle_buffer_size": max(4 * batch_size, 256), "local_shuffle_seed": seed + epoch}
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy",
                                        **(shuffling if shuffle else {})):
            n += 1
            yield batch
        if n == 0:
            raise ValueError(f"a worker's share of the training set is smaller than one batch of {batch_size}; "
                             "use fewer workers, a smaller batch_size or more data")
        epoch += 1


# ----------------------------------------------------------------------------- evaluation

# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: str, model, optimizer, scheduler, step: int, metrics: dict) -> None:
    """Model directory (safetensors) + optimizer/scheduler state + step, in one folder."""
    model.save_pretrained(Path(directory) / MODEL_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step},
               Path(directory) / TRAIN_STATE)
    (Path(directory) / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_checkpoint(directory: str, cfg: TrainConfig, device: torch.device):
    """(model, optimizer, scheduler, step) from a checkpoint folder; tensors only (weights_only)."""
    model = build_model(load_config(TrainConfig, overrides={**_flat(to_dict(cfg)),
                                                            "init_from": str(Path(directory) / MODEL_DIR)}), device)
    optimizer, scheduler = build_optimizer(model, cfg)
    state = torch.load(Path(directory) / TRAIN_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return model, optimizer, scheduler, int(state["step"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ----------------------------------------------------------------------------- the loop

def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: config = {"cfg": TrainConfig as dict, "retriever": Retriever|None, "dev": rows}."""
    import ray.train
    import ray.train.torch

    cfg = load_config(TrainConfig, overrides=_flat(config["cfg"]))
    retriever = config.get("retriever")
    dev_rows = config.get("dev") or []
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.torch_threads:
        torch.set_num_threads(cfg.torch_threads)
    torch.manual_seed(cfg.seed)
    device = ray.train.torch.get_device()

    # A restarted worker resumes from this run's latest checkpoint; a new run may start from
    # another run's checkpoint (``resume_from``).
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.resume_from:
        checkpoint = ray.train.Checkpoint.from_directory(cfg.resume_from)
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            model, optimizer, scheduler, step = load_checkpoint(ckpt_dir, cfg, device)
        resumed_from = step
    else:
        model = build_model(cfg, device)
        optimizer, scheduler = build_optimizer(model, cfg)
        step, resumed_from = 0, None
    model.train()
    ddp = ray.train.torch.prepare_model(LossModule(model), parallel_strategy_kwargs={"find_unused_parameters": True})
    params = [p for p in model.parameters() if p.requires_grad]
    batches = cycle_batches(ray.train.get_dataset_shard("train"), cfg.batch_size, cfg.seed + step + 1000 * rank,
                            cfg.shuffle)
    prefetch = Prefetcher(model, retriever if cfg.mode in ("sequence", "token") else None, cfg.n_docs, cfg.prefetch)
    # reader mode: one gold passage per question, so p(z|x) = 1 whatever q·d is
    zero_q = torch.zeros(cfg.batch_size, model.query_encoder.dim, device=device) if cfg.mode == "reader" else None

    timings = {"retrieve": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    retrieval_log: list[dict] = []
    data_start = time.perf_counter()
    batch = next(batches)  # starts Ray Data's streaming split: a fixed cost, reported on its own
    first_batch_s = time.perf_counter() - data_start
    run_start, samples = time.perf_counter(), 0
    pending = prefetch.submit(list(batch["question"]))
    while step < cfg.max_steps:
        questions, answers = [str(q) for q in batch["question"]], [str(a) for a in batch["answer"]]
        t0 = time.perf_counter()
        result = prefetch.get(pending, questions)
        t1 = time.perf_counter()
        next_batch = next(batches)
        pending = prefetch.submit([str(q) for q in next_batch["question"]])
        t1b = time.perf_counter()
        if cfg.log_retrievals and rank == 0 and result is not None and len(retrieval_log) < 5:
            retrieval_log.append({"step": step, "questions": questions,
                                  "passage_ids": [[h.passage_id for h in hits] for hits in result.hits]})
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            if cfg.mode == "reader":  # one gold passage per question: p(z|x) = 1, the loss is the generator's
                gold = [[Passage("", "", str(t), str(x))] for t, x in zip(batch["title"], batch["text"])]
                loss, _ = ddp(questions, answers, gold, zero_q[: len(questions), None], zero_q[: len(questions)],
                              n_docs=1)
            else:
                loss, _ = ddp(questions, answers, result.hits if result else None,
                              result.vectors if result else None)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        t4 = time.perf_counter()
        timings["retrieve"] += (t1 - t0) + (t1b - t1)
        timings["forward"] += t2 - t1b
        timings["backward"] += t3 - t2
        timings["optimizer"] += t4 - t3
        step += 1
        samples += len(questions) * world
        window_loss += float(loss.detach())
        window_steps += 1
        batch = next_batch

        stop = _agree_to_stop(cfg, run_start, world, device)
        if rank == 0 and (step % cfg.log_every == 0 or step == 1):
            elapsed = time.perf_counter() - window_start
            # print, not logging: Ray forwards worker stdout to the driver and `ray job logs`.
            print(f"[rag_ray.train] step {step}/{cfg.max_steps} loss {window_loss / window_steps:.4f} | "
                  f"{window_steps / elapsed:.2f} steps/s {window_steps * len(questions) * world / elapsed:.1f} samples/s"
                  f" | lr {scheduler.get_last_lr()[0]:.2e}", flush=True)
        if step % cfg.checkpoint_every == 0 or step % cfg.eval_every == 0 or step >= cfg.max_steps or stop:
            wall = time.perf_counter() - run_start
            metrics = {"step": step, "loss": window_loss / max(1, window_steps), "samples": samples,
                       "steps_per_s": (step - (resumed_from or 0)) / wall, "samples_per_s": samples / wall,
                       "wall_seconds": round(wall, 1), "first_batch_seconds": round(first_batch_s, 2),
                       "resumed_from_step": resumed_from, "world_size": world,
                       **{f"time_{k}_s": round(v, 2) for k, v in timings.items()}}
            final = step >= cfg.max_steps or stop
            if rank == 0 and dev_rows and cfg.eval_questions and (step % cfg.eval_every == 0 or final):
                metrics.update(evaluate_qa(model, retriever if cfg.mode != "closed_book" else None,
                                           dev_rows[: cfg.eval_questions], mode=model_mode(cfg.mode), n_docs=cfg.n_docs,
                                           decoding=cfg.eval_decoding, num_beams=cfg.eval_num_beams,
                                           max_new_tokens=cfg.eval_max_new_tokens))
                print(f"[rag_ray.train] eval at step {step}: "
                      f"{ {k: round(v, 4) for k, v in metrics.items() if k.startswith('dev_')} }", flush=True)
            if retrieval_log:
                metrics["retrieval_log"] = retrieval_log
            with tempfile.TemporaryDirectory() as tmp:
                ckpt = None
                if rank == 0:
                    save_checkpoint(tmp, model, optimizer, scheduler, step, metrics)
                    ckpt = ray.train.Checkpoint.from_directory(tmp)
                ray.train.report(metrics, checkpoint=ckpt)
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            if stop:
                break
    prefetch.close()


def _agree_to_stop(cfg: TrainConfig, run_start: float, world: int, device: torch.device) -> bool:
    """All workers stop at the same step when the time budget runs out (rank 0 decides)."""
    if cfg.max_minutes is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - run_start > 60 * cfg.max_minutes)], device=device)
    if world > 1:
        torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


# ----------------------------------------------------------------------------- driver

def check_index_compatibility(cfg: TrainConfig) -> None:
    """Fail on the driver, before any worker starts, if the query encoder cannot search the index."""
    from rag_ray.manifest import EncoderInfo, IndexManifest

    if cfg.mode == "closed_book" or not cfg.index:
        return
    manifest = IndexManifest.read(cfg.index)
    path = str(Path(cfg.init_from) / "query_encoder") if cfg.init_from else cfg.query_encoder
    manifest.check_query_encoder(EncoderInfo.from_checkpoint(path))
    if manifest.passage_count < cfg.n_docs:
        raise ValueError(f"n_docs={cfg.n_docs} but the index holds only {manifest.passage_count} passages")


def run_training(cfg: TrainConfig) -> dict:
    """Start shard actors, fit the TorchTrainer, return (and optionally write) the final report."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rag_ray.retriever import Retriever

    check_index_compatibility(cfg)
    train = qa_rows(read_questions(cfg.train))
    if cfg.mode == "reader":
        train, dropped = with_gold_passages(train, cfg.corpus)
        print(f"[rag_ray.train] reader: {len(train)} questions with a gold passage, {dropped} without", flush=True)
    # a reader is evaluated over retrieved passages, so only when an index is given
    evaluate = cfg.dev and cfg.eval_questions and (cfg.mode != "reader" or cfg.index)
    dev = read_questions(cfg.dev, limit=cfg.eval_questions or None) if evaluate else []
    needs_index = cfg.mode in ("sequence", "token") or (cfg.mode == "reader" and bool(dev))
    retriever = Retriever.load(cfg.index) if needs_index else None
    storage = cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).resolve())
    if not cfg.shuffle:  # file order end to end: Ray Data may otherwise interleave blocks
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "retriever": retriever,
                           "dev": [{"question": e.question, "answers": list(e.answers), "doc_id": e.doc_id or ""}
                                   for e in dev]},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.max_failures)),
        # A few blocks, not Ray Data's default hundreds: the rows are small and already in memory,
        # and on a small machine per-block tasks compete with training for the same cores.
        datasets={"train": ray.data.from_items(train, override_num_blocks=max(4, 2 * cfg.num_workers))},
    )
    start = time.perf_counter()
    try:
        result = trainer.fit()
    finally:
        if retriever is not None:
            retriever.shutdown()
    metrics = dict(result.metrics or {})
    report = {"config": to_dict(cfg), "metrics": metrics, "wall_seconds": round(time.perf_counter() - start, 1),
              "checkpoint": result.checkpoint.path if result.checkpoint else None,
              "model": str(Path(result.checkpoint.path) / MODEL_DIR) if result.checkpoint else None,
              "train_questions": len(train), "dev_questions": len(dev)}
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(cfg.report).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=2))
        os.replace(tmp, cfg.report)
    return report
