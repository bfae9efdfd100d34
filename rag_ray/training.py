"""Joint RAG fine-tuning with Ray Train: one ``train_loop_per_worker``, topology in ScalingConfig.

Each step a worker embeds its batch's questions, asks the ``IndexShard`` actors for the top-K
passages and their stored vectors (workers hold no copy of the index), recomputes p(z|x) from
the query encoder's output so the answer loss trains it, and updates query encoder + generator
under DDP (gloo on CPU, nccl on GPU). Retrieval for the next batch runs in a background thread
while the current batch computes. The passage encoder and the index stay frozen, except with
``model.train_passage_encoder``: in the retriever warm-up (DPR's two towers) its passage encoder
is saved beside the model for a rebuilt index; in the rag objective p(z|x) scores the retrieved
passages re-embedded by it, and the index is rebuilt with it during training (rag_ray.refresh).

A worker runs ``setup`` (model, optimizer, schedule: fresh or from a checkpoint), then
``train_step`` once per batch, and every ``checkpoint.every`` / ``eval.every`` steps reports
metrics, a dev evaluation and a checkpoint. bench/bench_train.py times the same ``setup`` and
``train_step`` in a plain loop as its baseline.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from rag_ray.config import Objective, TrainConfig, to_dict
from rag_ray.corpus import embedding_text
from rag_ray.datasets import QAExample, read_questions
from rag_ray.encoders import Encoder
from rag_ray.errors import RagRayError
from rag_ray.io import atomic_write_text
from rag_ray.manifest import index_identity
from rag_ray.refresh import IndexRefresher, attach_refreshed, check_refresh_source, refresh_root
from rag_ray.reranker import Reranker
from rag_ray.evaluation import evaluate_qa, evaluate_retrieval, exact_recall, gold_hit, gold_passage
from rag_ray.types import Passage, SearchResult

if TYPE_CHECKING:
    from rag_ray.model import RagModel


T = TypeVar("T")
TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
#: beside MODEL_DIR in a checkpoint of a run with model.train_passage_encoder
PASSAGE_ENCODER_DIR = "passage_encoder"
#: the most passages a training run re-embeds in memory to score a passage encoder it trains
REEMBED_LIMIT = 200_000


# ----------------------------------------------------------------------------- model setup

def build_model(cfg: TrainConfig, device: torch.device) -> RagModel:
    """The RagModel to train: from a saved model directory, or fresh from checkpoints."""
    from rag_ray.model import RagModel

    m = cfg.model
    common = {"mode": m.mode, "n_docs": m.n_docs, "label_smoothing": m.label_smoothing,
              "learn_doc_score_scale": m.learn_doc_score_scale}
    if m.rerank_candidates is not None:
        common["rerank_candidates"] = m.rerank_candidates
    if m.init_from is not None:
        model = RagModel.from_pretrained(m.init_from, device=device)
        model.config = replace(model.config, **common)
        if m.doc_score_scale is not None:
            model.set_doc_score_scale(m.doc_score_scale)
    else:
        scale = {} if m.doc_score_scale is None else {"doc_score_scale": m.doc_score_scale}
        model = RagModel.from_components(m.query_encoder, m.generator, copy_head=m.copy_head,
                                         pointer_init=m.pointer_init, device=device, **common, **scale)
    model.log_doc_score_scale.requires_grad_(m.learn_doc_score_scale and cfg.scores_passages)
    if cfg.objective in (Objective.RETRIEVER, Objective.RERANKER):  # the generator stays as it is
        model.generator.requires_grad_(False)
    if cfg.objective is Objective.RERANKER:  # the reranker alone learns
        if model.reranker is None:
            model.reranker = Reranker.from_pretrained(m.reranker, device=device)
    elif model.reranker is not None:
        model.reranker.requires_grad_(False)
    if m.rerank_prior is not None:
        model.set_rerank_prior(m.rerank_prior, "model.rerank_prior")
    if m.max_source_length is not None:
        model.generator.max_source_length = m.max_source_length
    if m.max_target_length is not None:
        model.generator.max_target_length = m.max_target_length
    if not cfg.trains_query_encoder:
        model.query_encoder.requires_grad_(False)
    return model


def build_passage_encoder(cfg: TrainConfig, device: torch.device, checkpoint_dir: str | None = None) -> Encoder | None:
    """The passage encoder a run trains (``model.train_passage_encoder``): the
    checkpoint's when resuming, else the one the index was built with, with the index's pooling,
    normalisation and length, so its first vectors are the stored ones. None when not trained."""
    from rag_ray.manifest import IndexManifest, resolve_index

    if not cfg.model.train_passage_encoder:
        return None
    info = IndexManifest.read(resolve_index(cfg.index)).encoder
    path = info.name if checkpoint_dir is None else str(Path(checkpoint_dir) / PASSAGE_ENCODER_DIR)
    encoder = Encoder.from_pretrained(path, info.pooling, info.normalize, info.max_length, device=device)
    if checkpoint_dir is None:  # the manifest's name (a hub id or path), not a resolved snapshot path
        encoder.name = info.name
    return encoder.train()


def build_optimizer(model: RagModel, cfg: TrainConfig, passage_encoder: Encoder | None = None,
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with a smaller learning rate for the query encoder (it starts well trained), an
    optionally larger one for the copy head (new weights), the scale on q·d in a group of its
    own without weight decay (decay would pull its log towards 0, i.e. scale 1), and linear
    warm-up then linear decay to zero at ``max_steps``."""
    o = cfg.optim
    head = [p for p in model.generator.model.head_parameters() if p.requires_grad] if model.generator.copy_head else []
    head_ids = {id(p) for p in head}
    groups = [{"params": [p for p in model.generator.parameters() if p.requires_grad and id(p) not in head_ids],
               "lr": o.lr}]
    if head:  # the copy head starts from random weights
        groups.append({"params": head, "lr": o.lr if o.copy_head_lr is None else o.copy_head_lr})
    q_params = [p for p in model.query_encoder.parameters() if p.requires_grad]
    if passage_encoder is not None:  # DPR trains both towers at one learning rate
        q_params += [p for p in passage_encoder.parameters() if p.requires_grad]
    if q_params:
        groups.append({"params": q_params, "lr": o.lr if o.query_encoder_lr is None else o.query_encoder_lr})
    if model.reranker is not None:  # trained only by the reranker objective (frozen otherwise)
        groups.append({"params": [p for p in model.reranker.parameters() if p.requires_grad], "lr": o.lr})
    if model.log_doc_score_scale.requires_grad:
        groups.append({"params": [model.log_doc_score_scale], "lr": o.lr, "weight_decay": 0.0})
    groups = [g for g in groups if g["params"]]  # e.g. the frozen generator of the retriever objective
    # fused AdamW: one kernel over all parameters (CPU and CUDA), measured 5.6% of a CPU step unfused
    optimizer = torch.optim.AdamW(groups, weight_decay=o.weight_decay, fused=True)

    def schedule(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / (o.warmup_steps + 1)
        return max(0.0, (o.max_steps - step) / max(1, o.max_steps - o.warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


class LossModule(torch.nn.Module):
    """What DDP wraps: ``forward`` is one RAG loss computation, so DDP's gradient hooks fire. With
    a ``passage_encoder`` the retrieved passages are re-embedded from their text, so p(z|x) is
    scored with the encoder being trained and the answer loss reaches it (the end-to-end
    retriever); the index's stored vectors only chose the candidates."""

    def __init__(self, model: RagModel, passage_encoder: Encoder | None = None) -> None:
        super().__init__()
        self.model = model
        self.passage_encoder = passage_encoder

    def forward(self, questions, answers, passages, doc_vectors, question_vectors=None, n_docs=None):
        if self.passage_encoder is not None and passages is not None:
            k = n_docs or self.model.config.n_docs
            if all(len(row) >= k for row in passages):  # else the loss names the short row
                texts = [embedding_text(p.title, p.text) for row in passages for p in row[:k]]
                doc_vectors = self.passage_encoder.embed(texts).reshape(len(passages), k, -1)
        out = self.model.loss(questions, answers, passages, doc_vectors, question_vectors=question_vectors,
                              n_docs=n_docs)
        return out.loss, out.doc_log_prior.detach()


class RetrievalLossModule(torch.nn.Module):
    """What DDP wraps for the retriever objective: one ``RagModel.retrieval_loss``. With a
    ``passage_encoder`` the candidates are embedded from their text (so both towers get a
    gradient); without one they are the index's stored vectors."""

    def __init__(self, model: RagModel, passage_encoder: Encoder | None = None) -> None:
        super().__init__()
        self.model = model
        self.passage_encoder = passage_encoder

    def forward(self, questions, positives, positive_ids, negatives=None, negative_ids=None,
                positive_texts=None, negative_texts=None):
        if self.passage_encoder is not None:
            b, h = len(positive_texts), len(negative_texts[0]) if negative_texts else 0
            vectors = self.passage_encoder.embed(list(positive_texts) + [t for row in negative_texts for t in row])
            positives, negatives = vectors[:b], vectors[b:].reshape(b, h, vectors.shape[-1])
        return self.model.retrieval_loss(questions, positives, positive_ids, negatives, negative_ids), None


class RerankLossModule(torch.nn.Module):
    """What DDP wraps for the reranker objective: the reranker's listwise loss, gold passage first."""

    def __init__(self, model: RagModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, questions, candidates):
        return self.model.reranker.listwise_loss(questions, candidates), None


# ----------------------------------------------------------------------------- setup and step

@dataclass
class TrainState:
    """What one worker's steps read and change. ``loss_fn`` is the model's LossModule, wrapped
    in DDP under Ray Train; ``timings`` accumulate seconds per phase for the reports."""

    cfg: TrainConfig
    model: RagModel
    loss_fn: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    device: torch.device
    step: int = 0
    #: the passage encoder being trained (``model.train_passage_encoder``), else None
    passage_encoder: Encoder | None = None
    #: the checkpoint step this run started from; None for a fresh start
    resumed_from: int | None = None
    timings: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("retrieve", "forward", "backward", "optimizer"), 0.0))
    params: list[torch.nn.Parameter] = field(init=False)

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if self.passage_encoder is not None:
            self.params += [p for p in self.passage_encoder.parameters() if p.requires_grad]

    @property
    def first_step(self) -> int:
        return 0 if self.resumed_from is None else self.resumed_from


def setup(cfg: TrainConfig, device: torch.device, checkpoint_dir: str | None = None,
          wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> TrainState:
    """Threads, seed, model, optimizer and schedule, fresh or from a checkpoint folder, in
    training mode. ``wrap`` wraps the loss module (Ray Train's ``prepare_model``: DDP)."""
    if cfg.scaling.torch_threads is not None:
        torch.set_num_threads(cfg.scaling.torch_threads)
    torch.manual_seed(cfg.seed)
    if checkpoint_dir is None:
        model, passage_encoder = build_model(cfg, device), build_passage_encoder(cfg, device)
        optimizer, scheduler = build_optimizer(model, cfg, passage_encoder)
        step, resumed_from = 0, None
    else:
        model, passage_encoder, optimizer, scheduler, step = load_checkpoint(checkpoint_dir, cfg, device)
        resumed_from = step
    model.train()
    if cfg.objective is Objective.RETRIEVER:
        loss_fn: torch.nn.Module = RetrievalLossModule(model, passage_encoder)
    elif cfg.objective is Objective.RERANKER:
        loss_fn = RerankLossModule(model)
    else:
        loss_fn = LossModule(model, passage_encoder)
    if wrap is not None:
        loss_fn = wrap(loss_fn)
    return TrainState(cfg, model, loss_fn, optimizer, scheduler, device, step, passage_encoder, resumed_from)


def train_step(state: TrainState, batch: dict, result: SearchResult | None) -> float:
    """One optimizer step: forward under autocast, backward, clip, AdamW, schedule; returns the loss.

    ``batch`` holds "question" and "answer" (the reader objective also the gold passage's "title"
    and "text"; the retriever objective the stored vectors and ids of the gold passage and the hard
    negatives, see ``with_retrieval_targets``); ``result`` is its retrieval, None when training does not retrieve. Adds the
    forward/backward/optimizer seconds to ``state.timings`` (retrieval is timed by the caller).
    """
    cfg = state.cfg
    questions, answers = [str(q) for q in batch["question"]], [str(a) for a in batch["answer"]]
    t0 = time.perf_counter()
    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=cfg.optim.precision == "bf16"):
        if cfg.objective is Objective.READER:  # one gold passage per question: p(z|x) = 1 whatever q·d is
            gold = [[Passage("", "", str(t), str(x))] for t, x in zip(batch["title"], batch["text"])]
            zeros = torch.zeros(len(questions), state.model.query_encoder.dim, device=state.device)
            loss, _ = state.loss_fn(questions, answers, gold, zeros[:, None], zeros, n_docs=1)
        elif cfg.objective is Objective.RETRIEVER:
            texts = {}
            if state.passage_encoder is not None:
                texts = {"positive_texts": [embedding_text(t, x) for t, x in zip(batch["positive_title"],
                                                                                 batch["positive_text"])],
                         "negative_texts": [json.loads(t) for t in batch["negative_texts"]]}
            loss, _ = state.loss_fn(questions, torch.as_tensor(batch["positive"]), [str(p) for p in batch["positive_id"]],
                                    torch.as_tensor(batch["negatives"]),
                                    [json.loads(ids) for ids in batch["negative_ids"]], **texts)
        elif cfg.objective is Objective.RERANKER:
            rng = np.random.default_rng((cfg.seed, state.step))
            loss, _ = state.loss_fn(questions, reranker_candidates(batch, result, cfg.data.hard_negatives, rng))
        elif result is None:  # closed book: the generator alone
            loss, _ = state.loss_fn(questions, answers, None, None)
        else:
            if cfg.data.gold_in_top_k:
                result = with_gold_in_top_k(result, batch)
            loss, _ = state.loss_fn(questions, answers, result.hits, result.vectors)
    t1 = time.perf_counter()
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = time.perf_counter()
    if cfg.optim.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(state.params, cfg.optim.grad_clip)
    state.optimizer.step()
    state.scheduler.step()
    t3 = time.perf_counter()
    state.timings["forward"] += t1 - t0
    state.timings["backward"] += t2 - t1
    state.timings["optimizer"] += t3 - t2
    state.step += 1
    return float(loss.detach())


# ----------------------------------------------------------------------------- retrieval

class Prefetcher:
    """Runs the retrieval of batch t+1 on a thread while batch t computes (Ray calls release the
    GIL while they wait, so shard search overlaps the local forward/backward)."""

    def __init__(self, model, retriever, k: int, enabled: bool, hybrid: bool = False,
                 lexical_k: int | None = None, rerank: bool = True) -> None:
        from rag_ray.pipeline import RagPipeline

        self.pipeline = None if retriever is None else RagPipeline(model, retriever, hybrid=hybrid, lexical_k=lexical_k,
                                                                   rerank=rerank)
        self.k = k
        self.pool = ThreadPoolExecutor(max_workers=1) if enabled else None

    def submit(self, questions: Sequence[str]) -> Future | None:
        if self.pipeline is None or self.pool is None:
            return None  # no retrieval, or retrieved synchronously in get()
        # Encode in the caller's thread (fast, avoids two threads in one module); search async.
        vectors = self.pipeline.embed(questions)
        return self.pool.submit(self.pipeline.search, list(questions), vectors, self.k)

    def get(self, pending, questions: Sequence[str]) -> SearchResult | None:
        if self.pipeline is None:
            return None
        if pending is None:
            return self.pipeline.retrieve(questions, self.k)
        return pending.result()

    def swap(self, retriever, pending, questions: Sequence[str]) -> Future | None:
        """Search ``retriever`` from now on; the batch prefetched from the old one is searched again."""
        if pending is not None:
            try:
                pending.result()
            except Exception:  # noqa: BLE001 - its shards may be retired already; the batch is searched again
                pass
        self.pipeline.retriever = retriever
        return self.submit(questions) if questions else None

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
        gold = gold_passage(row["answer"], by_doc.get(row["doc_id"], []), lambda p: p.text)
        if gold is not None:
            out.append({**row, "title": gold.title, "text": gold.text})
    if not out:
        raise RagRayError(f"objective 'reader': no training question has a gold passage in {corpus} (questions need "
                          "a doc_id that is a document id of the corpus)")
    return out, len(rows) - len(out)


def with_retrieval_targets(rows: list[dict], index: str, hard_negatives: int,
                           texts: bool = False) -> tuple[list[dict], int]:
    """Retriever rows: each question's gold passage in the index (a passage of its doc_id that
    contains its answer) and ``hard_negatives`` BM25 passages (DPR's: the top BM25 passages of
    other documents that contain no gold answer), each with its stored vector from the index, so
    training scores exactly what search will. Where BM25 finds too few negatives, random passages
    of other documents fill in. With ``texts`` (a trained passage encoder embeds them) each row
    also carries its negatives' embedding texts. Rows without a gold passage (or, in a tiny
    corpus, without enough other passages) are dropped and counted. BM25 runs here over the whole index (bm25s: seconds for
    10^4 passages, minutes for 10^6)."""
    from rag_ray.evaluation import bm25_rankings, gold_fields, has_answer, index_gold_rows, index_passages, index_vectors

    passages = index_passages(index)
    kept, gold = [], []
    for row, r in zip(rows, index_gold_rows(rows, passages)):
        if r is not None:
            kept.append(row)
            gold.append(r)
    if not kept:
        raise RagRayError(f"no training question has a gold passage in {index} (the retriever and reranker "
                          "objectives and data.gold_in_top_k need questions whose doc_id is a document id of the "
                          "index)")
    negatives: list[list[int]] = [[] for _ in kept]
    if hard_negatives:
        ranked, _ = bm25_rankings(passages, [row["question"] for row in kept], hard_negatives + 30)
        rng = np.random.default_rng(0)
        n = len(passages["doc_id"])
        for row, picked, ranking in zip(kept, negatives, ranked):
            answers = json.loads(row["answers"])
            # BM25's passages first; where too few share a term with the question, random ones
            # (DPR's fallback), so no question is dropped for want of negatives
            for r in itertools.chain(ranking, (int(x) for x in rng.integers(0, n, size=20 * hard_negatives))):
                if len(picked) == hard_negatives:
                    break
                if (r not in picked and passages["doc_id"][r] != row["doc_id"]
                        and not has_answer(passages["text"][r], answers)):
                    picked.append(r)
    vectors = index_vectors(index, sorted({r for rs in negatives for r in rs} | set(gold)))
    dim = next(iter(vectors.values())).shape[0]
    out = []
    for row, g, negs in zip(kept, gold, negatives):
        if len(negs) < hard_negatives:
            continue
        out.append({**row, **gold_fields(passages, g, vectors[g]),
                    "negative_ids": json.dumps([passages["passage_id"][r] for r in negs]),
                    "negatives": np.stack([vectors[r] for r in negs]) if negs else np.zeros((0, dim), np.float32)})
        if texts:
            out[-1]["negative_texts"] = json.dumps([embedding_text(passages["title"][r], passages["text"][r])
                                                    for r in negs])
    return out, len(rows) - len(out)


GOLD_FIELDS = ("positive_id", "positive_doc", "positive_title", "positive_text")


def reranker_candidates(batch: dict, result: SearchResult, negatives: int, rng: np.random.Generator) -> list[list[str]]:
    """Each question's gold passage text (``with_retrieval_targets``' positive), then up to
    ``negatives`` texts sampled from its retrieved candidates that are from other documents and do
    not hold an answer: the reranker's listwise targets, as the index build embeds passage text."""
    from rag_ray.evaluation import has_answer

    out = []
    for i, hits in enumerate(result.hits):
        answers = json.loads(batch["answers"][i])
        wrong = [h for h in hits if h.doc_id != str(batch["positive_doc"][i]) and not has_answer(h.text, answers)]
        picked = sorted(rng.choice(len(wrong), size=min(negatives, len(wrong)), replace=False)) if wrong else []
        out.append([embedding_text(str(batch["positive_title"][i]), str(batch["positive_text"][i]))]
                   + [embedding_text(wrong[j].title, wrong[j].text) for j in picked])
    return out


def with_gold_in_top_k(result: SearchResult, batch: dict) -> SearchResult:
    """The retrieved top K with each question's gold passage (``with_retrieval_targets``' positive)
    put in place of the K-th where retrieval missed it (issue 11, item 4): every step then reads
    the answer once next to K-1 retrieved distractors, so p(y|x,z) learns to fall on passages
    without it, and the query encoder is pulled towards the gold passage. Its hit carries source
    "gold"; its score is NaN because training recomputes q·d from the vectors and never reads it."""
    hits, vectors = [], np.array(result.vectors, dtype=np.float32, copy=True)
    for i, row in enumerate(result.hits):
        row = list(row)
        gold_id = str(batch["positive_id"][i])
        if row and all(h.passage_id != gold_id for h in row):
            row[-1] = gold_hit({k: batch[k][i] for k in GOLD_FIELDS}, float("nan"))
            vectors[i, len(row) - 1] = np.asarray(batch["positive"][i], dtype=np.float32)
        hits.append(row)
    return SearchResult(hits, vectors)


def train_dataset(rows: list[dict], cfg: TrainConfig):
    """The training rows as a Ray Dataset. ``cfg.shuffle``: reshuffled globally at every epoch
    (each pass over the dataset is a new execution with a new seed derived from ``cfg.seed``), so
    a batch mixes articles although question files are sorted by article: a local shuffle buffer
    only mixes neighbouring rows, i.e. one or two articles. ``shuffle: false``: file order, which
    benchmarks use to feed identical batches."""
    import ray.data

    # A few blocks, not Ray Data's default hundreds: the rows are small and already in memory,
    # and on a small machine per-block tasks compete with training for the same cores.
    ds = ray.data.from_items(rows, override_num_blocks=max(4, 2 * cfg.scaling.num_workers))
    if not cfg.shuffle:
        return ds
    try:
        from ray.data import RandomSeedConfig
    except ImportError:  # an older Ray: a new order every epoch, but not reproducible from the seed
        print("[rag_ray.train] this Ray has no ray.data.RandomSeedConfig: the training order is shuffled every "
              "epoch but not reproducible from `seed`", flush=True)
        return ds.random_shuffle()
    return ds.random_shuffle(seed=RandomSeedConfig(seed=cfg.seed, reseed_after_execution=True))


def cycle_batches(shard, batch_size: int) -> Iterator[dict]:
    """Endless batches from this worker's dataset shard, epoch after epoch (each epoch in the
    order ``train_dataset`` gives it: globally reshuffled, or file order)."""
    while True:
        n = 0
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy"):
            n += 1
            yield batch
        if n == 0:
            raise RagRayError(f"a worker's share of the training set is smaller than one batch of {batch_size}; "
                              "use fewer scaling.num_workers, a smaller optim.batch_size or more data")


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(directory: str, state: TrainState, metrics: dict, metadata: dict) -> None:
    """Model directory (safetensors, with ``metadata``: the TrainConfig and the index it was
    trained against) + optimizer/scheduler state + step, in one folder."""
    model_dir = Path(directory) / MODEL_DIR
    state.model.save_pretrained(model_dir, metadata=metadata)
    if state.passage_encoder is not None:
        state.passage_encoder.save_pretrained(Path(directory) / PASSAGE_ENCODER_DIR)
    torch.save({"optimizer": state.optimizer.state_dict(), "scheduler": state.scheduler.state_dict(),
                "step": state.step}, Path(directory) / TRAIN_STATE)
    (Path(directory) / "metrics.json").write_text(json.dumps(metrics, indent=2))


def load_checkpoint(directory: str, cfg: TrainConfig, device: torch.device):
    """(model, passage encoder or None, optimizer, scheduler, step) from a checkpoint folder;
    tensors only (weights_only)."""
    # the checkpoint's own (learned) scale, not the configured starting value
    saved = replace(cfg, model=replace(cfg.model, init_from=str(Path(directory) / MODEL_DIR), doc_score_scale=None))
    model, passage_encoder = build_model(saved, device), build_passage_encoder(cfg, device, directory)
    optimizer, scheduler = build_optimizer(model, cfg, passage_encoder)
    state = torch.load(Path(directory) / TRAIN_STATE, map_location=device, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return model, passage_encoder, optimizer, scheduler, int(state["step"])


# ----------------------------------------------------------------------------- the loop

@dataclass
class Progress:
    """Loss and throughput for the logs (since the last report) and the reports (since the start)."""

    world: int
    #: seconds until Ray Data's streaming split delivered the first batch, kept out of the rates
    first_batch_s: float
    run_start: float = field(default_factory=time.perf_counter)
    samples: int = 0
    window_loss: float = 0.0
    window_steps: int = 0
    window_samples: int = 0
    window_start: float = field(default_factory=time.perf_counter)

    def add(self, loss: float, batch_size: int) -> None:
        self.samples += batch_size * self.world
        self.window_samples += batch_size * self.world
        self.window_loss += loss
        self.window_steps += 1

    def new_window(self) -> None:
        self.window_loss, self.window_steps, self.window_samples = 0.0, 0, 0
        self.window_start = time.perf_counter()

    def log_line(self, state: TrainState) -> str:
        elapsed = time.perf_counter() - self.window_start
        return (f"[rag_ray.train] step {state.step}/{state.cfg.optim.max_steps} "
                f"loss {self.window_loss / self.window_steps:.4f} | {self.window_steps / elapsed:.2f} steps/s "
                f"{self.window_samples / elapsed:.1f} samples/s | lr {state.scheduler.get_last_lr()[0]:.2e}")

    def metrics(self, state: TrainState) -> dict:
        wall = time.perf_counter() - self.run_start
        return {"step": state.step, "loss": self.window_loss / max(1, self.window_steps), "samples": self.samples,
                "steps_per_s": (state.step - state.first_step) / wall, "samples_per_s": self.samples / wall,
                "wall_seconds": round(wall, 1), "first_batch_seconds": round(self.first_batch_s, 2),
                "resumed_from_step": state.resumed_from, "world_size": self.world,
                **{f"time_{k}_s": round(v, 2) for k, v in state.timings.items()}}


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker. ``config``: {"cfg": TrainConfig, "retriever": Retriever | None,
    "dev": dev rows (evaluated on rank 0), "metadata": what each saved model records}."""
    import ray.train

    cfg: TrainConfig = config["cfg"]
    retriever, dev_rows, metadata = config["retriever"], config["dev"], config["metadata"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    state = _setup_worker(cfg)
    batches = cycle_batches(ray.train.get_dataset_shard("train"), cfg.optim.batch_size)
    reranking = cfg.objective is Objective.RERANKER  # then the retriever's own candidates, not reranked
    prefetch = Prefetcher(state.model, retriever if cfg.searches_in_training else None,
                          state.model.config.rerank_candidates if reranking else cfg.model.n_docs,
                          cfg.prefetch, cfg.model.hybrid, cfg.model.lexical_k, rerank=not reranking)
    retrieval_log: list[dict] = []
    refresher = IndexRefresher(cfg) if cfg.refreshes_index and rank == 0 else None
    refreshes = {"index": cfg.index, "index_refreshes": 0, "index_refresh_seconds": 0.0}

    def refresh_index() -> None:
        """Rank 0 rebuilds the index with the passage encoder as it is now; every worker then
        searches the new version (the others wait for it, then attach to its shards by name)."""
        nonlocal retriever, metadata
        t0 = time.perf_counter()
        number = refreshes["index_refreshes"] + 1
        version = [str(refresher.refresh(state.passage_encoder, state.step, number)) if rank == 0 else None]
        if world > 1:
            torch.distributed.broadcast_object_list(version, src=0)
        retriever = refresher.retriever() if rank == 0 else attach_refreshed(version[0])
        metadata = {**metadata, "index": index_identity(version[0])}
        refreshes["index"] = version[0]
        refreshes["index_refreshes"] += 1
        refreshes["index_refresh_seconds"] = round(refreshes["index_refresh_seconds"] + time.perf_counter() - t0, 1)

    if cfg.refreshes_index and state.resumed_from is not None:
        refresh_index()  # the checkpoint's passage encoder is newer than any index on disk
        prefetch.swap(retriever, None, [])
    data_start = time.perf_counter()
    batch = next(batches)  # starts Ray Data's streaming split: a fixed cost, reported on its own
    progress = Progress(world, first_batch_s=time.perf_counter() - data_start)
    pending = prefetch.submit([str(q) for q in batch["question"]])
    while state.step < cfg.optim.max_steps:
        t0 = time.perf_counter()
        questions = [str(q) for q in batch["question"]]
        result = prefetch.get(pending, questions)
        next_batch = next(batches)
        pending = prefetch.submit([str(q) for q in next_batch["question"]])
        state.timings["retrieve"] += time.perf_counter() - t0
        if cfg.log_retrievals and rank == 0 and result is not None and len(retrieval_log) < 5:
            retrieval_log.append({"step": state.step, "questions": questions,
                                  "passage_ids": [[h.passage_id for h in hits] for hits in result.hits]})
        progress.add(train_step(state, batch, result), len(questions))
        batch = next_batch

        stop = _agree_to_stop(cfg, progress.run_start, world, state.device)
        if rank == 0 and (state.step % cfg.log_every == 0 or state.step == 1):
            # print, not logging: Ray forwards worker stdout to the driver and `ray job logs`.
            print(progress.log_line(state), flush=True)
        final = state.step >= cfg.optim.max_steps or stop
        every = cfg.index_refresh.every
        if cfg.refreshes_index and (final or (every and state.step % every == 0)):
            refresh_index()
            pending = prefetch.swap(retriever, pending, [] if final else [str(q) for q in batch["question"]])
        evaluate = final or state.step % cfg.eval.every == 0
        if evaluate or state.step % cfg.checkpoint.every == 0:
            metrics = progress.metrics(state)
            if cfg.refreshes_index:
                metrics.update(refreshes)
            if (rank == 0 and dev_rows and evaluate and state.passage_encoder is not None
                    and cfg.objective is Objective.RETRIEVER):
                metrics.update(evaluate_recall_reembedded(state, dev_rows))
            elif rank == 0 and dev_rows and evaluate and cfg.objective in (Objective.RETRIEVER, Objective.RERANKER):
                metrics.update(evaluate_recall(state.model, retriever, dev_rows, cfg.index, rerank=reranking,
                                               hybrid=cfg.model.hybrid, lexical_k=cfg.model.lexical_k))
            elif rank == 0 and dev_rows and evaluate:
                metrics.update(evaluate_qa(state.model, retriever if cfg.model.mode.retrieves else None, dev_rows,
                                           mode=cfg.model.mode, n_docs=cfg.model.n_docs, decoding=cfg.eval.decoding,
                                           num_beams=cfg.eval.num_beams, max_new_tokens=cfg.eval.max_new_tokens,
                                           span_recovery=cfg.eval.span_recovery, hybrid=cfg.model.hybrid,
                                           lexical_k=cfg.model.lexical_k,
                                           keep_predictions=final and cfg.eval.predictions is not None))
                predictions = metrics.pop("predictions", None)
                if predictions is not None:
                    atomic_write_text(cfg.eval.predictions, "".join(json.dumps(p) + "\n" for p in predictions))
                print(f"[rag_ray.train] eval at step {state.step}: "
                      f"{ {k: round(v, 4) for k, v in metrics.items() if k.startswith('dev_') and not k.endswith('_ci95')} }", flush=True)
            if retrieval_log:
                metrics["retrieval_log"] = retrieval_log
            _report(state, metrics, metadata, rank)
            progress.new_window()
            if stop:
                break
    prefetch.close()
    if refresher is not None:
        refresher.close()


def evaluate_recall(model: RagModel, retriever, dev_rows: list[dict], index: str, rerank: bool = False,
                    hybrid: bool = False, lexical_k: int | None = None) -> dict:
    """dev_recall@1/5/20 (gold doc) of the model's query encoder (the retriever objective's
    score), or with ``rerank`` of its reranker's order of the (hybrid) candidates (the reranker's),
    then with the candidates' own order as ``dev_candidates_*``."""
    examples = [QAExample(r["question"], tuple(r["answers"]), r["doc_id"] or None) for r in dev_rows]
    was_training = model.training
    model.eval()
    try:
        report = evaluate_retrieval(retriever, model.query_encoder, examples, index, ks=(1, 5, 20), bm25=False,
                                    hybrid=rerank and hybrid, lexical_k=lexical_k,
                                    reranker=model.reranker if rerank else None,
                                    rerank_candidates=model.config.rerank_candidates)
    finally:
        model.train(was_training)
    if not rerank:
        return _dev_recall(report, "dense")
    before = "hybrid" if hybrid else "dense"
    print(f"[rag_ray.train] recall reranked: {_rounded(report['reranked'])}, before: {_rounded(report[before])}",
          flush=True)
    # the candidates' own order too, for the before and after in one report
    return {**_dev_recall(report, "reranked"),
            **{k.replace("dev_", "dev_candidates_", 1): v for k, v in _dev_recall(report, before).items()}}


