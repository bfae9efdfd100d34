"""Typed job configs: frozen dataclasses, loadable from YAML with ``key.sub=value`` overrides.

Every bad field is reported at once in one :class:`ConfigError` (torchtune's ``_validate``), and
the defaults run offline on a laptop: the packaged MiniLM encoder, a local loopback Ray.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from rag_ray.types import DEFAULT_ENCODER

T = TypeVar("T")


class ConfigError(ValueError):
    """All problems found in one config, one per line."""

    def __init__(self, source: str, problems: list[str]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)\n  " + "\n  ".join(problems))
        self.problems = problems


# ----------------------------------------------------------------------------- sections

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
    #: bf16 autocast for corpus embedding: 2.2x faster on CPUs with AVX512-BF16 at no measured
    #: recall cost on squad-open (docs/benchmarks.md); slow on CPUs without native bf16.
    precision: Literal["fp32", "bf16"] = "fp32"


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
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    embedders: int = 1
    embedder_cpus: float = 1.0
    embedder_gpus: float = 0.0
    torch_threads: int | None = None
    overwrite: bool = False
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> list[str]:
        problems = []
        if not self.corpus:
            problems.append("corpus: give at least one corpus file or directory")
        for name in ("max_words", "shards", "hnsw_m", "ef_search", "nprobe", "embedders"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.encoder.batch_size < 1 or self.encoder.max_length < 1:
            problems.append("encoder.batch_size and encoder.max_length must be >= 1")
        return problems


# ----------------------------------------------------------------------------- loading

def _convert(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            sub: list[str] = []
            out = _convert(arg, value, where, sub)
            if not sub:
                return out
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
            problems.append(f"{where + '.' if where else ''}{key}: unknown field (known: {', '.join(sorted(names))})")
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
    return dataclasses.asdict(cfg)


@dataclass(frozen=True)
class TrainConfig:
    """``rag-ray train``: joint fine-tuning of query encoder + generator against a frozen index.

    ``max_steps`` bounds the run; ``max_minutes`` (optional) stops all workers at the same step
    once the wall-clock budget is spent, which is how same-budget comparisons are made.

    ``mode: reader`` trains the generator alone on (gold passage, question) -> answer, with the
    gold passage looked up in ``corpus`` by each question's doc_id: a warm-up that teaches a small
    generator to read before joint training (the role BART-large's pretraining plays in the
    paper). Its output model is an ``init_from`` for the other modes.
    """

    index: str | None = "indexes/squad-open"
    train: str = "squad-open:train"
    dev: str | None = "squad-open:dev"
    init_from: str | None = None
    query_encoder: str = DEFAULT_ENCODER
    generator: str = DEFAULT_ENCODER
    copy_head: bool | None = None
    mode: Literal["sequence", "token", "closed_book", "reader"] = "sequence"
    corpus: str | None = None
    freeze_query_encoder: bool = False
    n_docs: int = 5
    batch_size: int = 8
    lr: float = 1e-4
    query_encoder_lr: float | None = 1e-5
    #: the copy head's pointer/gate weights start from scratch and want a larger step (measured:
    #: lr 3e-4 + head 3e-3 gave EM 4.0 after 96 reader steps, 1e-4 + 1e-3 gave 0.0; bench_copy_head)
    copy_head_lr: float | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_steps: int = 1000
    max_minutes: float | None = None
    grad_clip: float = 1.0
    label_smoothing: float = 0.0
    max_source_length: int | None = None
    max_target_length: int | None = None
    #: bf16 autocast for the training forward/backward (weights and optimizer stay fp32): 1.4x
    #: faster steps on AVX512-BF16 CPUs, and the usual choice on GPUs; p(z|x) stays fp32.
    precision: Literal["fp32", "bf16"] = "fp32"
    log_every: int = 10
    eval_every: int = 200
    eval_questions: int = 200
    eval_decoding: Literal["greedy", "beam", "thorough", "fast"] | None = None
    eval_num_beams: int = 1
    eval_max_new_tokens: int = 16
    checkpoint_every: int = 200
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    torch_threads: int | None = None
    prefetch: bool = True
    shuffle: bool = True
    storage_path: str = "runs"
    name: str = "rag-squad-open"
    max_failures: int = 2
    resume_from: str | None = None
    report: str | None = None
    log_retrievals: bool = False
    seed: int = 0
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> list[str]:
        problems = []
        if self.mode in ("sequence", "token") and not self.index:
            problems.append(f"index: mode {self.mode!r} retrieves passages, give an index directory")
        if self.mode == "reader" and not self.corpus:
            problems.append("corpus: mode 'reader' reads each question's gold passage from a corpus "
                            "(a corpus file or 'squad-open')")
        for name in ("n_docs", "batch_size", "max_steps", "log_every", "eval_every", "checkpoint_every",
                     "num_workers", "eval_num_beams", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            problems.append(f"lr: must be > 0, got {self.lr}")
        if self.eval_questions < 0 or self.warmup_steps < 0:
            problems.append("eval_questions and warmup_steps must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            problems.append(f"max_minutes: must be > 0, got {self.max_minutes}")
        # a reader is evaluated as RAG-Sequence over retrieved passages (when an index is given)
        decodings = {"sequence": ("thorough", "fast"), "token": ("greedy", "beam"), "closed_book": ("greedy", "beam"),
                     "reader": ("thorough", "fast")}
        if self.eval_decoding and self.eval_decoding not in decodings[self.mode]:
            problems.append(f"eval_decoding: {self.eval_decoding!r} does not apply to mode {self.mode!r} "
                            f"(use one of {decodings[self.mode]})")
        return problems
