"""Typed job configs: frozen dataclasses, loadable from YAML with ``key.sub=value`` overrides.

Every bad field is reported at once in one :class:`ConfigError` (torchtune's ``_validate``), and
the defaults run offline on a laptop: the packaged MiniLM encoder, a local loopback Ray.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rag_ray.errors import RagRayError
from rag_ray.types import DECODINGS, DEFAULT_ENCODER, Mode

T = TypeVar("T")


class ConfigError(RagRayError):
    """All problems found in one config, one per line (a user error: the CLI prints it, no traceback)."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
        self.problems = problems


# ----------------------------------------------------------------------------- sections

def _at_least(minimum: float, section: Any, *names: str) -> list[str]:
    """``name: must be >= minimum`` for each named field below it; None (unset) passes."""
    values = {n: getattr(section, n) for n in names}
    return [f"{n}: must be >= {minimum}, got {v}" for n, v in values.items() if v is not None and v < minimum]


def _non_negative(section: Any, *names: str) -> list[str]:
    """``name: must be a finite number >= 0`` for each named field that is not; None passes."""
    values = {n: getattr(section, n) for n in names}
    return [f"{n}: must be a finite number >= 0, got {v}" for n, v in values.items()
            if v is not None and not (math.isfinite(v) and v >= 0)]


def _positive(section: Any, *names: str) -> list[str]:
    """``name: must be > 0`` for each named field that is not; None (unset) passes."""
    values = {n: getattr(section, n) for n in names}
    return [f"{n}: must be > 0, got {v}" for n, v in values.items() if v is not None and v <= 0]


@dataclass(frozen=True)
class RayConfig:
    """Where to run: ``address`` None starts a private loopback Ray; "auto" joins a cluster."""

    address: str | None = None
    num_cpus: int | None = None
    object_store_memory: int | None = 2 * 1024**3


@dataclass(frozen=True)
class EncoderConfig:
    """A dense encoder: pooling/normalize None mean "whatever the checkpoint was trained with"."""

    name: str = DEFAULT_ENCODER
    pooling: Literal["cls", "mean"] | None = None
    normalize: bool | None = None
    max_length: int = 256
    batch_size: int = 32
    #: Corpus embedding precision. ``auto``: bf16 autocast where each embedding actor's hardware has
    #: native bf16 (AVX512-BF16/AMX CPUs, GPUs: 2.2x faster at unchanged recall on squad-open,
    #: docs/benchmarks.md), fp32 elsewhere (emulated bf16 is slower).
    precision: Literal["auto", "fp32", "bf16"] = "auto"


@dataclass(frozen=True)
class IndexConfig:
    """``rag-ray index``: corpus files -> a persisted sharded FAISS index."""

    corpus: list[str] = field(default_factory=list)
    out: str = "indexes/squad-open"
    format: Literal["jsonl", "parquet", "csv", "tsv", "squad"] | None = None
    max_words: int = 100
    on_error: Literal["raise", "skip"] = "raise"
    shards: int = 2
    index_type: Literal["flat", "hnsw", "ivfpq"] = "flat"
    hnsw_m: int = 32
    ef_search: int = 128
    ivf_nlist: int | None = None
    pq_m: int | None = None
    nprobe: int = 16
    #: ivfpq: re-rank refine x k PQ candidates by exact q·d with the stored fp16 vectors (on 10M
    #: synthetic vectors recall@10 0.42 / 0.77 / 0.998 at 4 / 16 / 64; docs/benchmarks.md)
    refine: int = 64
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    #: embedding actors and what each holds; None (the default): sized from what the Ray cluster
    #: reports (indexing.embedding_resources): one actor per GPU, else one 1-thread actor per CPU
    embedders: int | None = None
    embedder_cpus: float | None = None
    embedder_gpus: float | None = None
    torch_threads: int | None = None
    overwrite: bool = False
    #: where shards keep rows until they finalize (local disk of each shard's node; None: the
    #: system temp directory). Needs about 1.5x the corpus's fp32 vectors in free space.
    spill_dir: str | None = None
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> list[str]:
        problems = []
        if not self.corpus:
            problems.append("corpus: give at least one corpus file or directory")
        problems += _at_least(1, self, "max_words", "shards", "hnsw_m", "ef_search", "nprobe", "refine", "embedders",
                              "torch_threads")
        problems += _positive(self, "embedder_cpus") + _at_least(0, self, "embedder_gpus")
        if self.encoder.batch_size < 1 or self.encoder.max_length < 1:
            problems.append("encoder.batch_size and encoder.max_length must be >= 1")
        return problems


