"""The reranker's order: its logit weighed against the retriever's rank (a real tiny cross-encoder, no Ray)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from rag_ray.config import ConfigError, EvalConfig, TrainConfig, load_config
from rag_ray.encoders import resolve_model_path
from rag_ray.errors import RagRayError
from rag_ray.reranker import DEFAULT_RANK_PRIOR, Reranker
from rag_ray.types import DEFAULT_ENCODER, Hit

PASSAGES = ["Paris is the capital of France.", "The Rhine flows through Basel.", "Mount Fuji is in Japan.",
            "Canberra is the capital of Australia.", "The Nile flows north."]


@pytest.fixture(scope="module")
def reranker() -> Reranker:
    tok = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))
    torch.manual_seed(7)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=1))
    return Reranker(model, tok, max_length=64).eval()


def _hits(order: list[int]) -> list[Hit]:
    return [Hit(f"p{i}", f"d{i}", "", PASSAGES[i], 0.0) for i in order]


def test_rank_prior_decides_between_the_logit_and_the_retrievers_rank(reranker):
    """With w = 0 the logits alone order the candidates; a candidate the retriever put first keeps
    first place against a higher-scored one at rank 2 exactly while w·ln 2 exceeds the logit gap."""
    question = "What is the capital of France?"
    hits = _hits([0, 1, 2, 3, 4])
    logits = reranker.scores([question], [[h.text for h in hits]])[0]
    reranker.rank_prior = 0.0
    assert reranker.order([question], [hits])[0] == list(np.argsort(-logits, kind="stable"))
    # put the reranker's favourite second and its least favourite first: the two disagree
    fav, worst = int(np.argmax(logits)), int(np.argmin(logits))
    rest = [i for i in range(5) if i not in (fav, worst)]
    swapped = _hits([worst, fav, *rest])
    gap = float(logits[fav] - logits[worst])
    assert gap > 0
    threshold = gap / math.log(2)  # w at which rank 1's and rank 2's scores tie
    reranker.rank_prior = threshold * 0.9
    assert reranker.order([question], [swapped])[0][0] == 1  # the logit still wins
    reranker.rank_prior = threshold * 1.1
    assert reranker.order([question], [swapped])[0][0] == 0  # the retriever's first place holds
    reranker.rank_prior = 1e6
    assert reranker.order([question], [swapped])[0] == [0, 1, 2, 3, 4]  # the retriever's order
    reranker.rank_prior = DEFAULT_RANK_PRIOR


def test_rank_prior_is_saved_loaded_and_checked(reranker, tmp_path):
    reranker.rank_prior = 0.25
    reranker.save_pretrained(tmp_path / "r")
    reranker.rank_prior = DEFAULT_RANK_PRIOR
    assert Reranker.from_pretrained(str(tmp_path / "r")).rank_prior == 0.25
    settings = tmp_path / "r" / "rag_ray_reranker.json"
    saved = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in saved.items() if k != "rank_prior"}))
    assert Reranker.from_pretrained(str(tmp_path / "r")).rank_prior == DEFAULT_RANK_PRIOR  # saved before it existed
    settings.write_text(json.dumps({**saved, "rank_prior": -1}))
    with pytest.raises(RagRayError, match=r"rag_ray_reranker.json: rank_prior must be a finite number >= 0"):
        Reranker.from_pretrained(str(tmp_path / "r"))
    for cls, overrides in ((TrainConfig, {"objective": "reranker", "model.rerank_prior": -0.5}),
                           (EvalConfig, {"model": "m", "rerank_prior": -0.5})):
        with pytest.raises(ConfigError, match="rerank_prior: must be a finite number >= 0, got -0.5"):
            load_config(cls, overrides=overrides)
