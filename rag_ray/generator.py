"""The generator half of RAG: any HF seq2seq model behind one wrapper, and prompt assembly.

Three checkpoint families load through one door (``Generator.from_pretrained``): BART/T5-style
seq2seq checkpoints via ``AutoModelForSeq2SeqLM``, saved ``EncoderDecoderModel`` checkpoints, and
plain encoder checkpoints (BERT, MiniLM) that are warm-started into a BERT2BERT
``EncoderDecoderModel``. Any of them can be wrapped in the copy head (``copy_head.py``), whose
output "logits" are log p_mix, so RAG marginalisation, HF ``generate``/beam search, save/load and
the equivalence tests with transformers' RAG treat every generator alike.

Prompt assembly lives here, not in retrieval: a passage is joined to its question as
``title / text // question`` (the RAG paper's format; configurable), and the passage text, not
the question, is cut when the prompt exceeds ``max_source_length``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Protocol, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, EncoderDecoderModel, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from rag_ray.copy_head import PointerEncoderOutput, PointerGenerator
from rag_ray.encoders import DEFAULT_ENCODER, default_device, resolve_model_path
from rag_ray.errors import RagRayError
from rag_ray.types import NEW_HEAD_POINTER

DEFAULT_TEMPLATE = "{title} / {text} // {question}"
CLOSED_BOOK_TEMPLATE = "{question}"
_SETTINGS_FILE = "rag_ray_generator.json"
_COPY_HEAD_FILE = "copy_head.safetensors"


class PassageLike(Protocol):
    """Anything with a title and a text (the retriever's ``Hit``, a corpus row, a test stub)."""

    title: str
    text: str


class Generator(nn.Module):
    """A seq2seq model, its tokenizer and the prompt format, as one trainable, savable unit.

    ``model`` is any HF seq2seq ``PreTrainedModel`` (BART, T5, ``EncoderDecoderModel``) or a
    ``PointerGenerator`` around one; ``forward`` returns its "logits" either way.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer,
        *,
        template: str = DEFAULT_TEMPLATE,
        closed_book_template: str = CLOSED_BOOK_TEMPLATE,
        max_source_length: int = 256,
        max_target_length: int = 32,
        name: str = "",
    ) -> None:
        super().__init__()
        for field in ("{question}",):
            if field not in template or field not in closed_book_template:
                raise RagRayError(f"templates must contain {field}; got {template!r} / {closed_book_template!r}")
        if max_source_length < 8 or max_target_length < 2:
            raise RagRayError(
                f"max_source_length must be >= 8 and max_target_length >= 2, got "
                f"{max_source_length} and {max_target_length}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.closed_book_template = closed_book_template
        self.max_source_length = max_source_length
        self.max_target_length = max_target_length
        self.name = name
        for attr in ("decoder_start_token_id", "pad_token_id", "eos_token_id"):
            if getattr(model.config, attr, None) is None:
                raise RagRayError(
                    f"generator config lacks {attr}; set it on model.config and model.generation_config "
                    "(Generator.from_pretrained does this for BERT2BERT)"
                )

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_ENCODER,
        *,
        copy_head: bool | None = None,
        pointer_init: str | None = None,
        template: str | None = None,
        closed_book_template: str | None = None,
        max_source_length: int | None = None,
        max_target_length: int | None = None,
        device: str | torch.device | None = None,
    ) -> "Generator":
        """Load a saved Generator, a seq2seq checkpoint, or warm-start BERT2BERT from an encoder.

        ``copy_head=None`` keeps a saved generator's choice and otherwise adds the copy head only
        when warm-starting from an encoder checkpoint (the offline default: BERT2BERT from MiniLM
        learns to copy answers on a CPU budget, plain BERT2BERT does not). ``pointer_init``
        (``types.POINTER_INITS``; None: ``NEW_HEAD_POINTER``) is how a new copy head starts; a
        saved one loads as saved.
        """
        path = resolve_model_path(name_or_path)
        settings_file = Path(path) / _SETTINGS_FILE
        settings: dict = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        try:
            config = AutoConfig.from_pretrained(path)
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as exc:
            raise RagRayError(
                f"cannot load generator {name_or_path!r}: {exc}. Give a local checkpoint directory, a hub "
                f"id available offline, or {DEFAULT_ENCODER!r} for BERT2BERT from the packaged MiniLM."
            ) from exc
        if config.is_encoder_decoder:
            model = AutoModelForSeq2SeqLM.from_pretrained(path)
            warm_started = False
        else:
            model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
            warm_started = True
        _set_special_tokens(model, tokenizer)
        if copy_head is None:
            copy_head = settings.get("copy_head", warm_started)
        head_file = Path(path) / _COPY_HEAD_FILE
        saved_head = bool(copy_head and settings.get("copy_head") and head_file.is_file())
        if pointer_init is not None and (saved_head or not copy_head):
            raise RagRayError(f"pointer_init {pointer_init!r} starts a new copy head, and {name_or_path!r} "
                              + ("has a saved one" if saved_head else "gets none (copy_head is off)"))
        if copy_head:  # a new head's pointer starts as attention over the encoder states (NEW_HEAD_POINTER)
            init = "small" if saved_head else (pointer_init or NEW_HEAD_POINTER)
            model = PointerGenerator(model, pointer_dim=settings.get("pointer_dim"), init=init)
            if saved_head:
                missing = model.load_state_dict(load_file(str(head_file)), strict=False)
                if missing.unexpected_keys:
                    raise RagRayError(f"{head_file} has unexpected keys {missing.unexpected_keys}")
        gen = cls(
            model,
            tokenizer,
            template=template or settings.get("template", DEFAULT_TEMPLATE),
            closed_book_template=closed_book_template
            or settings.get("closed_book_template", CLOSED_BOOK_TEMPLATE),
            max_source_length=max_source_length or settings.get("max_source_length", 256),
            max_target_length=max_target_length or settings.get("max_target_length", 32),
            name=settings.get("name", name_or_path),
        )
        return gen.to(device or default_device())

    def settings(self) -> dict:
        return {
            "name": self.name,
            "copy_head": self.copy_head,
            "pointer_dim": getattr(self.model, "pointer_dim", None),
            "template": self.template,
            "closed_book_template": self.closed_book_template,
            "max_source_length": self.max_source_length,
            "max_target_length": self.max_target_length,
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Base weights as safetensors (HF), tokenizer, copy head (safetensors) and settings."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = self.model.base if self.copy_head else self.model
        base.save_pretrained(directory, safe_serialization=True)
        self.tokenizer.save_pretrained(directory)
        if self.copy_head:
            head = {k: v.detach().contiguous().cpu() for k, v in self.model.head_state_dict().items()}
            save_file(head, str(directory / _COPY_HEAD_FILE))
        (directory / _SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2))

    # -- properties --------------------------------------------------------------------------

    @property
    def copy_head(self) -> bool:
        return isinstance(self.model, PointerGenerator)

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_token_id(self) -> int:
        return int(self.config.pad_token_id)

    @property
    def decoder_start_token_id(self) -> int:
        return int(self.config.decoder_start_token_id)

    @property
    def eos_token_id(self) -> int:
        return int(self.config.eos_token_id)

    @property
    def bos_token_id(self) -> int | None:
        bos = getattr(self.config, "bos_token_id", None)
        return None if bos is None else int(bos)

    # -- prompts and targets -----------------------------------------------------------------

    def format_prompt(self, question: str, passage: PassageLike | None = None, text: str | None = None) -> str:
        """``title / text // question`` for one passage, or the closed-book prompt without one."""
        if passage is None:
            return self.closed_book_template.format(question=question)
        return self.template.format(
            title=passage.title, text=passage.text if text is None else text, question=question
        )

    def build_inputs(
        self, questions: Sequence[str], passages: Sequence[Sequence[PassageLike]] | None
    ) -> dict[str, torch.Tensor]:
        """Prompts for every (question, passage) pair, flattened question-major: [B*K, L].

        When a prompt is too long the passage text is shortened (by tokens) so the question,
        which comes last in the default template, survives truncation.
        """
        if passages is None:
            prompts = [self.format_prompt(q) for q in questions]
        else:
            prompts = []
            for q, row in zip(questions, passages):
                prompts.extend(self._fit_prompt(q, p) for p in row)
        batch = self.tokenizer(
            prompts, padding=True, truncation=True, max_length=self.max_source_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"].to(self.device), "attention_mask": batch["attention_mask"].to(self.device)}

    def _fit_prompt(self, question: str, passage: PassageLike) -> str:
        prompt = self.format_prompt(question, passage)
        n = len(self.tokenizer(prompt, add_special_tokens=True, verbose=False)["input_ids"])
        if n <= self.max_source_length:
            return prompt
        text_ids = self.tokenizer(passage.text, add_special_tokens=False, verbose=False)["input_ids"]
        keep = max(0, len(text_ids) - (n - self.max_source_length) - 2)
        return self.format_prompt(question, passage, text=self.tokenizer.decode(text_ids[:keep]))

    def build_targets(self, answers: Sequence[str]) -> torch.LongTensor:
        """[B, T] decoder sequences ``start, answer tokens, eos, pad...`` (RAG's label layout:
        the same tensor is the decoder input and, shifted left by one, the target)."""
        ids = self.tokenizer(list(answers), truncation=True, max_length=self.max_target_length)["input_ids"]
        start = self.decoder_start_token_id
        rows = [row if row and row[0] == start else [start, *row] for row in ids]
        width = max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return out.to(self.device)

    def decode(self, sequences: torch.Tensor) -> list[str]:
        return [s.strip() for s in self.tokenizer.batch_decode(sequences, skip_special_tokens=True)]

    # -- model calls -------------------------------------------------------------------------

    def encode(self, input_ids: torch.LongTensor, attention_mask: torch.Tensor) -> BaseModelOutput:
        """Encoder states (with source ids for the copy head), reusable across many decodes."""
        out = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        if isinstance(out, PointerEncoderOutput):
            return out
        return PointerEncoderOutput(last_hidden_state=out.last_hidden_state, source_ids=input_ids)

    def forward(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.LongTensor,
        encoder_outputs: BaseModelOutput | None = None,
    ) -> torch.Tensor:
        """[N, T, V] next-token logits (log p_mix for the copy head) for each decoder position."""
        return self._call(input_ids, attention_mask, decoder_input_ids, encoder_outputs, None, False).logits

    def step(
        self,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.LongTensor,
        encoder_outputs: BaseModelOutput,
        cache: Cache | None,
    ) -> tuple[torch.Tensor, Cache]:
        """Incremental decoding: [N, t, V] logits for the ``t`` decoder tokens not yet in ``cache``,
        and the cache extended by them. ``cache=None`` lets the model start its own (self- and
        cross-attention), so callers need not know the architecture's cache layout."""
        out = self._call(None, attention_mask, decoder_input_ids, encoder_outputs, cache, True)
        return out.logits, out.cache

    def _call(
        self,
        input_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor,
        decoder_input_ids: torch.LongTensor,
        encoder_outputs: BaseModelOutput | None,
        cache: Cache | None,
        use_cache: bool,
    ) -> Seq2SeqLMOutput:
        if encoder_outputs is not None and not self.copy_head:
            encoder_outputs = BaseModelOutput(last_hidden_state=encoder_outputs.last_hidden_state)
        return self.model(
            input_ids=None if encoder_outputs is not None else input_ids,
            attention_mask=attention_mask,
            encoder_outputs=encoder_outputs,
            decoder_input_ids=decoder_input_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
        )


def _set_special_tokens(model: PreTrainedModel, tokenizer) -> None:
    """Fill the ids BERT2BERT lacks ([CLS] starts, [SEP] ends, [PAD] pads) on config and
    generation_config; forward and generate raise without them."""
    cfg, gen = model.config, model.generation_config

    def first(*values):
        return next((v for v in values if v is not None), None)

    start = first(getattr(cfg, "decoder_start_token_id", None), getattr(gen, "decoder_start_token_id", None),
                  tokenizer.cls_token_id, tokenizer.bos_token_id)
    pad = first(getattr(cfg, "pad_token_id", None), tokenizer.pad_token_id)
    eos = first(getattr(cfg, "eos_token_id", None), tokenizer.sep_token_id, tokenizer.eos_token_id)
    bos = first(getattr(cfg, "bos_token_id", None), tokenizer.bos_token_id, tokenizer.cls_token_id)
    if start is None or pad is None or eos is None:
        raise RagRayError(
            f"cannot infer decoder_start/pad/eos token ids for {type(model).__name__} from its tokenizer; "
            "set them on model.config"
        )
    for c in (cfg, gen):
        c.decoder_start_token_id = int(start)
        c.pad_token_id = int(pad)
        c.eos_token_id = int(eos)
        c.bos_token_id = None if bos is None else int(bos)
    if getattr(cfg, "vocab_size", None) is None and getattr(cfg, "decoder", None) is not None:
        cfg.vocab_size = cfg.decoder.vocab_size