def _rounded(table: dict) -> dict:
    return {k: round(v, 4) for k, v in table.items() if k.startswith("recall@")}


def _dev_recall(report: dict, system: str = "dense") -> dict:
    """A retrieval report's recall (and its intervals) of one system as the run's ``dev_*`` metrics."""
    out = {f"dev_{k}": v for k, v in report[system].items() if not k.startswith("answer_")}
    return {**out, **{f"dev_{k}_ci95": v for k, v in report[f"{system}_ci95"].items()}}


def evaluate_recall_reembedded(state: TrainState, dev_rows: list[dict]) -> dict:
    """dev_recall@1/5/20 when the passage encoder is training: the index's stored vectors are
    stale, so its passages are re-embedded with the current passage encoder and searched exactly
    in memory (what a rebuilt index would return; seconds per 10^3 passages)."""
    from rag_ray.manifest import IndexManifest, resolve_index

    passages = IndexManifest.read(resolve_index(state.cfg.index)).passage_count
    if passages > REEMBED_LIMIT:
        print(f"[rag_ray.train] no recall at step {state.step}: re-embedding {passages} passages (limit "
              f"{REEMBED_LIMIT}) is an index build; rebuild the index with the saved passage encoder and run "
              "rag-ray eval-retrieval", flush=True)
        return {}
    examples = [QAExample(r["question"], tuple(r["answers"]), r["doc_id"] or None) for r in dev_rows]
    with torch.autocast(state.device.type, dtype=torch.bfloat16, enabled=state.cfg.optim.precision == "bf16"):
        report = exact_recall(state.model.query_encoder, state.passage_encoder, examples, state.cfg.index, (1, 5, 20))
    print(f"[rag_ray.train] recall with re-embedded passages at step {state.step}: "
          f"{_rounded(report['dense'])}", flush=True)
    return _dev_recall(report)