# ----------------------------------------------------------------------------- training

class Objective(str, Enum):
    """What a training step fits.

    ``rag``: the answer, marginalised over retrieved passages as ``model.mode`` says.
    ``reader``: the generator alone on (each question's gold passage, question) -> answer, with
    p(z|x) = 1: a warm-up that teaches a small generator to read before joint training (the role
    BART-large's pretraining plays in the paper). Its model is a RAG-Sequence model.
    ``retriever``: the query encoder alone, DPR-style: each question's gold passage against the
    other questions' gold passages in the batch and BM25 hard negatives, all scored as
    softmax(scale · q·d) with the index's own stored vectors (so nothing is re-indexed). A
    warm-up for the retriever, as the answer loss alone moves recall slowly. With
    ``model.train_passage_encoder`` both towers learn, as in DPR, and the index is rebuilt after.
    ``reranker``: a cross-encoder alone (``model.reranker``, rag_ray.reranker), listwise: each
    question's gold passage against ``data.hard_negatives`` passages sampled from the retriever's
    own top ``model.rerank_candidates`` (hybrid when ``model.hybrid``) that are from other documents
    and lack the answer, i.e. the mistakes it will have to correct. Saved inside the model.
    """

    RAG = "rag"
    READER = "reader"
    RETRIEVER = "retriever"
    RERANKER = "reranker"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TrainData:
    """Question files or dataset names (``squad-open:train``); ``corpus`` feeds the reader objective."""

    train: str = "squad-open:train"
    #: None: no evaluation during training
    dev: str | None = "squad-open:dev"
    #: where the reader objective looks up each question's gold passage by doc_id
    corpus: str | None = None
    #: the retriever objective: BM25 hard negatives per question (top BM25 passages of other
    #: documents that do not contain the answer; DPR uses 1); the reranker objective: negatives
    #: per question sampled from the retriever's top ``model.rerank_candidates``
    hard_negatives: int = 1
    #: the rag objective: where retrieval misses a question's gold passage (a passage of its doc_id
    #: that holds the answer), it replaces the K-th retrieved one, so the generator learns to read
    #: the answer next to K-1 distractors (questions without a gold passage in the index are dropped)
    gold_in_top_k: bool = False

    def validate(self) -> list[str]:
        problems = [] if self.train else ["train: give a questions file or dataset name"]
        return problems + _at_least(0, self, "hard_negatives")


