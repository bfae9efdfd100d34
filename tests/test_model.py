"""RagModel against transformers' reference RAG heads, plus training, decoding and errors.

Tiny real models (hidden 32, 2 layers) with the packaged MiniLM tokenizer; no mocks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertLMHeadModel,
    BertModel,
    EncoderDecoderModel,
    RagConfig as HFRagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from rag_ray.encoders import DEFAULT_ENCODER, Encoder, resolve_model_path
from rag_ray.generator import Generator, PointerGenerator, _set_special_tokens
from rag_ray.errors import RagRayError
from rag_ray.model import Answer, RagConfig, RagModel

DIM = 32


@dataclass(frozen=True)
class P:
    title: str
    text: str


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))


def tiny_bert_config(tok, init: float = 0.3, **kw) -> BertConfig:
    # a wide init makes the untrained generator's output depend strongly on the passage, so the
    # equivalence tests would notice a wrong marginalisation
    return BertConfig(
        vocab_size=tok.vocab_size, hidden_size=DIM, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, initializer_range=init, **kw,
    )


def tiny_model(tok, copy_head: bool, seed: int = 0, init: float = 0.3, **cfg) -> RagModel:
    """Scale 1 on q·d unless asked (the comparisons with transformers' RAG start from raw q·d)."""
    cfg.setdefault("doc_score_scale", 1.0)
    torch.manual_seed(seed)
    qenc = Encoder(BertModel(tiny_bert_config(tok, init)), tok, name="tiny", pooling="mean")
    dec_cfg = tiny_bert_config(tok, init, is_decoder=True, add_cross_attention=True)
    ed = EncoderDecoderModel(encoder=BertModel(tiny_bert_config(tok, init)), decoder=BertLMHeadModel(dec_cfg))
    _set_special_tokens(ed, tok)
    gen = Generator(PointerGenerator(ed) if copy_head else ed, tok, max_source_length=64, max_target_length=12)
    return RagModel(qenc, gen, RagConfig(**cfg)).eval()


QUESTIONS = ["who wrote the novel about the whale?", "where is the eiffel tower?"]
ANSWERS = ["herman melville", "paris france"]
PASSAGES = [
    [P("Moby-Dick", "Moby-Dick is a novel by Herman Melville."), P("Whales", "Whales are mammals."),
     P("Books", "A novel is long fiction."), P("Sea", "The sea is salty.")],
    [P("Eiffel Tower", "The Eiffel Tower is in Paris, France."), P("Paris", "Paris is a city."),
     P("France", "France is in Europe."), P("Towers", "Towers are tall.")],
]


def doc_vectors(k: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(QUESTIONS), k, DIM, generator=g)


def hf_rag(model: RagModel, cls, **kw):
    gen = model.generator
    cfg = HFRagConfig.from_question_encoder_generator_configs(
        model.query_encoder.model.config, gen.model.config,
        decoder_start_token_id=gen.decoder_start_token_id, bos_token_id=gen.bos_token_id,
        eos_token_id=gen.eos_token_id, pad_token_id=gen.pad_token_id, **kw,
    )
    return cls(config=cfg, question_encoder=model.query_encoder.model, generator=gen.model).eval()


def hf_inputs(model: RagModel, k: int):
    gen = model.generator
    rows = [row[:k] for row in PASSAGES]
    inputs = gen.build_inputs(QUESTIONS, rows)
    q = model.query_encoder.embed(QUESTIONS)
    scores = model.doc_logits(q, doc_vectors()[:, :k])  # scale · q·d: q·d itself at scale 1
    return inputs, scores, gen.build_targets(ANSWERS)


@pytest.mark.parametrize("copy_head", [False, True])
@pytest.mark.parametrize("eps,scale", [(0.0, 1.0), (0.1, 1.0), (0.0, 20.0)])
def test_losses_equal_transformers(tokenizer, copy_head, eps, scale):
    """At scale 1 exactly transformers' RAG on q·d; at scale s transformers' RAG on s · q·d."""
    model = tiny_model(tokenizer, copy_head, label_smoothing=eps, doc_score_scale=scale)
    k = 3
    inputs, scores, labels = hf_inputs(model, k)
    for mode, cls in (("sequence", RagSequenceForGeneration), ("token", RagTokenForGeneration)):
        ours = model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(4), mode=mode, n_docs=k)
        ref = hf_rag(model, cls, n_docs=k, label_smoothing=eps)
        out = ref(
            context_input_ids=inputs["input_ids"], context_attention_mask=inputs["attention_mask"],
            doc_scores=scores, labels=labels, n_docs=k,
        )
        torch.testing.assert_close(ours.nll, out.loss, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.doc_scores, scores, atol=1e-6, rtol=1e-6)


