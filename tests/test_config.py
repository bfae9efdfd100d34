"""Every shipped config loads and validates; bad configs report every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_ray.config import ConfigError, IndexConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def config_class(path: Path):
    from rag_ray import config

    if path.name.startswith("index"):
        return IndexConfig
    if path.name.startswith("train"):
        return config.TrainConfig
    if path.name.startswith("serve"):
        return config.ServeConfig
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