@dataclass(frozen=True)
class TrainModel:
    """The RagModel to train: ``init_from`` a saved model, else fresh from the two checkpoints."""

    init_from: str | None = None
    query_encoder: str = DEFAULT_ENCODER
    generator: str = DEFAULT_ENCODER
    #: None: the generator's own default (the pointer-generator copy head for BERT2BERT)
    copy_head: bool | None = None
    #: how a new copy head's pointer starts: "identity" (attention over the encoder states
    #: themselves; None: this default, ``types.NEW_HEAD_POINTER``) or "small" (std-0.02 projections,
    #: the default until the ablation in docs/results.md); a saved head loads as saved
    pointer_init: Literal["small", "identity"] | None = None
    mode: Mode = Mode.SEQUENCE
    n_docs: int = 5
    #: hybrid candidates: each search also sends the questions, and the BM25 top ``lexical_k``
    #: (None: n_docs) is fused with the dense top n_docs; p(z|x) stays softmax(scale · q·d), so
    #: the answer loss also trains the query encoder on passages only BM25 found
    hybrid: bool = False
    lexical_k: int | None = None
    freeze_query_encoder: bool = False
    #: also train a passage encoder (DPR's second tower, starting from the index's) on the
    #: passages' text instead of scoring their stored vectors. The retriever objective: the index
    #: is rebuilt after, ``rag-ray index --encoder <checkpoint>/passage_encoder``. The rag objective
    #: (the end-to-end retriever follow-up to RAG): p(z|x) scores the retrieved passages re-embedded
    #: with it, and ``index_refresh`` rebuilds the index it searches during training
    train_passage_encoder: bool = False
    #: the reranker objective: where a new reranker starts when ``init_from`` has none (any encoder
    #: checkpoint; its one-logit score head starts at random)
    reranker: str = DEFAULT_ENCODER
    #: candidates the model's reranker reads to pick n_docs (training and every later search);
    #: None: the saved model's own (20 for a new one)
    rerank_candidates: int | None = None
    #: w in the reranker's order, logit - w·ln(1 + retriever rank), saved with it; None: the saved
    #: reranker's own (1.0 for a new one; 0 orders by the logit alone)
    rerank_prior: float | None = None
    label_smoothing: float = 0.0
    #: p(z|x) = softmax(scale · q·d): the scale to start from. None: 20.0 for a fresh model, the
    #: saved model's own for ``init_from`` (a model saved before the scale existed has 1.0).
    #: Measured: scale 20 moves a reader's squad-open dev EM 19 -> 21 and F1 24.5 -> 30.2.
    doc_score_scale: float | None = None
    #: whether the optimizer trains the scale (with ``optim.lr``, no weight decay); it only gets a
    #: gradient when training retrieves (the rag objective)
    learn_doc_score_scale: bool = True
    #: None: keep the generator's own limits
    max_source_length: int | None = None
    max_target_length: int | None = None

    def validate(self) -> list[str]:
        problems = _at_least(1, self, "n_docs", "lexical_k", "max_source_length", "max_target_length",
                             "rerank_candidates")
        if self.rerank_candidates is not None and self.rerank_candidates > 2048:
            problems.append(f"rerank_candidates: at most 2048 (the retriever's largest k), got {self.rerank_candidates}")
        problems += _positive(self, "doc_score_scale") + _non_negative(self, "rerank_prior")
        if self.pointer_init is not None and self.init_from is not None:
            problems.append("pointer_init: applies to a new copy head; init_from loads its saved one")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        return problems


@dataclass(frozen=True)
class TrainOptim:
    """AdamW, linear warm-up then linear decay to zero at ``max_steps``; sizes are per worker.

    ``max_minutes`` (optional) stops all workers at the same step once the wall-clock budget is
    spent, which is how same-budget comparisons are made.
    """

    batch_size: int = 8
    lr: float = 1e-4
    #: the query encoder starts well trained and wants a smaller step; None: ``lr``
    query_encoder_lr: float | None = 1e-5
    #: the copy head's pointer/gate weights start from scratch and want a larger step (measured:
    #: lr 3e-4 + head 3e-3 gave EM 4.0 after 96 reader steps, 1e-4 + 1e-3 gave 0.0; bench_copy_head);
    #: None: ``lr``
    copy_head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 1000
    max_minutes: float | None = None
    #: max gradient norm; 0 disables clipping
    grad_clip: float = 1.0
    #: bf16 autocast for the training forward/backward (weights and optimizer stay fp32): 1.4x
    #: faster steps on AVX512-BF16 CPUs, and the usual choice on GPUs; p(z|x) stays fp32.
    precision: Literal["fp32", "bf16"] = "fp32"

    def validate(self) -> list[str]:
        return (_at_least(1, self, "batch_size", "max_steps")
                + _at_least(0, self, "warmup_steps", "weight_decay", "grad_clip")
                + _positive(self, "lr", "query_encoder_lr", "copy_head_lr", "max_minutes"))


@dataclass(frozen=True)
class TrainEval:
    """Dev evaluation on rank 0 every ``every`` steps and at the end."""

    every: int = 200
    #: dev questions per evaluation; 0: no evaluation
    questions: int = 200
    #: one of ``model.mode.decodings``; None: the mode's default (the first)
    decoding: str | None = None
    num_beams: int = 1
    max_new_tokens: int = 16
    #: answers found in a retrieved passage are scored as written there (RagPipeline's span recovery)
    span_recovery: bool = True
    #: where the last evaluation writes each question's prediction (JSONL, as ``eval-qa
    #: --predictions``, for ``rag-ray compare``); None: not written
    predictions: str | None = None

    def validate(self) -> list[str]:
        return _at_least(1, self, "every", "num_beams", "max_new_tokens") + _at_least(0, self, "questions")