def test_sequence_loglik_equals_transformers_exclude_bos(tokenizer):
    """The per-sequence log-likelihoods RAG-Sequence rescoring uses (exclude_bos_score=True)."""
    from rag_ray.losses import rag_sequence_nll

    model = tiny_model(tokenizer, copy_head=True)
    inputs, scores, labels = hf_inputs(model, 4)
    gen = model.generator
    logits = gen(inputs["input_ids"], inputs["attention_mask"], labels.repeat_interleave(4, 0))
    ours = rag_sequence_nll(logits, scores, labels, gen.pad_token_id, gen.bos_token_id, exclude_bos_score=True)
    ref = hf_rag(model, RagSequenceForGeneration, n_docs=4)(
        context_input_ids=inputs["input_ids"], context_attention_mask=inputs["attention_mask"],
        doc_scores=scores, labels=labels, n_docs=4, exclude_bos_score=True,
    )
    torch.testing.assert_close(ours, ref.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_query_encoder_gets_gradient(tokenizer, mode):
    model = tiny_model(tokenizer, copy_head=True)
    model.train()
    out = model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), mode=mode, n_docs=4)
    out.loss.backward()
    grads = [p.grad for p in model.query_encoder.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert out.doc_log_posterior.shape == (2, 4)


def test_retrieval_loss_is_dpr_cross_entropy_and_masks_a_shared_gold_passage(tokenizer):
    """-log softmax(scale · q·d) over every candidate of the batch at the question's own gold
    passage, computed by hand; a candidate that is the same passage as a question's gold one
    (another column) is masked, not counted as a negative."""
    model = tiny_model(tokenizer, copy_head=False, doc_score_scale=7.0)  # eval mode: no dropout, same q twice
    g = torch.Generator().manual_seed(3)
    pos, neg = torch.randn(2, DIM, generator=g), torch.randn(2, 1, DIM, generator=g)
    q = model.query_encoder.embed(QUESTIONS).detach().float()
    cand = torch.cat([pos, neg.reshape(-1, DIM)])
    logits = 7.0 * q @ cand.T
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(2))
    loss = model.retrieval_loss(QUESTIONS, pos, ["a", "b"], neg, [["x"], ["y"]])
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.query_encoder.parameters())
    assert model.log_doc_score_scale.grad is not None
    # question 1's hard negative is question 0's gold passage: masked for question 0 only
    masked = model.retrieval_loss(QUESTIONS, pos, ["a", "b"], neg, [["x"], ["a"]])
    logits[0, 3] = float("-inf")
    torch.testing.assert_close(masked, torch.nn.functional.cross_entropy(logits, torch.arange(2)), rtol=1e-4,
                               atol=1e-5)
    with pytest.raises(RagRayError, match="one gold passage per question"):
        model.retrieval_loss(QUESTIONS, pos, ["a"], neg, [["x"], ["y"]])


def test_closed_book_loss_is_plain_nll(tokenizer):
    model = tiny_model(tokenizer, copy_head=False)
    out = model.loss(QUESTIONS, ANSWERS, mode="closed_book")
    gen = model.generator
    inputs = gen.build_inputs(QUESTIONS, None)
    labels = gen.build_targets(ANSWERS)
    logits = gen(inputs["input_ids"], inputs["attention_mask"], labels)
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=gen.pad_token_id, reduction="none"
    ).sum(1)
    torch.testing.assert_close(out.nll, ref, atol=1e-5, rtol=1e-5)
    assert out.doc_log_prior.shape == (2, 0)


def _texts(model: RagModel, seqs: torch.Tensor) -> list[str]:
    return model.generator.decode(seqs)


