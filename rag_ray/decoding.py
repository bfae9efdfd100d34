"""RAG decoding: each strategy is a function of the generator, the prompts [B*K, L] and the
doc scores [B, K], so ``RagModel.generate`` only validates and dispatches.

RAG-Token runs HF greedy/beam search unchanged on a decoder-only view whose next-token
distribution is already marginalised over passages; the generator's KV cache (K passage rows per
beam row, reordered together) makes each step cost one new token, not the whole prefix.
RAG-Sequence beams per passage, then either rescores the union of hypotheses on every passage
(thorough) or keeps the beams' own scores (fast). Closed-book is plain HF ``generate`` on the
question alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput

from rag_ray.copy_head import PointerEncoderOutput
from rag_ray.generator import Generator
from rag_ray.losses import marginalize_tokens, per_doc_log_likelihood, rag_sequence_nll, rag_token_nll


@dataclass
class Answer:
    """One generated answer. ``score`` is log p(answer|question) under the decoding's model;
    ``doc_prior``/``doc_posterior`` are p(z|x) and p(z|x,answer) per retrieved passage;
    ``token_ids`` the generated sequence (start and end tokens included), which span recovery
    looks up in the passages; ``text`` its decode."""

    text: str
    score: float
    doc_posterior: list[float] = field(default_factory=list)
    doc_prior: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)


class _RagTokenDecoder(PreTrainedModel, GenerationMixin):
    """Decoder-only view of RAG-Token: the prefix in, marginalised next-token log-probs out.

    The encoder states of the K passages ride along as ``[N, K, L, H]`` model kwargs, which HF
    ``generate`` repeats per beam like any other input (N = batch·beams). With ``use_cache`` the
    generator's own KV cache (self-attention, plus cross-attention keys/values over the fixed
    encoder states, computed once) holds the N·K decoder rows, row ``n·K + z`` for passage z of
    beam row n, so each step feeds only the newest token; a beam reorder over N moves each row's K
    passage rows together (``_reorder_cache``). Without it every step recomputes the whole answer
    prefix for every passage (kept as the reference the cached path is tested against).
    """

    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, generator: Generator, n_docs: int, use_cache: bool = True) -> None:
        cfg = PretrainedConfig(
            vocab_size=generator.config.vocab_size if getattr(generator.config, "vocab_size", None) else None,
            is_encoder_decoder=False,
            pad_token_id=generator.pad_token_id,
            eos_token_id=generator.eos_token_id,
            bos_token_id=generator.bos_token_id,
            decoder_start_token_id=generator.decoder_start_token_id,
        )
        super().__init__(cfg)
        self.generator = generator
        self.n_docs = n_docs
        self.generation_config = GenerationConfig(
            pad_token_id=generator.pad_token_id,
            eos_token_id=generator.eos_token_id,
            bos_token_id=generator.bos_token_id,
            decoder_start_token_id=generator.decoder_start_token_id,
            use_cache=use_cache,
        )

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialise: all weights belong to the wrapped generator."""

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """No: ``generate`` would build a decoder-only cache from this bare config; the generator
        builds its own (with cross-attention) on the first step instead."""
        return False

    def prepare_inputs_for_generation(
        self, input_ids: torch.LongTensor, cache: Cache | None = None, use_cache: bool = False, **kwargs
    ) -> dict:
        """Once a cache holds the prefix, only the newest token goes in."""
        keys = ("encoder_hidden", "source_ids", "source_mask", "doc_scores", "pointer_keys")
        if cache is not None:
            input_ids = input_ids[:, -1:]
        return {"input_ids": input_ids, "cache": cache, "use_cache": use_cache, **{k: kwargs.get(k) for k in keys}}

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden: torch.Tensor,
        source_ids: torch.LongTensor,
        source_mask: torch.Tensor,
        doc_scores: torch.Tensor,
        pointer_keys: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """``attention_mask`` is accepted for ``generate`` and unused: answer prefixes have no pads."""
        k = encoder_hidden.shape[1]
        enc = PointerEncoderOutput(
            last_hidden_state=encoder_hidden.flatten(0, 1),
            source_ids=source_ids.flatten(0, 1),
            pointer_keys=None if pointer_keys is None else pointer_keys.flatten(0, 1),
        )
        dec_ids, mask = input_ids.repeat_interleave(k, 0), source_mask.flatten(0, 1)
        if use_cache:
            logits, cache = self.generator.step(mask, dec_ids, enc, cache)
        else:
            logits = self.generator(None, mask, dec_ids, encoder_outputs=enc)
        return CausalLMOutputWithPast(logits=marginalize_tokens(logits[:, -1:], doc_scores), cache=cache)

    def _reorder_cache(self, cache: Cache, beam_idx: torch.LongTensor) -> Cache:
        """Beam search picked beam row ``beam_idx[n]`` for row n: move its K passage rows with it."""
        k = self.n_docs
        rows = (beam_idx[:, None] * k + torch.arange(k, device=beam_idx.device)).flatten()
        cache.reorder_cache(rows)
        return cache