@dataclass(frozen=True)
class TrainCheckpoint:
    """Checkpoints under ``storage_path/name`` (a local path or a URI such as s3://...)."""

    every: int = 200
    storage_path: str = "runs"
    name: str = "rag-squad-open"
    #: another run's checkpoint folder to start from (a restarted worker resumes from this run's own)
    resume_from: str | None = None
    num_to_keep: int = 2
    #: worker failures Ray Train recovers from (each resumes from the latest checkpoint); -1: no limit
    max_failures: int = 2

    def validate(self) -> list[str]:
        problems = _at_least(1, self, "every", "num_to_keep") + _at_least(-1, self, "max_failures")
        return problems + ([] if self.name else ["name: give the run a name"])


@dataclass(frozen=True)
class TrainIndexRefresh:
    """The rag objective with ``model.train_passage_encoder``: the passage encoder drifts from the
    one that embedded the index, so retrieval would search ever staler vectors. Every ``every``
    steps, and once after the last step, rank 0 re-embeds the index's corpus with the encoder being
    trained (the same Ray Data build as ``rag-ray index``) into a new version under ``root``, starts
    its shard actors, and every worker searches it from the next step on. The user's index is never
    written; the run's report names the version its model goes with."""

    #: steps between refreshes; 0: only the one after the last step (the model and its index match)
    every: int = 0
    #: the index root the refreshed versions go to; None: ``<checkpoint.storage_path>/<name>/<name>-index``
    root: str | None = None
    #: embedding actors of a refresh (one CPU and one torch thread each); None: one per CPU that
    #: Ray reports free while training holds its own (the training waits meanwhile)
    embedders: int | None = None

    def validate(self) -> list[str]:
        return _at_least(0, self, "every") + _at_least(1, self, "embedders")


@dataclass(frozen=True)
class TrainScaling:
    """Ray Train's ScalingConfig: one DDP worker per GPU (nccl) or per CPU slot (gloo)."""

    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    #: None: torch's default thread count
    torch_threads: int | None = None
    #: how Ray places the workers' bundles: PACK (fewest nodes: fast DDP) or SPREAD (one node's
    #: loss takes out fewer workers); STRICT_ variants fail rather than fall back
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self) -> list[str]:
        return _at_least(1, self, "num_workers", "torch_threads") + _positive(self, "cpus_per_worker")