@pytest.mark.parametrize("num_beams,copy_head", [(1, False), (1, True), (3, False)])
def test_rag_token_decoding_equals_transformers(tokenizer, num_beams, copy_head):
    model = tiny_model(tokenizer, copy_head)
    k = 3
    inputs, scores, _ = hf_inputs(model, k)
    ours_ids = model.generate_token_ids(inputs, scores, num_beams=num_beams, max_new_tokens=6)
    ref = hf_rag(model, RagTokenForGeneration, n_docs=k)
    ref_ids = ref.generate(
        context_input_ids=inputs["input_ids"], context_attention_mask=inputs["attention_mask"],
        doc_scores=scores, n_docs=k, num_beams=num_beams, max_length=7, do_sample=False,
    )  # HF's RAG-Token generate ignores max_new_tokens; max_length counts the start token
    assert ours_ids.tolist() == ref_ids.tolist()
    decoding = "greedy" if num_beams == 1 else "beam"
    answers = model.generate(QUESTIONS, PASSAGES, doc_vectors(), mode="token", decoding=decoding,
                             num_beams=num_beams, max_new_tokens=6, n_docs=k)
    assert [a.text for a in answers] == _texts(model, ref_ids)
    for a in answers:
        assert isinstance(a, Answer) and len(a.doc_posterior) == k
        assert abs(sum(a.doc_posterior) - 1) < 1e-4 and abs(sum(a.doc_prior) - 1) < 1e-4


# RAG-Token's KV cache against recomputing every prefix. Four questions with three passages each,
# and untrained generators whose hypotheses end at different steps: the copy head re-initialised
# sharp copies prompt tokens, the prompt's closing [SEP] (= EOS) among them; plain BERT2BERT gets
# its EOS logit raised. Each test asserts that its case really diverges, so it keeps its power.
KV_QUESTIONS = QUESTIONS + ["which river flows into the mediterranean?", "who created python?"]
KV_PASSAGES = [row[:3] for row in PASSAGES] + [
    [P("Nile", "The Nile flows into the Mediterranean Sea."), P("Rivers", "Rivers carry water."),
     P("Egypt", "Egypt is in Africa.")],
    [P("Python", "Python was created by Guido van Rossum."), P("Snakes", "Pythons are snakes."),
     P("Code", "Code runs on computers.")],
]
KV_NEW_TOKENS = 8


def kv_generator(tok, kind: str) -> Generator:
    """``bert2bert`` (no copy head), ``bert2bert_copy`` or ``bart_copy`` (a plain HF seq2seq base)."""
    torch.manual_seed(0)
    if kind == "bart_copy":
        base = BartForConditionalGeneration(BartConfig(
            vocab_size=tok.vocab_size, d_model=DIM, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
            decoder_start_token_id=tok.sep_token_id, forced_bos_token_id=None))
    else:
        base = tiny_model(tok, copy_head=False, init=0.1).generator.model
    if kind == "bert2bert":
        with torch.no_grad():
            base.get_output_embeddings().bias[tok.sep_token_id] += 1.5
        return Generator(base, tok, max_source_length=64, max_target_length=12).eval()
    model = PointerGenerator(base)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.head_parameters():
            p.normal_(0.0, 1.0)
    return Generator(model, tok, max_source_length=64, max_target_length=12).eval()