def rag_token_generate(
    gen: Generator,
    inputs: dict[str, torch.Tensor],
    doc_scores: torch.Tensor,
    *,
    use_cache: bool = True,
    **generate_kwargs,
) -> torch.LongTensor | ModelOutput:
    """HF ``generate`` (greedy or beam, as ``generate_kwargs`` say) of the RAG-Token view on
    prepared inputs: [B*K, L] prompts, [B, K] scores. ``use_cache=False`` recomputes each prefix."""
    b, k = doc_scores.shape
    enc = gen.encode(inputs["input_ids"], inputs["attention_mask"])
    per_question = {
        "encoder_hidden": enc.last_hidden_state,
        "source_ids": enc.source_ids,
        "source_mask": inputs["attention_mask"],
    }
    if use_cache and gen.copy_head:  # the copy head's keys, like cross-attention's, once per decode
        per_question["pointer_keys"] = gen.model.pointer_keys(enc.last_hidden_state)
    decoder = _RagTokenDecoder(gen, k, use_cache=use_cache)
    start = torch.full((b, 1), gen.decoder_start_token_id, dtype=torch.long, device=gen.device)
    return decoder.generate(
        input_ids=start,
        attention_mask=torch.ones_like(start),
        doc_scores=doc_scores,
        do_sample=False,
        **{name: t.view(b, k, *t.shape[1:]) for name, t in per_question.items()},
        **generate_kwargs,
    )


def rag_token_search(
    gen: Generator,
    inputs: dict[str, torch.Tensor],
    doc_scores: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    use_cache: bool = True,
) -> torch.LongTensor:
    """RAG-Token search on prepared inputs: [B*K, L] prompts, [B, K] scores -> [B, T] ids."""
    return rag_token_generate(
        gen, inputs, doc_scores, use_cache=use_cache, num_beams=num_beams, max_new_tokens=max_new_tokens
    )


def decode_token(
    gen: Generator, inputs: dict[str, torch.Tensor], doc_scores: torch.Tensor, num_beams: int, max_new_tokens: int,
    use_cache: bool = True,
) -> list[Answer]:
    """RAG-Token: greedy (``num_beams=1``) or beam search over the marginal next-token distribution."""
    seqs = rag_token_search(gen, inputs, doc_scores, num_beams, max_new_tokens, use_cache)
    k = doc_scores.shape[1]
    logits = gen(inputs["input_ids"], inputs["attention_mask"], seqs.repeat_interleave(k, 0))
    marginal = -rag_token_nll(logits, doc_scores, seqs, gen.pad_token_id)
    prior = doc_scores.log_softmax(1)
    post = (prior + per_doc_log_likelihood(logits, seqs, k, gen.pad_token_id)).softmax(1)
    return [
        Answer(text, float(s), p.tolist(), pr.tolist(), ids.tolist())
        for text, s, p, pr, ids in zip(gen.decode(seqs), marginal, post, prior.exp(), seqs)
    ]


def decode_closed_book(
    gen: Generator, inputs: dict[str, torch.Tensor], num_beams: int, max_new_tokens: int
) -> list[Answer]:
    """The generator alone: HF greedy/beam search on the question prompts [B, L]."""
    seqs = gen.model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
    logits = gen(inputs["input_ids"], inputs["attention_mask"], seqs)
    ll = per_doc_log_likelihood(logits, seqs, 1, gen.pad_token_id)[:, 0]
    return [Answer(text, float(s), token_ids=ids.tolist()) for text, s, ids in zip(gen.decode(seqs), ll, seqs)]


def decode_sequence_thorough(
    gen: Generator,
    inputs: dict[str, torch.Tensor],
    doc_scores: torch.Tensor,
    num_beams: int,
    max_new_tokens: int,
    dedup: bool,
) -> list[Answer]:
    """RAG-Sequence, thorough: the union of every passage's beam (``dedup``: each hypothesis once),
    rescored on every passage, and the hypothesis with the highest marginal p(y|x) kept."""
    k = doc_scores.shape[1]
    prior = doc_scores.log_softmax(1)
    answers = []
    beams = _beams_per_question(gen, inputs, k, num_beams, max_new_tokens, output_scores=False)
    for i, (ids, mask, out) in enumerate(beams):
        seqs = out.sequences  # [K*beams, T], passage-major
        if dedup:
            seqs = torch.stack(list({str(s.tolist()): s for s in seqs}.values()))
        c = seqs.shape[0]
        enc = gen.encode(ids, mask)
        enc_rep = PointerEncoderOutput(
            last_hidden_state=enc.last_hidden_state.repeat(c, 1, 1), source_ids=enc.source_ids.repeat(c, 1)
        )
        logits = gen(None, mask.repeat(c, 1), seqs.repeat_interleave(k, 0), encoder_outputs=enc_rep)
        nll = rag_sequence_nll(
            logits, doc_scores[i : i + 1].repeat(c, 1), seqs, gen.pad_token_id, gen.bos_token_id, exclude_bos_score=True
        )
        best = int((-nll).topk(1)[1][0])
        per_doc = per_doc_log_likelihood(logits, seqs, k, gen.pad_token_id)[best]
        post = (prior[i] + per_doc).softmax(0)
        text = gen.decode(seqs[best : best + 1])[0]
        answers.append(Answer(text, float(-nll[best]), post.tolist(), prior[i].exp().tolist(), seqs[best].tolist()))
    return answers