@dataclass(frozen=True)
class TrainConfig:
    """``rag-ray train``: joint fine-tuning of query encoder + generator against a frozen index.

    ``objective: reader`` trains the generator alone on gold passages looked up in ``data.corpus``
    (see :class:`Objective`); its model is an ``model.init_from`` for the ``rag`` runs, and is
    evaluated as RAG-Sequence over ``index`` when one is given.
    """

    #: the frozen index searched in training and evaluation; None for closed-book or reader runs
    index: str | None = "indexes/squad-open"
    objective: Objective = Objective.RAG
    seed: int = 0
    #: where to write the final report (JSON); None: only returned
    report: str | None = None
    log_every: int = 10
    #: retrieve batch t+1 on a thread while batch t computes
    prefetch: bool = True
    #: True: the training rows reshuffled globally every epoch (reproducible from ``seed``);
    #: False: file order (benchmarks feed identical batches)
    shuffle: bool = True
    #: record the first batches' retrieved passage ids in the metrics (tests compare them)
    log_retrievals: bool = False
    data: TrainData = field(default_factory=TrainData)
    model: TrainModel = field(default_factory=TrainModel)
    optim: TrainOptim = field(default_factory=TrainOptim)
    eval: TrainEval = field(default_factory=TrainEval)
    checkpoint: TrainCheckpoint = field(default_factory=TrainCheckpoint)
    scaling: TrainScaling = field(default_factory=TrainScaling)
    index_refresh: TrainIndexRefresh = field(default_factory=TrainIndexRefresh)
    ray: RayConfig = field(default_factory=RayConfig)

    @property
    def refreshes_index(self) -> bool:
        """Whether the run rebuilds its index (the rag objective training the passage encoder)."""
        return self.retrieves_in_training and self.model.train_passage_encoder

    @property
    def retrieves_in_training(self) -> bool:
        """Whether training steps search the index (the rag objective in a retrieving mode)."""
        return self.objective is Objective.RAG and self.model.mode.retrieves

    @property
    def searches_in_training(self) -> bool:
        """Whether training steps search the index: the rag objective in a retrieving mode, and the
        reranker objective (its negatives are the retriever's candidates)."""
        return self.retrieves_in_training or self.objective is Objective.RERANKER

    @property
    def scores_passages(self) -> bool:
        """Whether the loss has q·d in it (the rag objective retrieving, or the retriever objective):
        only then do the query encoder and the scale on q·d get a gradient."""
        return self.retrieves_in_training or self.objective is Objective.RETRIEVER

    @property
    def trains_query_encoder(self) -> bool:
        return self.scores_passages and not self.model.freeze_query_encoder

    def validate(self) -> list[str]:
        problems = _at_least(1, self, "log_every")
        for name in ("data", "model", "optim", "eval", "checkpoint", "scaling", "index_refresh"):
            problems += [f"{name}.{p}" for p in getattr(self, name).validate()]
        mode = self.model.mode
        if self.retrieves_in_training and self.index is None:
            problems.append(f"index: model.mode {mode.value!r} retrieves passages, give an index directory")
        if self.objective is Objective.RERANKER and self.index is None:
            problems.append("index: objective 'reranker' learns to reorder the index's candidates; give an index "
                            "directory")
        if self.objective is Objective.RETRIEVER:
            if self.index is None:
                problems.append("index: objective 'retriever' trains against the index's stored passage vectors; "
                                "give an index directory")
            if self.model.freeze_query_encoder:
                problems.append("model.freeze_query_encoder: objective 'retriever' trains only the query encoder")
        elif self.model.train_passage_encoder and not self.retrieves_in_training:
            problems.append("model.train_passage_encoder: applies to objective 'retriever', or 'rag' in a retrieving "
                            f"mode (got objective {self.objective.value!r}, mode {mode.value!r})")
        if self.refreshes_index and "://" in self.checkpoint.storage_path and self.index_refresh.root is None:
            problems.append("index_refresh.root: checkpoint.storage_path is a URI; give a directory every node reads "
                            "(the refreshed index's shard actors load it by path)")
        if self.index_refresh != TrainIndexRefresh() and not self.refreshes_index:
            problems.append("index_refresh: applies to the rag objective with model.train_passage_encoder")
        if self.data.gold_in_top_k and not self.retrieves_in_training:
            problems.append("data.gold_in_top_k: applies to the rag objective in a retrieving mode (sequence or token)")
        if self.objective is Objective.READER:
            if self.data.corpus is None:
                problems.append("data.corpus: objective 'reader' reads each question's gold passage from a "
                                "corpus (a corpus file or 'squad-open')")
            if mode is not Mode.SEQUENCE:
                problems.append(f"model.mode: objective 'reader' trains a RAG-Sequence model, got {mode.value!r}")
        if self.eval.decoding is not None and self.eval.decoding not in mode.decodings:
            problems.append(f"eval.decoding: {self.eval.decoding!r} does not apply to model.mode {mode.value!r} "
                            f"(use one of {list(mode.decodings)})")
        return problems


@dataclass(frozen=True)
class ServeLimits:
    """Bounds on every request field; a request beyond one gets a 4xx naming the field."""

    max_question_chars: int = 2000
    max_questions: int = 16
    max_n_docs: int = 20
    max_k: int = 100
    max_num_beams: int = 8
    max_new_tokens: int = 64
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class ServeAutoscaling:
    """The model deployment's replicas: Serve adds one when the ongoing requests per replica stay
    above ``target_ongoing_requests`` for ``upscale_delay_s``, and removes one after
    ``downscale_delay_s`` below it."""

    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    replica_cpus: float = 0.5
    #: torch threads per model replica; None: max(1, round(replica_cpus))
    torch_threads: int | None = None