def kv_decode(gen: Generator, num_beams: int, use_cache: bool):
    from rag_ray.decoding import rag_token_generate

    inputs = gen.build_inputs(KV_QUESTIONS, KV_PASSAGES)
    scores = torch.randn(len(KV_QUESTIONS), 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return rag_token_generate(gen, inputs, scores, use_cache=use_cache, num_beams=num_beams,
                                  num_return_sequences=num_beams, max_new_tokens=KV_NEW_TOKENS,
                                  output_scores=True, return_dict_in_generate=True)


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("kind", ["bert2bert", "bert2bert_copy", "bart_copy"])
def test_rag_token_kv_cache_equals_recomputing_the_prefix(tokenizer, kind, num_beams):
    """One new token per step through the cache (beams reordered K passage rows at a time) gives the
    ids, step scores and beam scores of recomputing every prefix for every passage."""
    gen = kv_generator(tokenizer, kind)
    cached, full = kv_decode(gen, num_beams, use_cache=True), kv_decode(gen, num_beams, use_cache=False)
    assert cached.sequences.tolist() == full.sequences.tolist()
    assert len(cached.scores) == len(full.scores)
    for c, f in zip(cached.scores, full.scores):
        torch.testing.assert_close(c, f, atol=1e-5, rtol=1e-5)
    # the case diverges: EOS inside the batch, hypotheses of different lengths
    ends = [1 + s[1:].index(gen.eos_token_id) if gen.eos_token_id in s[1:] else KV_NEW_TOKENS + 1
            for s in cached.sequences.tolist()]
    assert min(ends) <= KV_NEW_TOKENS and len(set(ends)) > (2 if num_beams > 1 else 1), ends
    if num_beams > 1:
        torch.testing.assert_close(cached.sequences_scores, full.sequences_scores, atol=1e-5, rtol=1e-5)
        assert cached.beam_indices.tolist() == full.beam_indices.tolist()
        # ... and beam search moves hypotheses between beam slots, so the cache is really reordered
        moved = (cached.beam_indices[:, 1:] != cached.beam_indices[:, :-1]) & (cached.beam_indices[:, 1:] >= 0)
        assert int(moved.sum()) >= 3


def test_rag_token_kv_cache_test_catches_a_reorder_that_splits_passage_rows(tokenizer, monkeypatch):
    """The comparison above can fail: reordering the N·K cache rows as if they were the N beam rows
    (forgetting that each beam row owns K passage rows) changes the beam scores."""
    from rag_ray.decoding import _RagTokenDecoder

    gen = kv_generator(tokenizer, "bert2bert_copy")
    full = kv_decode(gen, 3, use_cache=False)

    def split_rows(self, cache, beam_idx):
        cache.reorder_cache(beam_idx.repeat_interleave(self.n_docs))
        return cache

    monkeypatch.setattr(_RagTokenDecoder, "_reorder_cache", split_rows)
    wrong = kv_decode(gen, 3, use_cache=True)
    same_ids = wrong.sequences.tolist() == full.sequences.tolist()
    assert not (same_ids and torch.allclose(wrong.sequences_scores, full.sequences_scores, atol=1e-5, rtol=1e-5))


# transformers' thorough decoding drops the context attention mask when it beams per passage
# (RagSequenceForGeneration.generate sets attention_mask=None), so pads would be attended to;
# the comparison uses one question at a time with passages of equal token length (no pads).
EQUAL_LENGTH = [P("Colours", f"{c} is the answer here .") for c in ("red", "blue", "green")]


@pytest.mark.parametrize("copy_head", [False, True])
def test_thorough_decoding_equals_transformers(tokenizer, copy_head):
    model = tiny_model(tokenizer, copy_head)
    k = 3
    ref = hf_rag(model, RagSequenceForGeneration, n_docs=k)
    for i, question in enumerate(QUESTIONS):
        inputs = model.generator.build_inputs([question], [EQUAL_LENGTH])
        assert bool(inputs["attention_mask"].all())
        vecs = doc_vectors()[i : i + 1, :k]
        scores = model.doc_scores(model.query_encoder.embed([question]), vecs)
        ref_ids = ref.generate(
            context_input_ids=inputs["input_ids"], context_attention_mask=inputs["attention_mask"],
            doc_scores=scores, n_docs=k, num_beams=3, max_new_tokens=6, do_sample=False,
        )
        answers = model.generate([question], [EQUAL_LENGTH], vecs, mode="sequence", decoding="thorough",
                                 num_beams=3, max_new_tokens=6, n_docs=k)
        assert [a.text for a in answers] == _texts(model, ref_ids)
        assert len(answers[0].doc_posterior) == k


@pytest.mark.parametrize("copy_head", [False, True])
def test_fast_equals_thorough_when_every_passage_generates_every_hypothesis(tokenizer, copy_head):
    """Identical passages give identical beams, so no hypothesis is missing from any beam."""
    model = tiny_model(tokenizer, copy_head)
    same = [[PASSAGES[0][0]] * 4, [PASSAGES[1][0]] * 4]
    kw = dict(mode="sequence", num_beams=3, max_new_tokens=6, n_docs=4)
    thorough = model.generate(QUESTIONS, same, doc_vectors(), decoding="thorough", **kw)
    fast = model.generate(QUESTIONS, same, doc_vectors(), decoding="fast", **kw)
    for t, f in zip(thorough, fast):
        assert t.text == f.text
        assert t.score == pytest.approx(f.score, abs=1e-4)
        np.testing.assert_allclose(t.doc_posterior, f.doc_posterior, atol=1e-4)


def test_closed_book_generate(tokenizer):
    model = tiny_model(tokenizer, copy_head=True)
    answers = model.generate(QUESTIONS, mode="closed_book", num_beams=2, max_new_tokens=4)
    assert len(answers) == 2 and all(a.doc_posterior == [] for a in answers)


TOPICS = ["apple", "river", "music", "stone", "cloud", "horse"]
NUMBERS = ["seven", "three", "nine", "five", "two", "eight", "four", "six"]


def toy_batch(rng: np.random.Generator, topic_vecs: torch.Tensor, size: int, k: int = 3):
    """The answer (a number word) is only in the passage about the question's topic; the
    passages' stored vectors are their topics' vectors, so retrieval must learn topic -> vector."""
    questions, answers, passages, vecs, gold = [], [], [], [], []
    for _ in range(size):
        topics = rng.choice(len(TOPICS), size=k, replace=False)
        numbers = rng.choice(len(NUMBERS), size=k, replace=False)
        questions.append(f"what number goes with {TOPICS[topics[0]]} ?")
        answers.append(NUMBERS[numbers[0]])
        perm = rng.permutation(k)
        passages.append([P(TOPICS[topics[j]], f"{TOPICS[topics[j]]} number is {NUMBERS[numbers[j]]} .") for j in perm])
        vecs.append(topic_vecs[topics[perm]])
        gold.append(int(np.argmax(perm == 0)))
    return questions, answers, passages, torch.stack(vecs), gold


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train ~10x faster on one thread than on two busy shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["sequence"])
def test_toy_task_learns_posterior_and_answer(tokenizer, mode):
    model = tiny_model(tokenizer, copy_head=True, init=0.02, seed=0)
    model.train()
    g = torch.Generator().manual_seed(0)
    topic_vecs = torch.nn.functional.normalize(torch.randn(len(TOPICS), DIM, generator=g), dim=-1) * 4
    rng = np.random.default_rng(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(250):
        q, a, p, v, _ = toy_batch(rng, topic_vecs, 8)
        loss = model.loss(q, a, p, v, mode=mode, n_docs=3).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    q, a, p, v, gold = toy_batch(np.random.default_rng(123), topic_vecs, 24)
    decoding = "thorough" if mode == "sequence" else "greedy"
    answers = model.generate(q, p, v, mode=mode, decoding=decoding, num_beams=2, max_new_tokens=4, n_docs=3)
    prior_on_gold = np.mean([ans.doc_prior[i] for ans, i in zip(answers, gold)])
    post_on_gold = np.mean([ans.doc_posterior[i] for ans, i in zip(answers, gold)])
    accuracy = np.mean([ans.text == gold_answer for ans, gold_answer in zip(answers, a)])
    assert prior_on_gold > 0.8, prior_on_gold
    assert post_on_gold > 0.8, post_on_gold
    assert accuracy > 0.8, (accuracy, [x.text for x in answers[:5]])


def test_bad_inputs_raise_clear_errors(tokenizer):
    model = tiny_model(tokenizer, copy_head=False)
    with pytest.raises(ValueError, match="question 1 is empty"):
        model.loss(["ok?", "  "], ANSWERS, PASSAGES, doc_vectors())
    with pytest.raises(ValueError, match="n_docs=5 but question 0 has only 4 passages"):
        model.generate(QUESTIONS, PASSAGES, doc_vectors(), n_docs=5)
    with pytest.raises(ValueError, match="dimension 16 but the query encoder outputs 32"):
        model.loss(QUESTIONS, ANSWERS, PASSAGES, torch.zeros(2, 4, 16), n_docs=4)
    with pytest.raises(ValueError, match=r"need \[2, >=4, D\]"):
        model.loss(QUESTIONS, ANSWERS, PASSAGES, torch.zeros(2, 3, DIM), n_docs=4)
    with pytest.raises(ValueError, match="one answer string per question"):
        model.loss(QUESTIONS, ["x"], PASSAGES, doc_vectors())
    with pytest.raises(ValueError, match="does not apply to mode 'token'"):
        model.generate(QUESTIONS, PASSAGES, doc_vectors(), mode="token", decoding="thorough", n_docs=4)
    with pytest.raises(ValueError, match="needs passages and doc_vectors"):
        model.loss(QUESTIONS, ANSWERS, mode="sequence")
    with pytest.raises(ValueError, match="mode must be one of"):
        model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), mode="tokens")


