"""RAG: a query encoder and a seq2seq generator joined by the retrieval posterior p(z|x).

Retrieval results come in as plain data (passages with ``.title``/``.text`` and their stored
vectors ``[B, K, D]``), so this module runs without Ray and without an index. The question is
re-embedded here and ``doc_scores = q·d`` recomputed in torch (as transformers' ``RagModel``
does), so the loss trains the query encoder while the passage vectors stay fixed.

Shapes: B questions, K passages per question, D vector size, L source tokens, T target tokens,
V vocabulary. Generator inputs are flattened question-major to ``[B*K, ...]``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from rag_ray.encoders import DEFAULT_ENCODER, Encoder, default_device
from rag_ray.generator import Generator, PassageLike, PointerEncoderOutput

Mode = Literal["sequence", "token", "closed_book"]
Decoding = Literal["greedy", "beam", "thorough", "fast"]
MODES: tuple[str, ...] = ("sequence", "token", "closed_book")
DECODINGS: dict[str, tuple[str, ...]] = {
    "sequence": ("thorough", "fast"),
    "token": ("greedy", "beam"),
    "closed_book": ("greedy", "beam"),
}
_CONFIG_FILE = "rag_config.json"
_FORMAT = "rag_ray.RagModel"


@dataclass(frozen=True)
class RagConfig:
    """Defaults of the RAG model; every one can be overridden per call."""

    mode: str = "sequence"
    n_docs: int = 5
    label_smoothing: float = 0.0
    num_beams: int = 4
    max_new_tokens: int = 20
    dedup: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.n_docs < 1:
            raise ValueError(f"n_docs must be >= 1, got {self.n_docs}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError(f"num_beams and max_new_tokens must be >= 1, got {self.num_beams}, {self.max_new_tokens}")

    @classmethod
    def from_dict(cls, data: dict) -> "RagConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown RagConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


@dataclass
class LossOutput:
    """``loss``: mean over the batch; ``nll``: per-question loss [B]; ``doc_scores``: q·d [B, K];
    ``doc_log_prior``: log p(z|x) [B, K]; ``doc_log_posterior``: log p(z|x,y) [B, K] under the
    sequence model (empty [B, 0] in closed-book mode)."""

    loss: torch.Tensor
    nll: torch.Tensor
    doc_scores: torch.Tensor
    doc_log_prior: torch.Tensor
    doc_log_posterior: torch.Tensor


@dataclass
class Answer:
    """One generated answer. ``score`` is log p(answer|question) under the decoding's model;
    ``doc_prior``/``doc_posterior`` are p(z|x) and p(z|x,answer) per retrieved passage."""

    text: str
    score: float
    doc_posterior: list[float] = field(default_factory=list)
    doc_prior: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Losses (the formulas of transformers' RagSequence/RagTokenForGeneration.get_nll)
# --------------------------------------------------------------------------------------------


def rag_sequence_nll(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.LongTensor,
    pad_token_id: int,
    bos_token_id: int | None = None,
    epsilon: float = 0.0,
    exclude_bos_score: bool = False,
) -> torch.Tensor:
    """-log Σ_z p(z|x) Π_t p(y_t|x,z,y<t) per question: [B*K, T, V], [B, K], [B, T] -> [B].

    ``target`` is the decoder input (start token first); predictions are scored against it
    shifted left, pads masked. Label smoothing and the placement of log p(z|x) on the second
    position follow the reference implementation, so numbers match it exactly.
    """
    n_docs = doc_scores.shape[1]
    target = torch.cat([target[:, 1:], target.new_full((target.shape[0], 1), pad_token_id)], 1)
    use_bos = bos_token_id is not None and bool(target[:, 0].eq(bos_token_id).all())
    seq_logprobs = seq_logits.log_softmax(-1).view(seq_logits.shape[0] // n_docs, n_docs, -1, seq_logits.shape[-1])
    doc_logprobs = doc_scores.log_softmax(1)[:, :, None, None]
    rag_logprobs = torch.cat(
        [seq_logprobs[:, :, :1], seq_logprobs[:, :, 1:2] + doc_logprobs, seq_logprobs[:, :, 2:]], dim=2
    )
    tgt = target[:, None, :, None].expand(-1, n_docs, -1, -1)
    ll = rag_logprobs.gather(-1, tgt).squeeze(-1)
    smooth = rag_logprobs.sum(-1)
    pad = target.eq(pad_token_id)[:, None, :]
    ll = ll.masked_fill(pad, 0.0)
    smooth = smooth.masked_fill(pad, 0.0)
    ll = ll[:, :, 1:].sum(2) if exclude_bos_score and use_bos else ll.sum(2)
    ll = ll.logsumexp(1)
    smooth = smooth.sum(2).logsumexp(1)
    eps_i = epsilon / rag_logprobs.shape[-1]
    return (1.0 - epsilon) * -ll + eps_i * -smooth


def rag_token_nll(
    seq_logits: torch.Tensor,
    doc_scores: torch.Tensor,
    target: torch.LongTensor,
    pad_token_id: int,
    epsilon: float = 0.0,
) -> torch.Tensor:
    """-Σ_t log Σ_z p(z|x) p(y_t|x,z,y<t) per question: [B*K, T, V], [B, K], [B, T] -> [B]."""
    target = torch.cat([target[:, 1:], target.new_full((target.shape[0], 1), pad_token_id)], 1)
    rag_logprobs = marginalize_tokens(seq_logits, doc_scores)
    ll = rag_logprobs.gather(-1, target[:, :, None]).squeeze(-1)
    smooth = rag_logprobs.sum(-1)
    pad = target.eq(pad_token_id)
    ll = ll.masked_fill(pad, 0.0).sum(1)
    smooth = smooth.masked_fill(pad, 0.0).sum(1)
    eps_i = epsilon / rag_logprobs.shape[-1]
    return (1.0 - epsilon) * -ll + eps_i * -smooth


def marginalize_tokens(seq_logits: torch.Tensor, doc_scores: torch.Tensor) -> torch.Tensor:
    """RAG-Token: [B*K, T, V] logits, [B, K] scores -> [B, T, V] log Σ_z p(z|x) p(y_t|x,z,y<t)."""
    n_docs = doc_scores.shape[1]
    seq_logprobs = seq_logits.log_softmax(-1).view(seq_logits.shape[0] // n_docs, n_docs, -1, seq_logits.shape[-1])
    return (seq_logprobs + doc_scores.log_softmax(1)[:, :, None, None]).logsumexp(1)


def per_doc_log_likelihood(seq_logits: torch.Tensor, target: torch.LongTensor, n_docs: int, pad_token_id: int) -> torch.Tensor:
    """log p(y|x,z) for each passage: [B*K, T, V], [B, T] -> [B, K] (pads masked)."""
    shifted = target[:, 1:]
    logprobs = seq_logits[:, :-1].log_softmax(-1)
    tgt = shifted.repeat_interleave(n_docs, 0)
    ll = logprobs.gather(-1, tgt[:, :, None]).squeeze(-1).masked_fill(tgt.eq(pad_token_id), 0.0)
    return ll.sum(1).view(-1, n_docs)


# --------------------------------------------------------------------------------------------
# RAG-Token decoding as a GenerationMixin model, so HF greedy/beam search run it unchanged
# --------------------------------------------------------------------------------------------


class _RagTokenDecoder(PreTrainedModel, GenerationMixin):
    """Decoder-only view of RAG-Token: the prefix in, marginalised next-token log-probs out.

    The encoder states of the K passages ride along as ``[N, K, L, H]`` model kwargs, which HF
    ``generate`` repeats per beam like any other input. No KV cache: each step recomputes the
    (short) answer prefix for every passage.
    """

    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(self, generator: Generator) -> None:
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
        self.generation_config = GenerationConfig(
            pad_token_id=generator.pad_token_id,
            eos_token_id=generator.eos_token_id,
            bos_token_id=generator.bos_token_id,
            decoder_start_token_id=generator.decoder_start_token_id,
            use_cache=False,
        )

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing to initialise: all weights belong to the wrapped generator."""

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, **kwargs) -> dict:
        keys = ("encoder_hidden", "source_ids", "source_mask", "doc_scores")
        return {"input_ids": input_ids, **{k: kwargs[k] for k in keys}}

    def forward(
        self,
        input_ids: torch.LongTensor,
        encoder_hidden: torch.Tensor,
        source_ids: torch.LongTensor,
        source_mask: torch.Tensor,
        doc_scores: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutput:
        """``attention_mask`` is accepted for ``generate`` and unused: answer prefixes have no pads."""
        n, k = encoder_hidden.shape[:2]
        enc = PointerEncoderOutput(
            last_hidden_state=encoder_hidden.flatten(0, 1), source_ids=source_ids.flatten(0, 1)
        )
        logits = self.generator(
            None, source_mask.flatten(0, 1), input_ids.repeat_interleave(k, 0), encoder_outputs=enc
        )[:, -1:]
        return CausalLMOutput(logits=marginalize_tokens(logits, doc_scores))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class RagModel(nn.Module):
    """Query encoder + generator + RAG config; see ``loss`` and ``generate``."""

    def __init__(self, query_encoder: Encoder, generator: Generator, config: RagConfig | None = None) -> None:
        super().__init__()
        self.query_encoder = query_encoder
        self.generator = generator
        self.config = config or RagConfig()
        #: provenance saved with the model (training config, index version); see save_pretrained
        self.metadata: dict = {}

    # -- construction / persistence ----------------------------------------------------------

    @classmethod
    def from_components(
        cls,
        query_encoder: str | Encoder = DEFAULT_ENCODER,
        generator: str | Generator = DEFAULT_ENCODER,
        *,
        copy_head: bool | None = None,
        device: str | torch.device | None = None,
        **config,
    ) -> "RagModel":
        """A fresh model from checkpoints (names/paths) or ready components. The defaults work
        offline: MiniLM query encoder, BERT2BERT-from-MiniLM generator with the copy head."""
        device = device or default_device()
        if isinstance(query_encoder, str):
            query_encoder = Encoder.from_pretrained(query_encoder, device=device)
        if isinstance(generator, str):
            generator = Generator.from_pretrained(generator, copy_head=copy_head, device=device)
        return cls(query_encoder, generator, RagConfig(**config)).to(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None) -> "RagModel":
        """Load a directory written by ``save_pretrained`` (works in a fresh process)."""
        path = Path(path)
        cfg_file = path / _CONFIG_FILE
        if not cfg_file.is_file():
            raise ValueError(f"{path} is not a saved RagModel (no {_CONFIG_FILE}); write one with save_pretrained")
        data = json.loads(cfg_file.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"{cfg_file} has format {data.get('format')!r}, expected {_FORMAT!r}")
        device = device or default_device()
        enc_settings = json.loads((path / "query_encoder" / "rag_ray_encoder.json").read_text())
        query_encoder = Encoder.from_pretrained(
            str(path / "query_encoder"), max_length=enc_settings.get("max_length", 256), device=device
        )
        query_encoder.name = enc_settings.get("name", query_encoder.name)
        generator = Generator.from_pretrained(str(path / "generator"), device=device)
        model = cls(query_encoder, generator, RagConfig.from_dict(data["config"])).to(device)
        model.metadata = dict(data.get("metadata") or {})
        return model

    def save_pretrained(self, path: str | os.PathLike, metadata: dict | None = None) -> None:
        """Query encoder, generator (safetensors + tokenizers) and config in one directory,
        written beside the target and renamed into place, so a crash never leaves half a model.

        ``metadata`` (JSON-able; default: the model's own ``metadata``) records where the weights
        came from, e.g. the TrainConfig and the index version they were trained against."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            self.query_encoder.save_pretrained(tmp / "query_encoder")
            self.generator.save_pretrained(tmp / "generator")
            meta = {"format": _FORMAT, "version": 1, "config": asdict(self.config),
                    "metadata": metadata if metadata is not None else self.metadata}
            (tmp / _CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                path.rename(old)
            tmp.rename(path)
            if old is not None:
                shutil.rmtree(old)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    @property
    def device(self) -> torch.device:
        return self.generator.device

    # -- retrieval posterior -----------------------------------------------------------------

    def doc_scores(self, question_vectors: torch.Tensor, doc_vectors: torch.Tensor) -> torch.Tensor:
        """q·d for each retrieved passage: [B, D], [B, K, D] -> [B, K] (differentiable in q).
        Always fp32, also under autocast: p(z|x) is a softmax over close scores."""
        with torch.autocast(question_vectors.device.type, enabled=False):
            return torch.bmm(question_vectors.float().unsqueeze(1), doc_vectors.float().transpose(1, 2)).squeeze(1)

    def _prepare(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]] | None,
        doc_vectors: torch.Tensor | np.ndarray | None,
        mode: str,
        n_docs: int | None,
        question_vectors: torch.Tensor | None,
    ) -> tuple[list[list[PassageLike]] | None, torch.Tensor | None]:
        """Validate inputs; return the first n_docs passages and their q·d scores [B, K]."""
        if isinstance(questions, str) or not questions:
            raise ValueError("questions must be a non-empty list of strings (one per example)")
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"question {i} is empty ({q!r}); every question needs text")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "closed_book":
            return None, None
        b = len(questions)
        if passages is None or doc_vectors is None:
            raise ValueError(f"mode {mode!r} needs passages and doc_vectors; use mode='closed_book' without retrieval")
        if len(passages) != b:
            raise ValueError(f"got {len(passages)} passage lists for {b} questions; give one list per question")
        k = n_docs or self.config.n_docs
        if k < 1:
            raise ValueError(f"n_docs must be >= 1, got {k}")
        for i, row in enumerate(passages):
            if len(row) < k:
                raise ValueError(
                    f"n_docs={k} but question {i} has only {len(row)} passages; retrieve at least {k} "
                    f"or pass n_docs<={len(row)}"
                )
        if isinstance(doc_vectors, np.ndarray):
            doc_vectors = torch.from_numpy(doc_vectors)
        if not isinstance(doc_vectors, torch.Tensor) or doc_vectors.dim() != 3:
            raise ValueError(
                f"doc_vectors must be a [B, K, D] tensor or array, got shape {tuple(getattr(doc_vectors, 'shape', ()))}"
            )
        if doc_vectors.shape[0] != b or doc_vectors.shape[1] < k:
            raise ValueError(
                f"doc_vectors has shape {tuple(doc_vectors.shape)}, need [{b}, >={k}, D] for {b} questions "
                f"and n_docs={k}"
            )
        dim = self.query_encoder.dim
        if doc_vectors.shape[2] != dim:
            raise ValueError(
                f"doc_vectors have dimension {doc_vectors.shape[2]} but the query encoder outputs {dim}; "
                "the index must be built with a passage encoder of the same size"
            )
        doc_vectors = doc_vectors[:, :k].to(self.device, torch.float32)
        if question_vectors is None:
            question_vectors = self.query_encoder.embed(list(questions))
        elif tuple(question_vectors.shape) != (b, dim):
            raise ValueError(f"question_vectors has shape {tuple(question_vectors.shape)}, expected ({b}, {dim})")
        scores = self.doc_scores(question_vectors.float(), doc_vectors)
        return [list(row[:k]) for row in passages], scores

    # -- training ----------------------------------------------------------------------------

    def loss(
        self,
        questions: Sequence[str],
        answers: Sequence[str],
        passages: Sequence[Sequence[PassageLike]] | None = None,
        doc_vectors: torch.Tensor | np.ndarray | None = None,
        *,
        mode: str | None = None,
        n_docs: int | None = None,
        label_smoothing: float | None = None,
        question_vectors: torch.Tensor | None = None,
    ) -> LossOutput:
        """Marginal NLL of the answers. ``question_vectors`` (with grad) may be passed when the
        caller already embedded the questions for retrieval; otherwise they are embedded here."""
        mode = mode or self.config.mode
        if isinstance(answers, str) or len(answers) != len(questions):
            raise ValueError(f"need one answer string per question: {len(questions)} questions, answers={answers!r:.80}")
        eps = self.config.label_smoothing if label_smoothing is None else label_smoothing
        rows, scores = self._prepare(questions, passages, doc_vectors, mode, n_docs, question_vectors)
        gen = self.generator
        target = gen.build_targets(answers)
        inputs = gen.build_inputs(questions, rows)
        k = 1 if scores is None else scores.shape[1]
        logits = gen(inputs["input_ids"], inputs["attention_mask"], target.repeat_interleave(k, 0)).float()
        if scores is None:
            zero = torch.zeros(len(questions), 1, device=logits.device)
            nll = rag_token_nll(logits, zero, target, gen.pad_token_id, eps)
            empty = zero[:, :0]
            return LossOutput(nll.mean(), nll, empty, empty, empty)
        if mode == "sequence":
            nll = rag_sequence_nll(logits, scores, target, gen.pad_token_id, gen.bos_token_id, eps)
        else:
            nll = rag_token_nll(logits, scores, target, gen.pad_token_id, eps)
        prior = scores.log_softmax(1)
        with torch.no_grad():
            post = (prior + per_doc_log_likelihood(logits, target, k, gen.pad_token_id)).log_softmax(1)
        return LossOutput(nll.mean(), nll, scores, prior, post)

    # -- decoding ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]] | None = None,
        doc_vectors: torch.Tensor | np.ndarray | None = None,
        *,
        mode: str | None = None,
        decoding: str | None = None,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        n_docs: int | None = None,
        dedup: bool | None = None,
        question_vectors: torch.Tensor | None = None,
    ) -> list[Answer]:
        """One answer per question, with p(z|x) and p(z|x,answer) for each passage used.

        Decodings: ``token`` mode: ``greedy``/``beam`` (beam search over the marginal next-token
        distribution); ``sequence`` mode: ``thorough`` (beam per passage, union of hypotheses
        rescored on every passage) or ``fast`` (no rescoring: a hypothesis not in a passage's
        beam gets probability 0 there); ``closed_book``: ``greedy``/``beam`` on the question alone.
        """
        mode = mode or self.config.mode
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        num_beams = num_beams or self.config.num_beams
        decoding = decoding or {"sequence": "thorough"}.get(mode, "greedy" if num_beams == 1 else "beam")
        if decoding not in DECODINGS[mode]:
            raise ValueError(f"decoding {decoding!r} does not apply to mode {mode!r}; use one of {DECODINGS[mode]}")
        if decoding == "greedy":
            num_beams = 1
        max_new_tokens = max_new_tokens or self.config.max_new_tokens
        dedup = self.config.dedup if dedup is None else dedup
        rows, scores = self._prepare(questions, passages, doc_vectors, mode, n_docs, question_vectors)
        inputs = self.generator.build_inputs(questions, rows)
        if mode == "closed_book":
            return self._generate_closed_book(inputs, num_beams, max_new_tokens)
        if mode == "token":
            return self._generate_token(inputs, scores, num_beams, max_new_tokens)
        return self._generate_sequence(inputs, scores, num_beams, max_new_tokens, dedup, fast=decoding == "fast")

    def generate_token_ids(
        self, inputs: dict[str, torch.Tensor], doc_scores: torch.Tensor, num_beams: int, max_new_tokens: int
    ) -> torch.LongTensor:
        """RAG-Token search on prepared inputs: [B*K, L] prompts, [B, K] scores -> [B, T] ids."""
        b, k = doc_scores.shape
        enc = self.generator.encode(inputs["input_ids"], inputs["attention_mask"])
        decoder = _RagTokenDecoder(self.generator)
        start = torch.full((b, 1), self.generator.decoder_start_token_id, dtype=torch.long, device=self.device)
        return decoder.generate(
            input_ids=start,
            attention_mask=torch.ones_like(start),
            encoder_hidden=enc.last_hidden_state.view(b, k, *enc.last_hidden_state.shape[1:]),
            source_ids=enc.source_ids.view(b, k, -1),
            source_mask=inputs["attention_mask"].view(b, k, -1),
            doc_scores=doc_scores,
            num_beams=num_beams,
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )

    def _generate_token(self, inputs, scores, num_beams, max_new_tokens) -> list[Answer]:
        seqs = self.generate_token_ids(inputs, scores, num_beams, max_new_tokens)
        k = scores.shape[1]
        gen = self.generator
        logits = gen(inputs["input_ids"], inputs["attention_mask"], seqs.repeat_interleave(k, 0))
        marginal = -rag_token_nll(logits, scores, seqs, gen.pad_token_id)
        prior = scores.log_softmax(1)
        post = (prior + per_doc_log_likelihood(logits, seqs, k, gen.pad_token_id)).softmax(1)
        return [
            Answer(text, float(s), p.tolist(), pr.tolist())
            for text, s, p, pr in zip(gen.decode(seqs), marginal, post, prior.exp())
        ]

    def _generate_closed_book(self, inputs, num_beams, max_new_tokens) -> list[Answer]:
        gen = self.generator
        seqs = gen.model.generate(**inputs, num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False)
        logits = gen(inputs["input_ids"], inputs["attention_mask"], seqs)
        ll = per_doc_log_likelihood(logits, seqs, 1, gen.pad_token_id)[:, 0]
        return [Answer(text, float(s)) for text, s in zip(gen.decode(seqs), ll)]

    def _generate_sequence(self, inputs, scores, num_beams, max_new_tokens, dedup, fast) -> list[Answer]:
        """Beams per passage, then thorough (rescore on all passages) or fast (beam scores only)."""
        gen = self.generator
        b, k = scores.shape
        prior = scores.log_softmax(1)
        answers = []
        for i in range(b):
            ids = inputs["input_ids"][i * k : (i + 1) * k]
            mask = inputs["attention_mask"][i * k : (i + 1) * k]
            out = gen.model.generate(
                input_ids=ids,
                attention_mask=mask,
                num_beams=num_beams,
                num_return_sequences=num_beams,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                output_scores=fast,
                return_dict_in_generate=True,
            )
            seqs = out.sequences  # [K*beams, T], passage-major
            if fast:
                log_post, best, ll_best = self._fast_scores(out, prior[i], k, num_beams)
                seq = seqs[best]
                answers.append(
                    Answer(gen.decode(seq[None])[0], float(ll_best), log_post.exp().tolist(), prior[i].exp().tolist())
                )
                continue
            if dedup:
                seqs = torch.stack(list({str(s.tolist()): s for s in seqs}.values()))
            c = seqs.shape[0]
            enc = gen.encode(ids, mask)
            enc_rep = PointerEncoderOutput(
                last_hidden_state=enc.last_hidden_state.repeat(c, 1, 1), source_ids=enc.source_ids.repeat(c, 1)
            )
            logits = gen(None, mask.repeat(c, 1), seqs.repeat_interleave(k, 0), encoder_outputs=enc_rep)
            nll = rag_sequence_nll(
                logits, scores[i : i + 1].repeat(c, 1), seqs, gen.pad_token_id, gen.bos_token_id, exclude_bos_score=True
            )
            best = int((-nll).topk(1)[1][0])
            per_doc = per_doc_log_likelihood(logits, seqs, k, gen.pad_token_id)[best]
            post = (prior[i] + per_doc).softmax(0)
            answers.append(Answer(gen.decode(seqs[best : best + 1])[0], float(-nll[best]), post.tolist(), prior[i].exp().tolist()))
        return answers

    def _fast_scores(self, out, prior: torch.Tensor, k: int, num_beams: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        """Fast decoding: log p(y|x,z) from the beam's own transition scores where y is in z's
        beam, -inf elsewhere; returns (log p(z|x,y) of the best y, its row, log p(y|x))."""
        gen = self.generator
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
    ids = seq.tolist()
    while len(ids) > 1 and ids[-1] == pad_token_id:
        ids.pop()
    return ids