@dataclass(frozen=True)
class ServeConfig:
    """``rag-ray serve``: a trained RagModel over a running index, behind Ray Serve's HTTP proxy.

    ``index`` is the index served at start (a root: its current version; or a version directory);
    ``POST /v1/admin/index`` swaps it at run time, to directories under ``index_roots`` only
    (default: the directory that holds ``index``). HTTP binds ``host`` (loopback by default);
    another host needs an API key (``$RAG_RAY_API_KEY`` or ``api_key_file``) unless
    ``allow_no_api_key`` says otherwise.
    """

    model: str = ""
    index: str | None = None
    index_roots: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_file: str | None = None
    allow_no_api_key: bool = False
    n_docs: int | None = None
    #: answers found in a retrieved passage are returned as written there (RagPipeline's span recovery)
    span_recovery: bool = True
    #: fuse BM25 candidates (top ``lexical_k``, default the k asked for) with the dense ones by
    #: default; a request's "hybrid" field overrides it
    hybrid: bool = False
    lexical_k: int | None = None
    max_batch_size: int = 8
    batch_wait_timeout_s: float = 0.02
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    request_timeout_s: float = 120.0
    swap_grace_s: float = 10.0
    autoscaling: ServeAutoscaling = field(default_factory=ServeAutoscaling)
    limits: ServeLimits = field(default_factory=ServeLimits)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> list[str]:
        problems = [] if self.model else ["model: give a saved RagModel directory (a checkpoint's model/)"]
        problems += _at_least(1, self, "port", "max_batch_size", "max_ongoing_requests", "max_queued_requests", "lexical_k")
        problems += _positive(self, "request_timeout_s", "batch_wait_timeout_s")
        a = self.autoscaling
        problems += [f"autoscaling.{p}" for p in _at_least(1, a, "min_replicas", "max_replicas", "torch_threads")]
        problems += [f"autoscaling.{p}" for p in _positive(a, "replica_cpus", "target_ongoing_requests")]
        if a.max_replicas < a.min_replicas:
            problems.append(f"autoscaling.max_replicas: {a.max_replicas} is below min_replicas {a.min_replicas}")
        problems += [f"limits.{p}" for p in _at_least(1, self.limits, *(f.name for f in dataclasses.fields(ServeLimits)))]
        if self.max_ongoing_requests < self.max_batch_size:
            problems.append(f"max_ongoing_requests: {self.max_ongoing_requests} is below max_batch_size "
                            f"{self.max_batch_size}, so batches could never fill")
        return problems


@dataclass(frozen=True)
class EvalConfig:
    """``rag-ray eval-qa`` and ``jobs/evaluate.py``: EM / F1 / NLL / recall of a saved RagModel.

    ``model`` and ``index`` are local paths or URIs (s3://, gs://, file://), downloaded once into a
    local cache; ``index`` None means the index the model was trained against (its metadata).
    ``mode``, ``n_docs`` and ``decoding`` None mean the model's own. ``retrieval`` adds the dense vs.
    BM25 recall table of the same questions; ``report`` also writes the result there as JSON.
    ``hybrid``: retrieval fuses BM25 candidates (top ``lexical_k``, None: as many as asked for)
    with the dense ones, and the recall table gets a hybrid column.
    """

    model: str = ""
    index: str | None = None
    questions: str = "squad-open:dev"
    limit: int | None = None
    mode: Mode | None = None
    n_docs: int | None = None
    decoding: str | None = None
    num_beams: int = 1
    max_new_tokens: int = 16
    #: answers found in a retrieved passage are scored as written there (RagPipeline's span recovery)
    span_recovery: bool = True
    retrieval: bool = False
    hybrid: bool = False
    lexical_k: int | None = None
    #: read each question from its gold passage alone (a passage of its doc_id holding the answer,
    #: looked up in the index), no search: the reader's ceiling
    gold_passage: bool = False
    #: a model with a reranker reads the reranker's top n_docs of its ``rerank_candidates``;
    #: False: the retriever's top n_docs (the reranker's ablation)
    rerank: bool = True
    #: the reranker's w in logit - w·ln(1 + retriever rank) instead of its saved one (None); 0 is
    #: the logit alone (the prior's ablation)
    rerank_prior: float | None = None
    #: read p(z|x) = softmax(scale · q·d) at this scale instead of the model's own (None); 1.0 is
    #: the unscaled cosine softmax that issue 11's item 1 replaced (its ablation)
    doc_score_scale: float | None = None
    report: str | None = None
    #: also write each question's prediction, EM and F1 here (JSONL): ``rag-ray compare`` reads two
    predictions: str | None = None
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> list[str]:
        problems = [] if self.model else ["model: give a saved RagModel directory (a checkpoint's model/)"]
        problems += [] if self.questions else ["questions: give a question file or squad-open:dev"]
        problems += _at_least(1, self, "limit", "n_docs", "lexical_k", "num_beams", "max_new_tokens")
        problems += _positive(self, "doc_score_scale") + _non_negative(self, "rerank_prior")
        if self.decoding is not None and self.decoding not in DECODINGS:
            problems.append(f"decoding: {self.decoding!r} is not one of {list(DECODINGS)}")
        elif self.mode is not None and self.decoding is not None and self.decoding not in self.mode.decodings:
            problems.append(f"decoding: {self.decoding!r} does not apply to mode {self.mode.value!r} "
                            f"(use one of {list(self.mode.decodings)})")
        if self.gold_passage and (self.hybrid or self.retrieval or (self.mode is not None and not self.mode.retrieves)):
            problems.append("gold_passage: reads the gold passage instead of searching, so it goes with neither "
                            "hybrid, retrieval nor mode closed_book")
        return problems