def decode_sequence_fast(
    gen: Generator, inputs: dict[str, torch.Tensor], doc_scores: torch.Tensor, num_beams: int, max_new_tokens: int
) -> list[Answer]:
    """RAG-Sequence, fast: no rescoring; a hypothesis not in a passage's beam gets probability 0
    there, so one beam search per passage is all the work."""
    k = doc_scores.shape[1]
    prior = doc_scores.log_softmax(1)
    answers = []
    beams = _beams_per_question(gen, inputs, k, num_beams, max_new_tokens, output_scores=True)
    for i, (_, _, out) in enumerate(beams):
        log_post, best, ll_best = _fast_scores(gen, out, prior[i], k, num_beams)
        text = gen.decode(out.sequences[best][None])[0]
        answers.append(Answer(text, float(ll_best), log_post.exp().tolist(), prior[i].exp().tolist(),
                              out.sequences[best].tolist()))
    return answers


def _beams_per_question(
    gen: Generator,
    inputs: dict[str, torch.Tensor],
    k: int,
    num_beams: int,
    max_new_tokens: int,
    output_scores: bool,
) -> Iterator[tuple[torch.LongTensor, torch.Tensor, ModelOutput]]:
    """For each question: its K prompts [K, L], their mask, and HF beam search on them
    (``num_beams`` hypotheses per passage, passage-major)."""
    for i in range(inputs["input_ids"].shape[0] // k):
        ids = inputs["input_ids"][i * k : (i + 1) * k]
        mask = inputs["attention_mask"][i * k : (i + 1) * k]
        out = gen.model.generate(
            input_ids=ids,
            attention_mask=mask,
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=output_scores,
            return_dict_in_generate=True,
        )
        yield ids, mask, out


def _fast_scores(
    gen: Generator, out: ModelOutput, prior: torch.Tensor, k: int, num_beams: int
) -> tuple[torch.Tensor, int, torch.Tensor]:
    """Fast decoding: log p(y|x,z) from the beam's own transition scores where y is in z's
    beam, -inf elsewhere; returns (log p(z|x,y) of the best y, its row, log p(y|x))."""
    seqs = out.sequences
    beam_indices = getattr(out, "beam_indices", None)
    trans = gen.model.compute_transition_scores(seqs, out.scores, beam_indices, normalize_logits=False)
    gen_tokens = seqs[:, 1:]
    valid = gen_tokens.ne(gen.pad_token_id)
    if gen.pad_token_id == gen.eos_token_id:
        valid = valid | (valid.cumsum(1) == 0)
    trans = trans.masked_fill(~valid[:, : trans.shape[1]], 0.0)
    bos = gen.bos_token_id
    if bos is not None and bool(gen_tokens[:, 0].eq(bos).all()):
        trans = trans[:, 1:]
    ll = trans.sum(1).view(k, num_beams)  # [K, beams]
    rows: dict[tuple[int, ...], int] = {}  # hypothesis -> row in `table`
    first_seen: list[int] = []  # hypothesis row -> index into seqs
    table: list[list[float]] = []  # [C, K] log p(y|x,z), -inf where y is not in z's beam
    for z in range(k):
        for j in range(num_beams):
            key = tuple(_strip(seqs[z * num_beams + j], gen.pad_token_id))
            if key not in rows:
                rows[key] = len(table)
                first_seen.append(z * num_beams + j)
                table.append([float("-inf")] * k)
            r = rows[key]
            table[r][z] = max(table[r][z], float(ll[z, j]))
    per_doc = torch.tensor(table, device=prior.device)  # [C, K]
    joint = per_doc + prior[None]
    marginal = joint.logsumexp(1)
    c = int(marginal.argmax())
    return joint[c].log_softmax(0), first_seen[c], marginal[c]


def _strip(seq: torch.Tensor, pad_token_id: int) -> list[int]:
    """Token ids without trailing pads (keeps at least one), so equal hypotheses compare equal."""
    ids = seq.tolist()
    while len(ids) > 1 and ids[-1] == pad_token_id:
        ids.pop()
    return ids
