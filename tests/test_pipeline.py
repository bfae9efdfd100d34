"""RagPipeline and `rag-ray ask`: question in, answer with its passages out (real Ray, tiny model)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import TOY_QUESTIONS, build_tiny_rag
from rag_ray.cli import main
from rag_ray.errors import RagRayError, user_error
from rag_ray.model import RagModel
from rag_ray.pipeline import RagPipeline
from rag_ray.retriever import Retriever
from rag_ray.training import Prefetcher


@pytest.fixture(scope="module")
def tiny(ray_local, toy_corpus, tmp_path_factory):
    return build_tiny_rag(tmp_path_factory.mktemp("pipeline"), toy_corpus, n_docs=2)


def test_answer_carries_passages_with_prior_and_posterior(tiny):
    index, model_dir = tiny
    model = RagModel.from_pretrained(model_dir, device="cpu")
    retriever = Retriever.load(index, query_encoder=model.query_encoder)
    pipeline = RagPipeline(model, retriever)
    questions = [q["question"] for q in TOY_QUESTIONS[:3]]
    answers = pipeline.answer(questions, mode="sequence", n_docs=2, decoding="fast", max_new_tokens=4)
    retrieved = pipeline.retrieve(questions, 2)
    for question, answer, hits in zip(questions, answers, retrieved.hits):
        assert answer.question == question and isinstance(answer.answer, str) and np.isfinite(answer.score)
        assert [p.passage_id for p in answer.passages] == [h.passage_id for h in hits]
        assert sum(p.prior for p in answer.passages) == pytest.approx(1.0, abs=1e-5)
        assert sum(p.posterior for p in answer.passages) == pytest.approx(1.0, abs=1e-5)
        # the prior is the softmax of the very q·d scores the index returned, times the model's scale
        assert model.doc_score_scale == pytest.approx(20.0)  # a new model's default
        # (FAISS's and torch's q·d differ in the last float32 digits, which the scale multiplies)
        scores = model.doc_score_scale * np.array([p.score for p in answer.passages])
        np.testing.assert_allclose([p.prior for p in answer.passages], np.exp(scores) / np.exp(scores).sum(),
                                   atol=1e-3)
    closed = RagPipeline(model).answer(questions[:1], mode="closed_book", max_new_tokens=4)
    assert closed[0].passages == []
    with pytest.raises(RagRayError, match="no index"):
        RagPipeline(model).answer(questions[:1], mode="sequence")
    retriever.shutdown()


def test_hybrid_pipeline_reads_fused_candidates_with_the_same_prior(tiny):
    """With ``hybrid`` the pipeline sends the questions along; every passage it reads, however it
    was found, gets p(z|x) = softmax(scale · q·d) of its returned score."""
    index, model_dir = tiny
    model = RagModel.from_pretrained(model_dir, device="cpu")
    retriever = Retriever.load(index, query_encoder=model.query_encoder)
    pipeline = RagPipeline(model, retriever, hybrid=True, lexical_k=3)
    questions = [q["question"] for q in TOY_QUESTIONS[:3]]
    retrieved = pipeline.retrieve(questions, 2)
    assert {h.source for hits in retrieved.hits for h in hits} <= {"dense", "lexical", "both"}
    assert any(h.source != "dense" for hits in retrieved.hits for h in hits)  # BM25 took part
    prefetch = Prefetcher(model, retriever, 2, True, hybrid=True, lexical_k=3)  # training's retrieval
    in_step = Prefetcher(model, retriever, 2, False, hybrid=True, lexical_k=3)  # training without prefetch
    for result in (prefetch.get(prefetch.submit(questions), questions), in_step.get(None, questions)):
        assert [[(h.passage_id, h.source) for h in hits] for hits in result.hits] == [
            [(h.passage_id, h.source) for h in hits] for hits in retrieved.hits]
    prefetch.close()
    answers = pipeline.answer(questions, mode="sequence", n_docs=2, decoding="fast", max_new_tokens=4)
    for answer, hits in zip(answers, retrieved.hits):
        assert [p.passage_id for p in answer.passages] == [h.passage_id for h in hits]
        scores = model.doc_score_scale * np.array([p.score for p in answer.passages])
        np.testing.assert_allclose([p.prior for p in answer.passages], np.exp(scores) / np.exp(scores).sum(),
                                   atol=1e-3)
    retriever.shutdown()


def test_serves_search_async_reads_the_rerankers_top_k_as_search_does(tiny):
    """Serve's path (``search_async`` on the index host's retriever) and the pipeline's own return the
    same passages: with a reranker, its top k of the hybrid candidates, each with its stored vector."""
    import asyncio

    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rag_ray.encoders import resolve_model_path
    from rag_ray.reranker import Reranker
    from rag_ray.types import DEFAULT_ENCODER

    index, model_dir = tiny
    model = RagModel.from_pretrained(model_dir, device="cpu")
    tok = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))
    torch.manual_seed(3)
    model.reranker = Reranker(BertForSequenceClassification(BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, num_labels=1)), tok, max_length=64).eval()
    retriever = Retriever.load(index, query_encoder=model.query_encoder)
    pipeline = RagPipeline(model, retriever, hybrid=True, lexical_k=3)
    questions = [q["question"] for q in TOY_QUESTIONS[:3]]
    vectors = pipeline.embed(questions)
    assert pipeline.candidates(2) == model.config.rerank_candidates == 20  # all 9 toy passages are candidates
    served = asyncio.run(pipeline.search_async(retriever, questions, vectors, 2))
    direct = pipeline.search(questions, vectors, 2)
    candidates = retriever.search(vectors, 20, questions=questions, lexical_k=3)
    for q, s_hits, d_hits, cands, row in zip(questions, served.hits, direct.hits, candidates.hits, range(3)):
        assert [h.passage_id for h in s_hits] == [h.passage_id for h in d_hits]
        best = model.reranker.order([q], [cands])[0][:2]
        assert [h.passage_id for h in s_hits] == [cands[j].passage_id for j in best]
        np.testing.assert_array_equal(served.vectors[row], candidates.vectors[row, best])
    served_hits = asyncio.run(pipeline.search_async(retriever, questions, vectors, 2, vectors=False))  # /v1/retrieve
    assert served_hits.vectors is None
    assert [[h.passage_id for h in hits] for hits in served_hits.hits] == [[h.passage_id for h in hits]
                                                                          for hits in served.hits]
    unranked = asyncio.run(RagPipeline(model, retriever, hybrid=True, lexical_k=3, rerank=False).search_async(
        retriever, questions, vectors, 2, vectors=False))
    assert unranked.vectors is None
    retrieved = [[h.passage_id for h in hits] for hits in retriever.search(vectors, 2, questions=questions,
                                                                           lexical_k=3).hits]
    assert [[h.passage_id for h in hits] for hits in unranked.hits] == retrieved
    assert [[h.passage_id for h in hits] for hits in served.hits] != retrieved  # the reranker did choose
    retriever.shutdown()


def test_rag_ray_ask_prints_answers_and_passages(tiny, capsys):
    index, model_dir = tiny
    question = TOY_QUESTIONS[1]["question"]
    assert main(["ask", "--model", str(model_dir), "--index", str(index), "--json", "--max-new-tokens", "4",
                 question]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(row) == {"question", "answer", "score", "passages"} and row["question"] == question
    assert len(row["passages"]) == 2
    assert set(row["passages"][0]) == {"passage_id", "doc_id", "title", "text", "score", "prior", "posterior", "source"}
    assert main(["ask", "--model", str(model_dir), "--index", str(index), "--max-new-tokens", "4", question]) == 0
    text = capsys.readouterr().out
    assert f"Q: {question}" in text and "A: " in text and "posterior" in text and row["passages"][0]["title"] in text
    assert main(["ask", "--model", str(model_dir), "--index", str(index), " "]) == 2
    assert "non-empty question" in capsys.readouterr().err


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys):
    assert main(["ask", "--model", str(tmp_path), "--index", str(tmp_path), "q?"]) == 2
    err = capsys.readouterr().err
    assert "is not a saved RagModel" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert user_error(ValueError("an internal bug")) is None
    assert user_error(RuntimeError("wrapper")) is None
    wrapped = RuntimeError("task failed")
    wrapped.cause = RagRayError("bad row")  # how Ray's task errors carry the original
    assert str(user_error(wrapped)) == "bad row"


def test_help_does_not_import_torch():
    code = ("import sys; from rag_ray.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'transformers', 'faiss', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