def _setup_worker(cfg: TrainConfig) -> TrainState:
    """``setup`` on a Ray Train worker, the loss module under DDP. A restarted worker resumes
    from this run's latest checkpoint; a new run may start from another run's (``resume_from``)."""
    import ray.train
    import ray.train.torch

    def ddp(module: torch.nn.Module) -> torch.nn.Module:
        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={"find_unused_parameters": True})

    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and cfg.checkpoint.resume_from is not None:
        checkpoint = ray.train.Checkpoint.from_directory(cfg.checkpoint.resume_from)
    if checkpoint is None:
        return setup(cfg, device, wrap=ddp)
    with checkpoint.as_directory() as ckpt_dir:
        return setup(cfg, device, ckpt_dir, wrap=ddp)


def _report(state: TrainState, metrics: dict, metadata: dict, rank: int) -> None:
    """``ray.train.report`` from every worker; rank 0 attaches the checkpoint."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(tmp, state, metrics, metadata)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _agree_to_stop(cfg: TrainConfig, run_start: float, world: int, device: torch.device) -> bool:
    """All workers stop at the same step when the time budget runs out (rank 0 decides)."""
    if cfg.optim.max_minutes is None:
        return False
    flag = torch.tensor([float(time.perf_counter() - run_start > 60 * cfg.optim.max_minutes)], device=device)
    if world > 1:
        torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


# ----------------------------------------------------------------------------- driver

def check_index_compatibility(cfg: TrainConfig) -> None:
    """Fail on the driver, before any worker starts, if the query encoder cannot search the index."""
    from rag_ray.manifest import EncoderInfo, IndexManifest, resolve_index

    if not cfg.model.mode.retrieves or cfg.index is None:
        return
    manifest = IndexManifest.read(resolve_index(cfg.index))
    m = cfg.model
    path = str(Path(m.init_from) / "query_encoder") if m.init_from is not None else m.query_encoder
    manifest.check_query_encoder(EncoderInfo.from_checkpoint(path))
    if manifest.passage_count < m.n_docs:
        raise RagRayError(f"model.n_docs={m.n_docs} but the index holds only {manifest.passage_count} passages")


def run_training(cfg: TrainConfig) -> dict:
    """Start shard actors, fit the TorchTrainer, return (and optionally write) the final report."""
    import ray
    import ray.data
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rag_ray.retriever import Retriever

    check_index_compatibility(cfg)
    if cfg.index is not None:  # workers run in a directory of their own and read the index's files
        cfg = replace(cfg, index=str(Path(cfg.index).resolve()))
    if cfg.eval.predictions is not None:  # written by rank 0, which runs in a directory of its own
        cfg = replace(cfg, eval=replace(cfg.eval, predictions=str(Path(cfg.eval.predictions).resolve())))
    if cfg.refreshes_index:  # rank 0 writes the refreshed versions: where the driver means, not its own directory
        cfg = replace(cfg, index_refresh=replace(cfg.index_refresh, root=str(refresh_root(cfg))))
        check_refresh_source(cfg)
    train = qa_rows(read_questions(cfg.data.train))
    if cfg.objective is Objective.READER:
        train, dropped = with_gold_passages(train, cfg.data.corpus)
        print(f"[rag_ray.train] reader: {len(train)} questions with a gold passage, {dropped} without", flush=True)
    elif cfg.objective is Objective.RETRIEVER:
        train, dropped = with_retrieval_targets(train, cfg.index, cfg.data.hard_negatives,
                                                texts=cfg.model.train_passage_encoder)
        print(f"[rag_ray.train] retriever: {len(train)} questions with a gold passage and {cfg.data.hard_negatives} "
              f"BM25 hard negatives, {dropped} without", flush=True)
    elif cfg.objective is Objective.RERANKER:
        train, dropped = with_retrieval_targets(train, cfg.index, 0)
        print(f"[rag_ray.train] reranker: {len(train)} questions with a gold passage in the index, {dropped} "
              f"without; {cfg.data.hard_negatives} negatives each from the retriever's candidates", flush=True)
    elif cfg.retrieves_in_training and cfg.data.gold_in_top_k:
        train, dropped = with_retrieval_targets(train, cfg.index, 0)
        print(f"[rag_ray.train] gold in top K: {len(train)} questions with a gold passage in the index, "
              f"{dropped} without", flush=True)
    # a reader is evaluated over retrieved passages, so only when an index is given
    evaluate = (cfg.data.dev is not None and cfg.eval.questions > 0
                and (cfg.index is not None or not cfg.model.mode.retrieves))
    dev = read_questions(cfg.data.dev, limit=cfg.eval.questions) if evaluate else []
    # a retriever run is scored by recall whatever the mode; any other reads answers over retrieval
    scores_retrieval = cfg.model.mode.retrieves or cfg.objective in (Objective.RETRIEVER, Objective.RERANKER)
    needs_index = cfg.searches_in_training or (scores_retrieval and bool(dev))
    retriever = Retriever.load(cfg.index) if needs_index else None
    # what every saved model records: how it was trained, and against which index version
    trained_against = needs_index or cfg.objective is Objective.RETRIEVER  # it learned the index's vectors
    metadata = {"train_config": to_dict(cfg), "index": index_identity(cfg.index) if trained_against else None}
    ckpt = cfg.checkpoint
    storage = ckpt.storage_path if "://" in ckpt.storage_path else str(Path(ckpt.storage_path).resolve())
    if not cfg.shuffle:  # file order end to end: Ray Data may otherwise interleave blocks
        ray.data.DataContext.get_current().execution_options.preserve_order = True
    scaling = cfg.scaling
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "retriever": retriever, "metadata": metadata,
                           "dev": [{"question": e.question, "answers": list(e.answers), "doc_id": e.doc_id or ""}
                                   for e in dev]},
        scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(name=ckpt.name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=ckpt.num_to_keep),
                             failure_config=FailureConfig(max_failures=ckpt.max_failures)),
        datasets={"train": train_dataset(train, cfg)},
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
              "passage_encoder": (str(Path(result.checkpoint.path) / PASSAGE_ENCODER_DIR)
                                  if result.checkpoint and cfg.model.train_passage_encoder else None),
              # the index the model goes with: the last refresh's when the run rebuilt it
              "index": metrics.get("index", cfg.index),
              "train_questions": len(train), "dev_questions": len(dev)}
    if cfg.report is not None:
        atomic_write_text(cfg.report, json.dumps(report, indent=2))
    return report
