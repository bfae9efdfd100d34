"""Span recovery: answers read back from the passage that holds them ("2,000", not "2, 000").

The packaged MiniLM tokenizer (uncased WordPiece, the default generator's); the end-to-end test
trains a tiny RAG model to copy two answers and asks it through RagPipeline over a real index.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer

from conftest import build_tiny_rag, write_jsonl
from rag_ray.encoders import DEFAULT_ENCODER, resolve_model_path
from rag_ray.pipeline import RagPipeline
from rag_ray.spans import answer_ids, find_span, recover_span


@dataclass(frozen=True)
class P:
    title: str
    text: str


PASSAGE = P("Treaty", "In 1990 about 2,000 delegates from the U.S. signed it in Geneva.")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def generated(tok, text: str) -> list[int]:
    """What the generator emits: start token, the answer's tokens, end token, pads."""
    return [tok.cls_token_id, *ids(tok, text), tok.sep_token_id, tok.pad_token_id, tok.pad_token_id]


def test_copied_ids_come_back_as_the_source_text(tok):
    assert tok.decode(ids(tok, "2,000")) == "2, 000" and tok.decode(ids(tok, "U.S.")) == "u. s."  # the problem
    assert find_span(tok, ids(tok, "2,000"), PASSAGE.text) == "2,000"
    assert find_span(tok, ids(tok, "U.S."), PASSAGE.text) == "U.S."
    assert find_span(tok, ids(tok, "from the u.s."), PASSAGE.text) == "from the U.S."
    assert find_span(tok, ids(tok, "2,000"), "no number here") is None
    assert answer_ids(tok, generated(tok, "2,000")) == ids(tok, "2,000")
    assert recover_span(tok, generated(tok, "2,000"), [PASSAGE], "2, 000") == "2,000"


def test_ids_in_no_passage_keep_the_decode(tok):
    seq = generated(tok, "Tokyo 1964")
    decoded = tok.decode(seq, skip_special_tokens=True)
    assert recover_span(tok, seq, [PASSAGE, P("Other", "Nothing relevant.")], decoded) == decoded == "tokyo 1964"
    assert recover_span(tok, [tok.cls_token_id, tok.sep_token_id], [PASSAGE], "") == ""  # an empty answer
    # not contiguous in the source: "2,000 u.s." never occurs as one run of tokens
    assert recover_span(tok, generated(tok, "2,000 U.S."), [PASSAGE], "fallback") == "fallback"


def test_passages_are_searched_most_probable_first_then_titles(tok):
    lower, upper = P("a", "aid from the u.s. arrived"), P("b", "aid from the U.S. arrived")
    assert recover_span(tok, generated(tok, "U.S."), [lower, upper], "x") == "u.s."
    assert recover_span(tok, generated(tok, "U.S."), [upper, lower], "x") == "U.S."
    assert recover_span(tok, generated(tok, "geneva convention"), [P("Geneva Convention", "A treaty.")], "x") == \
        "Geneva Convention"


# ----------------------------------------------------------------------------- end to end

DOCS = [{"id": "treaty", "title": "Treaty", "text": PASSAGE.text},
        {"id": "village", "title": "Village", "text": "The village near the U.S. border has 2,000 people."}]
QUESTIONS = [{"question": "How many delegates signed?", "answers": ["2,000"]},
             {"question": "Where were the delegates from?", "answers": ["U.S."]}]


DECODE = dict(mode="sequence", n_docs=2, decoding="thorough", num_beams=2, max_new_tokens=6)


@pytest.fixture(scope="module")
def copier(ray_local, tmp_path_factory):
    """A tiny RAG model over a two-passage index, trained until it greedily copies both answers."""
    from rag_ray.model import RagModel
    from rag_ray.retriever import Retriever

    root = tmp_path_factory.mktemp("spans")
    index, model_dir = build_tiny_rag(root, write_jsonl(root / "corpus.jsonl", DOCS), n_docs=2)
    model = RagModel.from_pretrained(model_dir, device="cpu")
    retriever = Retriever.load(index, query_encoder=model.query_encoder)
    questions = [q["question"] for q in QUESTIONS]
    answers = [q["answers"][0] for q in QUESTIONS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    res = retriever.search(model.query_encoder.encode(questions), 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    tok = model.generator.tokenizer
    want = [tok.decode(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]  # "2, 000", "u. s."
    for _ in range(10):  # until it copies both answers (how many steps depends on the index's vectors)
        model.train()
        for _ in range(100):
            loss = model.loss(questions, answers, res.hits, res.vectors, mode="sequence").loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        got = RagPipeline(model, retriever, span_recovery=False).answer(questions, **DECODE)
        if [a.answer for a in got] == want:
            break
    torch.set_num_threads(threads)
    yield model, retriever
    retriever.shutdown()


def test_pipeline_answers_as_written_in_the_passage(copier):
    from rag_ray.evaluation import evaluate_qa

    model, retriever = copier
    questions = [q["question"] for q in QUESTIONS]
    kw = DECODE
    plain = RagPipeline(model, retriever, span_recovery=False).answer(questions, **kw)
    assert [a.answer for a in plain] == ["2, 000", "u. s."]  # the model generates the answers' tokens
    recovered = RagPipeline(model, retriever).answer(questions, **kw)
    assert [a.answer for a in recovered] == ["2,000", "U.S."]
    for a, b in zip(plain, recovered):
        assert a.score == b.score and a.passages == b.passages  # only the text changes
    token = RagPipeline(model, retriever).answer(questions, **{**kw, "mode": "token", "decoding": "greedy"})
    assert [a.answer for a in token] == ["2,000", "U.S."]

    rows = [{"question": q["question"], "answers": q["answers"], "doc_id": ""} for q in QUESTIONS]
    on = evaluate_qa(model, retriever, rows, mode="sequence", n_docs=2, num_beams=2, max_new_tokens=6)
    off = evaluate_qa(model, retriever, rows, mode="sequence", n_docs=2, num_beams=2, max_new_tokens=6,
                      span_recovery=False)
    assert on["dev_em"] == 1.0 and off["dev_em"] == 0.0  # SQuAD normalisation: "2 000" != "2000"
