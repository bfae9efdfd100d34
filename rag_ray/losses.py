"""RAG's training objectives as plain tensor functions: the formulas of transformers'
``RagSequenceForGeneration.get_nll`` / ``RagTokenForGeneration.get_nll``, kept apart from the
model so the equivalence tests, the decoders and the benchmarks call exactly the same code.

Shapes: B questions, K passages per question, T target tokens, V vocabulary; generator logits
are flattened question-major to ``[B*K, T, V]``. ``doc_scores`` are the logits of p(z|x): the
model passes its scale · q·d, so every formula here is the reference one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossOutput:
    """``loss``: mean over the batch; ``nll``: per-question loss [B]; ``doc_scores``: the logits of
    p(z|x) [B, K] (the model's scale · q·d);
    ``doc_log_prior``: log p(z|x) [B, K]; ``doc_log_posterior``: log p(z|x,y) [B, K] under the
    sequence model (empty [B, 0] in closed-book mode)."""

    loss: torch.Tensor
    nll: torch.Tensor
    doc_scores: torch.Tensor
    doc_log_prior: torch.Tensor
    doc_log_posterior: torch.Tensor


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


def per_doc_log_likelihood(
    seq_logits: torch.Tensor, target: torch.LongTensor, n_docs: int, pad_token_id: int
) -> torch.Tensor:
    """log p(y|x,z) for each passage: [B*K, T, V], [B, T] -> [B, K] (pads masked)."""
    shifted = target[:, 1:]
    logprobs = seq_logits[:, :-1].log_softmax(-1)
    tgt = shifted.repeat_interleave(n_docs, 0)
    ll = logprobs.gather(-1, tgt[:, :, None]).squeeze(-1).masked_fill(tgt.eq(pad_token_id), 0.0)
    return ll.sum(1).view(-1, n_docs)
