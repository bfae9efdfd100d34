"""The copy head (pointer-generator, See et al. 2017): a seq2seq model that can also copy
source tokens, so a small generator learns to lift answer spans out of a passage on a CPU budget.

It wraps any HF seq2seq model and returns log p_mix as its "logits", so RAG marginalisation, HF
``generate``/beam search and save/load treat it like any other generator. Kept apart from
``generator.py``, which only loads generators and assembles prompts.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from rag_ray.errors import RagRayError
from rag_ray.types import POINTER_INITS


@dataclass
class PointerEncoderOutput(BaseModelOutput):
    """Encoder output that also carries the source token ids the copy distribution scatters onto.

    Keeping the ids inside ``encoder_outputs`` lets HF ``generate`` expand them per beam together
    with the hidden states, so beam search needs no special casing. ``pointer_keys`` (from
    ``PointerGenerator.pointer_keys``) lets an incremental decoder project the fixed encoder states
    once rather than at every step, as the KV cache does for cross-attention.
    """

    source_ids: torch.LongTensor | None = None
    pointer_keys: torch.Tensor | None = None


class _SourceKeepingEncoder(nn.Module):
    """``get_encoder()`` of the copy head: the base encoder plus the source ids in its output."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.main_input_name = "input_ids"

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
    ) -> PointerEncoderOutput:
        out = self.encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        return PointerEncoderOutput(
            last_hidden_state=out.last_hidden_state,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
            source_ids=input_ids,
        )


