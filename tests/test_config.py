"""Every shipped config loads and validates; bad configs report every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_ray.config import ConfigError, IndexConfig, load_config
from rag_ray.errors import RagRayError

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def config_class(path: Path):
    from rag_ray import config

    if path.name.startswith("index"):
        return IndexConfig
    if path.name.startswith("train"):
        return config.TrainConfig
    if path.name.startswith("serve"):
        return config.ServeConfig
    if path.name.startswith("eval"):
        return config.EvalConfig
    raise AssertionError(f"no config class for {path.name}")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(config_class(path), path)
    assert cfg is not None


def test_all_problems_reported_together(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("corpus: [x.jsonl]\nshards: two\nindex_type: annoy\nencoder:\n  max_lenght: 12\nbogus: 1\n")
    with pytest.raises(ConfigError) as info:
        load_config(IndexConfig, bad)
    problems = "\n".join(info.value.problems)
    assert "shards: expected an integer, got 'two'" in problems
    assert "index_type: 'annoy' is not one of" in problems
    assert "encoder.max_lenght: unknown field" in problems
    assert "bogus: unknown field" in problems
    assert len(info.value.problems) == 4


def test_overrides_and_validation():
    cfg = load_config(IndexConfig, overrides=["corpus=[a.jsonl]", "shards=4", "encoder.max_length=128"])
    assert cfg.shards == 4 and cfg.encoder.max_length == 128 and cfg.corpus == ["a.jsonl"]
    with pytest.raises(ConfigError, match="shards: must be >= 1"):
        load_config(IndexConfig, overrides={"corpus": ["a"], "shards": 0})
    with pytest.raises(ConfigError, match="corpus: give at least one"):
        load_config(IndexConfig)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_open_with_their_launch_command(path):
    first = path.read_text().splitlines()[:6]
    assert first[0].startswith("#") and any("rag-ray " in line or "ray job submit" in line for line in first)


def test_train_config_reports_every_bad_field_with_its_section():
    from rag_ray.config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides={"optim.lr": 0, "model.n_docs": 0, "eval.every": 0, "log_every": 0,
                                            "scaling.cpus_per_worker": -1, "checkpoint.num_to_keep": 0,
                                            "optim.copy_head_lr": -1e-3, "eval.decoding": "beam",
                                            "objective": "reader", "index": None})
    problems = info.value.problems
    assert set(problems) == {
        "optim.lr: must be > 0, got 0.0",
        "optim.copy_head_lr: must be > 0, got -0.001",
        "model.n_docs: must be >= 1, got 0",
        "eval.every: must be >= 1, got 0",
        "log_every: must be >= 1, got 0",
        "scaling.cpus_per_worker: must be > 0, got -1.0",
        "checkpoint.num_to_keep: must be >= 1, got 0",
        "data.corpus: objective 'reader' reads each question's gold passage from a corpus (a corpus file or "
        "'squad-open')",
        "eval.decoding: 'beam' does not apply to model.mode 'sequence' (use one of ['thorough', 'fast'])",
    }, problems
    assert isinstance(info.value, RagRayError) and isinstance(info.value, ValueError)


def test_train_config_type_errors_name_the_section_and_moved_fields():
    from rag_ray.config import TrainConfig

    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, overrides=["model.mode=reader", "optim.batch_size=eight", "lr=1e-4",
                                            "objective=warmup"])
    problems = "\n".join(info.value.problems)
    assert "model.mode: 'reader' is not one of ['sequence', 'token', 'closed_book']" in problems
    assert "optim.batch_size: expected an integer, got 'eight'" in problems
    assert "lr: unknown field" in problems and "did you mean optim.lr?" in problems
    assert "objective: 'warmup' is not one of ['rag', 'reader', 'retriever', 'reranker']" in problems
    assert len(info.value.problems) == 4
    with pytest.raises(ConfigError, match="index: model.mode 'token' retrieves passages"):
        load_config(TrainConfig, overrides={"index": None, "model.mode": "token"})
    with pytest.raises(ConfigError, match="model.mode: objective 'reader' trains a RAG-Sequence model"):
        load_config(TrainConfig, overrides={"objective": "reader", "data.corpus": "c", "model.mode": "token"})
    with pytest.raises(ConfigError, match="objective 'retriever' trains against the index's stored passage vectors"):
        load_config(TrainConfig, overrides={"objective": "retriever", "index": None})
    with pytest.raises(ConfigError, match="model.rerank_candidates: at most 2048"):
        load_config(TrainConfig, overrides={"objective": "reranker", "model.rerank_candidates": 4096})
    with pytest.raises(ConfigError, match="data.hard_negatives: must be >= 0"):
        load_config(TrainConfig, overrides={"objective": "retriever", "data.hard_negatives": -1})
    with pytest.raises(ConfigError, match=r"model.pointer_init: 'eye' is not one of \['small', 'identity'\]"):
        load_config(TrainConfig, overrides={"model.pointer_init": "eye"})
    with pytest.raises(ConfigError, match="model.pointer_init: applies to a new copy head"):
        load_config(TrainConfig, overrides={"model.pointer_init": "identity", "model.init_from": "runs/x/model"})


def test_train_config_sections_enums_and_plain_round_trip():
    import json

    import yaml

    from rag_ray.config import Objective, TrainConfig, to_dict
    from rag_ray.types import Mode

    cfg = load_config(TrainConfig, CONFIGS / "train_reader_squad_open_cpu.yaml",
                      overrides=["model.mode=sequence", "optim.max_steps=5"])
    assert cfg.objective is Objective.READER and cfg.model.mode is Mode.SEQUENCE and cfg.optim.max_steps == 5
    assert not cfg.retrieves_in_training and not cfg.trains_query_encoder
    plain = to_dict(cfg)
    assert plain["objective"] == "reader" and type(plain["model"]["mode"]) is str
    assert yaml.safe_load(yaml.safe_dump(plain)) == plain and json.loads(json.dumps(plain)) == plain
    assert load_config(TrainConfig, overrides=plain) == cfg
    # defaults that used to hide behind `x or lr`: stated, and None means "same as optim.lr"
    default = TrainConfig()
    assert default.optim.query_encoder_lr == 1e-5 and default.optim.copy_head_lr is None
    assert default.retrieves_in_training and default.trains_query_encoder
    closed = load_config(TrainConfig, overrides={"model.mode": "closed_book", "index": None})
    assert not closed.retrieves_in_training and not closed.trains_query_encoder