# ----------------------------------------------------------------------------- loading

def _convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for arg in options:
            sub: list[str] = []
            out = _convert(arg, value, where, sub)
            if not sub:
                return out
        if len(options) == 1:  # X | None: X's own message ("is not one of [...]", "expected an integer")
            problems.extend(sub)
        else:
            problems.append(f"{where}: {value!r} is not a valid {tp}")
        return None
    if origin is Literal:
        if value not in args:
            problems.append(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: expected a list, got {type(value).__name__}")
            return []
        return [_convert(args[0] if args else Any, v, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {type(value).__name__}")
            return {}
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, where, problems)
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            problems.append(f"{where}: {value!r} is not one of {[m.value for m in tp]}")
            return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            problems.append(f"{where}: expected an integer, got {value!r}")
            return value
        try:
            return int(value)
        except ValueError:
            problems.append(f"{where}: expected an integer, got {value!r}")
            return value
    if tp is float:
        if isinstance(value, bool):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type[T], data: Any, where: str, problems: list[str]) -> T:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or cls.__name__}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            # a field that moved into a section (e.g. ``lr`` -> ``optim.lr``) is named there
            moved = [f"{where + '.' if where else ''}{name}.{key}" for name, tp in hints.items()
                     if dataclasses.is_dataclass(tp) and key in {f.name for f in dataclasses.fields(tp)}]
            hint = f"; did you mean {' or '.join(moved)}?" if moved else ""
            problems.append(f"{where + '.' if where else ''}{key}: unknown field "
                            f"(known: {', '.join(sorted(names))}){hint}")
    kwargs = {k: _convert(hints[k], v, f"{where + '.' if where else ''}{k}", problems)
              for k, v in data.items() if k in names}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        problems.append(f"{where or cls.__name__}: {exc}")
        return cls()


def _set_path(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise ConfigError("overrides", [f"{dotted}: {key} is not a section"])
    data[keys[-1]] = value


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                validate: bool = True) -> T:
    """Build ``cls`` from a YAML file (optional) plus overrides (``["shards=4", "encoder.name=x"]``
    or a nested dict); every problem is collected and raised together as a ConfigError."""
    source = str(path) if path else cls.__name__
    data: dict = {}
    if path is not None:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(source, ["file does not exist"]) from None
        except yaml.YAMLError as exc:
            raise ConfigError(source, [f"invalid YAML: {exc}"]) from None
        if not isinstance(data, dict):
            raise ConfigError(source, ["the top level must be a mapping of field: value"])
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set_path(data, key, value)
    else:
        for item in overrides or []:
            if "=" not in item:
                raise ConfigError(source, [f"override {item!r} must look like key.sub=value"])
            key, raw = item.split("=", 1)
            _set_path(data, key.strip(), yaml.safe_load(raw) if raw else "")
    problems: list[str] = []
    cfg = _build(cls, data, "", problems)
    if not problems and validate and hasattr(cfg, "validate"):
        problems = cfg.validate()
    if problems:
        raise ConfigError(source, problems)
    return cfg


def to_dict(cfg: Any) -> dict:
    """A config as plain YAML/JSON values (an enum as its value), so reports and checkpoint
    metadata are readable anywhere and ``load_config(cls, overrides=to_dict(cfg))`` rebuilds it."""
    return _plain(cfg)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