def test_numpy_doc_vectors_accepted(tokenizer):
    model = tiny_model(tokenizer, copy_head=False)
    out = model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors().numpy(), n_docs=4)
    assert out.doc_scores.shape == (2, 4)


def test_save_and_load_in_fresh_process(tokenizer, tmp_path):
    model = tiny_model(tokenizer, copy_head=True, n_docs=4, label_smoothing=0.1)
    target = tmp_path / "rag"
    model.save_pretrained(target)
    model.save_pretrained(target)  # overwriting an existing directory is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rag"]
    assert not list(target.rglob("*.bin")) and list(target.rglob("*.safetensors"))
    expected = model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors()).nll
    np.save(tmp_path / "vecs.npy", doc_vectors().numpy())
    script = f"""
import sys, json, numpy as np, torch
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_model import QUESTIONS, ANSWERS, PASSAGES
from rag_ray.model import RagModel
m = RagModel.from_pretrained({str(target)!r}, device="cpu").eval()
assert m.generator.copy_head and m.config.n_docs == 4 and m.config.label_smoothing == 0.1
out = m.loss(QUESTIONS, ANSWERS, PASSAGES, np.load({str(tmp_path / 'vecs.npy')!r}))
print(json.dumps(out.nll.tolist()))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = torch.tensor(__import__("json").loads(res.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)


def test_doc_score_scale_multiplies_the_scores_going_into_softmax(tokenizer):
    model = tiny_model(tokenizer, copy_head=True, doc_score_scale=20.0)
    assert model.doc_score_scale == pytest.approx(20.0)
    with torch.no_grad():
        raw = model.doc_scores(model.query_encoder.embed(QUESTIONS), doc_vectors())
        out = model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4)
        at_one = tiny_model(tokenizer, copy_head=True).loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4)
    torch.testing.assert_close(out.doc_scores, 20.0 * raw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.doc_log_prior, (20.0 * raw).log_softmax(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out.nll, at_one.nll, atol=1e-3)  # same weights, the scale alone changes the loss
    for mode, decoding in (("token", "greedy"), ("sequence", "thorough"), ("sequence", "fast")):
        answers = model.generate(QUESTIONS, PASSAGES, doc_vectors(), mode=mode, decoding=decoding, num_beams=2,
                                 max_new_tokens=4, n_docs=4)
        np.testing.assert_allclose([a.doc_prior for a in answers], (20.0 * raw).softmax(1).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="doc_score_scale must be a finite number > 0"):
        RagConfig(doc_score_scale=0.0)


def test_doc_score_scale_is_learned_saved_and_loaded_exactly(tokenizer, tmp_path):
    model = tiny_model(tokenizer, copy_head=True, doc_score_scale=20.0)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(3):
        loss = model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4).loss
        opt.zero_grad()
        loss.backward()
        assert model.log_doc_score_scale.grad is not None and float(model.log_doc_score_scale.grad.abs()) > 0
        opt.step()
    learned = model.doc_score_scale
    assert abs(learned - 20.0) > 0.1, learned  # Adam moves the log-scale by ~lr per step
    model.eval()
    model.save_pretrained(tmp_path / "rag")
    loaded = RagModel.from_pretrained(tmp_path / "rag", device="cpu").eval()
    assert torch.equal(loaded.log_doc_score_scale, model.log_doc_score_scale)
    assert loaded.log_doc_score_scale.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(loaded.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4).nll,
                                   model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4).nll)

    frozen = tiny_model(tokenizer, copy_head=True, doc_score_scale=20.0, learn_doc_score_scale=False)
    assert not frozen.log_doc_score_scale.requires_grad
    frozen.save_pretrained(tmp_path / "frozen")
    assert not RagModel.from_pretrained(tmp_path / "frozen", device="cpu").log_doc_score_scale.requires_grad


def test_model_saved_before_the_scale_loads_with_scale_one(tokenizer, tmp_path):
    import json

    model = tiny_model(tokenizer, copy_head=True, doc_score_scale=20.0).eval()
    model.save_pretrained(tmp_path / "old")
    # what save_pretrained wrote before the scale existed: no scale tensor, no config field
    (tmp_path / "old" / "doc_score_scale.safetensors").unlink()
    cfg_file = tmp_path / "old" / "rag_config.json"
    data = json.loads(cfg_file.read_text())
    del data["config"]["doc_score_scale"], data["config"]["learn_doc_score_scale"]
    cfg_file.write_text(json.dumps(data))
    old = RagModel.from_pretrained(tmp_path / "old", device="cpu").eval()
    assert old.doc_score_scale == 1.0
    with torch.no_grad():
        model.set_doc_score_scale(1.0)
        torch.testing.assert_close(old.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4).nll,
                                   model.loss(QUESTIONS, ANSWERS, PASSAGES, doc_vectors(), n_docs=4).nll)


def test_from_pretrained_missing_dir_is_clear(tmp_path):
    with pytest.raises(ValueError, match="not a saved RagModel"):
        RagModel.from_pretrained(tmp_path)
