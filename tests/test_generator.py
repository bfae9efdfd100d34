"""Generator loading (BERT2BERT warm start, BART, T5), prompts, copy head, save/load."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

from rag_ray.encoders import DEFAULT_ENCODER, resolve_model_path
from rag_ray.generator import Generator, PointerGenerator


@dataclass(frozen=True)
class P:
    title: str
    text: str


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))


def tiny_bart(tok):
    cfg = BartConfig(vocab_size=tok.vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64,
                     max_position_embeddings=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                     eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.sep_token_id, forced_bos_token_id=None)
    return BartForConditionalGeneration(cfg)


def tiny_t5(tok):
    cfg = T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id)
    return T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("build", [tiny_bart, tiny_t5])
@pytest.mark.parametrize("copy_head", [False, True])
def test_seq2seq_checkpoints_load_by_path_and_round_trip(tokenizer, tmp_path, build, copy_head):
    torch.manual_seed(0)
    model = build(tokenizer)
    model.save_pretrained(tmp_path / "ckpt")
    tokenizer.save_pretrained(tmp_path / "ckpt")
    gen = Generator.from_pretrained(str(tmp_path / "ckpt"), copy_head=copy_head, max_source_length=32, device="cpu")
    assert gen.copy_head == copy_head
    gen.eval()
    inputs = gen.build_inputs(["who?"], [[P("A", "alpha beta"), P("B", "gamma")]])
    target = gen.build_targets(["alpha", "gamma delta"])
    assert target[0, 0] == gen.decoder_start_token_id
    logits = gen(inputs["input_ids"], inputs["attention_mask"], target)
    torch.testing.assert_close(logits.log_softmax(-1).exp().sum(-1), torch.ones(logits.shape[:2]))
    out = gen.model.generate(**inputs, num_beams=2, max_new_tokens=3)
    assert out.shape[0] == 2
    gen.save_pretrained(tmp_path / "saved")
    again = Generator.from_pretrained(str(tmp_path / "saved"), device="cpu").eval()
    assert again.copy_head == copy_head and again.max_source_length == 32
    torch.testing.assert_close(again(inputs["input_ids"], inputs["attention_mask"], target), logits)


def test_default_is_bert2bert_from_minilm_with_copy_head():
    gen = Generator.from_pretrained(device="cpu")
    assert gen.copy_head and type(gen.model.base).__name__ == "EncoderDecoderModel"
    assert gen.decoder_start_token_id == gen.tokenizer.cls_token_id
    assert gen.eos_token_id == gen.tokenizer.sep_token_id
    # a new head's pointer starts as attention over the encoder states (the ablation's better arm)
    assert torch.equal(gen.model.key.weight, torch.eye(gen.model.pointer_dim))
    small = Generator.from_pretrained(device="cpu", pointer_init="small")
    assert float(small.model.key.weight.abs().max()) < 0.2


def test_prompt_template_and_truncation_keeps_question(tokenizer):
    torch.manual_seed(0)
    gen = Generator(tiny_bart(tokenizer), tokenizer, max_source_length=24)
    assert gen.format_prompt("q?", P("T", "body")) == "T / body // q?"
    assert gen.format_prompt("q?") == "q?"
    inputs = gen.build_inputs(["where is the key ?"], [[P("Long", "word " * 200)]])
    assert inputs["input_ids"].shape[1] <= 24
    assert tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True).endswith("where is the key?")
    custom = Generator(tiny_bart(tokenizer), tokenizer, template="question: {question} context: {title}. {text}")
    assert custom.format_prompt("q", P("T", "x")) == "question: q context: T. x"
    with pytest.raises(ValueError, match="must contain {question}"):
        Generator(tiny_bart(tokenizer), tokenizer, template="{title} {text}")


def test_copy_head_puts_mass_on_source_tokens(tokenizer):
    """With the gate forced to copy, p_mix equals the pointer attention scattered onto source ids."""
    torch.manual_seed(0)
    pg = PointerGenerator(tiny_bart(tokenizer)).eval()
    with torch.no_grad():
        pg.gate.bias.fill_(-30.0)
    src = torch.tensor([[tokenizer.cls_token_id, 2000, 3000, 2000, tokenizer.sep_token_id]])
    with torch.no_grad():
        out = pg(input_ids=src, attention_mask=torch.ones_like(src), decoder_input_ids=torch.tensor([[102, 5]]))
    probs = out.logits.exp()[0, -1]
    on_source = probs[src[0].unique()].sum()
    assert float(on_source) == pytest.approx(1.0, abs=1e-5)
    assert float(probs.sum()) == pytest.approx(1.0, abs=1e-4)


def test_identity_pointer_starts_as_attention_over_the_encoder_states(tokenizer, tmp_path):
    """pointer_init="identity": the pointer's first scores are decoder·encoder states / sqrt(d), far
    sharper than the default's (std 0.02 projections); a saved head loads as trained, not re-initialised."""
    torch.manual_seed(0)
    src = torch.tensor([[tokenizer.cls_token_id, 2000, 3000, 2000, 4000, tokenizer.sep_token_id]])
    mask = torch.ones_like(src)
    spreads = {}
    for init in ("small", "identity"):
        pg = PointerGenerator(tiny_bart(tokenizer), init=init).eval()
        with torch.no_grad():
            enc_h = pg.get_encoder()(input_ids=src, attention_mask=mask).last_hidden_state
            dec_h = torch.randn(1, 1, enc_h.shape[-1]) * enc_h.norm(dim=-1).mean() / enc_h.shape[-1] ** 0.5
            scores = torch.einsum("ntp,nsp->nts", pg.query(dec_h), pg.pointer_keys(enc_h)) / pg.pointer_dim ** 0.5
        if init == "identity":
            expected = torch.einsum("nth,nsh->nts", dec_h, enc_h) / enc_h.shape[-1] ** 0.5
            assert torch.allclose(scores, expected, atol=1e-5)
        spreads[init] = float(scores.std())
    assert spreads["identity"] > 10 * spreads["small"]

    gen = Generator.from_pretrained(DEFAULT_ENCODER, copy_head=True, pointer_init="identity", device="cpu")
    eye = torch.eye(gen.model.pointer_dim)
    assert torch.equal(gen.model.key.weight, eye) and torch.equal(gen.model.query.weight, eye)
    assert not gen.model.query.bias.any()
    with torch.no_grad():
        gen.model.key.weight.mul_(0.5)
    gen.save_pretrained(tmp_path / "gen")
    again = Generator.from_pretrained(str(tmp_path / "gen"), device="cpu")
    assert torch.equal(again.model.key.weight, gen.model.key.weight)
    with pytest.raises(ValueError, match="starts a new copy head, and .* has a saved one"):
        Generator.from_pretrained(str(tmp_path / "gen"), pointer_init="identity", device="cpu")
    with pytest.raises(ValueError, match=r"gets none \(copy_head is off\)"):
        Generator.from_pretrained(DEFAULT_ENCODER, copy_head=False, pointer_init="identity", device="cpu")

    with pytest.raises(ValueError, match="pointer init must be one of"):
        PointerGenerator(tiny_bart(tokenizer), init="eye")
    with pytest.raises(ValueError, match="needs equal encoder, decoder and pointer sizes"):
        PointerGenerator(tiny_bart(tokenizer), pointer_dim=16, init="identity")


def test_bad_checkpoint_is_clear(tmp_path):
    with pytest.raises(ValueError, match="cannot load generator"):
        Generator.from_pretrained(str(tmp_path / "nope"))