class PointerGenerator(PreTrainedModel, GenerationMixin):
    """A seq2seq model with a copy head: p(y_t) = g·p_vocab + (1−g)·Σ_s a_ts·[src_s = y_t].

    ``a`` is a learned pointer attention of the last decoder state over the encoder states and
    ``g`` a learned gate from the decoder state and the pointer context. ``logits`` in the output
    are log p_mix (already normalised), so ``log_softmax`` downstream is the identity and every
    consumer of seq2seq logits works unchanged. The config is a copy of the base model's.
    """

    main_input_name = "input_ids"
    base_model_prefix = "base"
    _supports_cache_class = True
    # attention is the base model's business; these flags only stop PreTrainedModel's init checks
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, base: PreTrainedModel, pointer_dim: int | None = None, init: str = "small") -> None:
        # a copy: PreTrainedModel.__init__ rewrites attention settings on the config it is given
        super().__init__(copy.deepcopy(base.config))
        self.base = base
        enc_dim = _hidden_size(base.config, "encoder")
        dec_dim = _hidden_size(base.config, "decoder")
        pointer_dim = pointer_dim or dec_dim
        self.pointer_dim = pointer_dim
        self.query = nn.Linear(dec_dim, pointer_dim)
        self.key = nn.Linear(enc_dim, pointer_dim, bias=False)
        self.gate = nn.Linear(dec_dim + enc_dim, 1)
        for lin in (self.query, self.key, self.gate):
            nn.init.normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        if init == "identity":
            if not enc_dim == dec_dim == pointer_dim:
                raise RagRayError(f"pointer init 'identity' needs equal encoder, decoder and pointer sizes; "
                                  f"got {enc_dim}, {dec_dim} and {pointer_dim}: use 'small'")
            with torch.no_grad():
                self.query.weight.copy_(torch.eye(pointer_dim))
                self.key.weight.copy_(torch.eye(pointer_dim))
        elif init != "small":
            raise RagRayError(f"pointer init must be one of {POINTER_INITS}, got {init!r}")
        self.generation_config = base.generation_config
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The base is already initialised (or loaded) and the pointer layers are set in __init__."""

    def get_encoder(self, *args, **kwargs) -> _SourceKeepingEncoder:
        return _SourceKeepingEncoder(self.base.get_encoder())

    def get_decoder(self, *args, **kwargs) -> nn.Module:
        return self.base.get_decoder()

    def get_input_embeddings(self) -> nn.Module:
        return self.base.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.base.get_output_embeddings()

    def head_parameters(self) -> list[nn.Parameter]:
        """The copy head's own (newly initialised) weights: optimizers give them their own lr."""
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """The copy head's own parameters (the base is saved by its own ``save_pretrained``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base.")}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        encoder_outputs: BaseModelOutput | tuple | None = None,
        cache=None,
        use_cache: bool | None = None,
        return_dict: bool | None = True,
        **kwargs,
    ) -> Seq2SeqLMOutput:
        if encoder_outputs is None:
            if input_ids is None:
                raise ValueError("PointerGenerator needs input_ids or encoder_outputs (with source_ids)")
            encoder_outputs = self.get_encoder()(input_ids=input_ids, attention_mask=attention_mask)
        source_ids = getattr(encoder_outputs, "source_ids", None)
        if source_ids is None:
            source_ids = input_ids
        if source_ids is None:
            raise ValueError(
                "the copy head needs the source token ids: pass input_ids, or encoder_outputs from "
                "PointerGenerator.get_encoder() (which carry source_ids)"
            )
        enc_h = encoder_outputs[0]
        if attention_mask is None:
            attention_mask = torch.ones(source_ids.shape, dtype=torch.long, device=source_ids.device)
        out = self.base(
            attention_mask=attention_mask,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            encoder_outputs=BaseModelOutput(last_hidden_state=enc_h),
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=True,
            return_dict=True,
        )
        keys = getattr(encoder_outputs, "pointer_keys", None)
        log_p = self.mix(out.logits, out.decoder_hidden_states[-1], enc_h, attention_mask, source_ids, keys)
        return Seq2SeqLMOutput(
            logits=log_p,
            cache=out.cache,
            decoder_hidden_states=out.decoder_hidden_states,
            encoder_last_hidden_state=enc_h,
        )

    def pointer_keys(self, enc_h: torch.Tensor) -> torch.Tensor:
        """[..., S, H] encoder states -> [..., S, P] keys of the pointer attention."""
        return self.key(enc_h)

    def mix(
        self,
        vocab_logits: torch.Tensor,
        dec_h: torch.Tensor,
        enc_h: torch.Tensor,
        source_mask: torch.Tensor,
        source_ids: torch.LongTensor,
        keys: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[N, T, V] vocab logits -> [N, T, V] log p_mix, computed in log space for stability.
        Each decoder position mixes on its own, so T may be just the newest token of a cached
        decode; ``keys`` are ``pointer_keys(enc_h)`` when the caller already has them."""
        q = self.query(dec_h)  # N,T,P
        k = self.pointer_keys(enc_h) if keys is None else keys  # N,S,P
        att = torch.einsum("ntp,nsp->nts", q, k) / math.sqrt(self.pointer_dim)
        att = att.float().masked_fill(~source_mask.bool()[:, None, :], torch.finfo(torch.float32).min)
        a = att.softmax(-1)  # N,T,S
        context = torch.einsum("nts,nsh->nth", a.to(enc_h.dtype), enc_h)
        g_logit = self.gate(torch.cat([dec_h, context], -1)).float()  # N,T,1
        copy = torch.zeros(vocab_logits.shape, dtype=torch.float32, device=vocab_logits.device)
        copy.scatter_add_(-1, source_ids[:, None, :].expand(-1, a.shape[1], -1), a)
        log_vocab = torch.log_softmax(vocab_logits.float(), -1) + nn.functional.logsigmoid(g_logit)
        log_copy = torch.log(copy.clamp_min(1e-30)) + nn.functional.logsigmoid(-g_logit)
        return torch.logaddexp(log_vocab, log_copy)


def _hidden_size(config, side: str) -> int:
    sub = getattr(config, side, None)
    cfg = sub if sub is not None and hasattr(sub, "hidden_size") else config
    for attr in ("hidden_size", "d_model"):
        if getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise RagRayError(f"cannot find the hidden size of {type(config).__name__}; set pointer_dim explicitly")
