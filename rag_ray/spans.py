"""Answers as source text: where the generated tokens occur contiguously in a retrieved passage,
the answer is that passage's own substring rather than the tokenizer's decode.

An uncased WordPiece decode lowercases and spaces out punctuation ("2,000" -> "2, 000", "U.S."
-> "u. s."), which costs exact match on answers that are spans of the source. A fast tokenizer's
offset mapping gives back the characters each token came from, so a copied answer can be read
off the passage itself. Ids found in no passage keep the decode.
"""

from __future__ import annotations

from typing import Sequence

from rag_ray.generator import PassageLike


def answer_ids(tokenizer, ids: Sequence[int]) -> list[int]:
    """The answer's own token ids: special tokens dropped as ``decode(skip_special_tokens=True)``
    drops them, except the unknown token (a copied one maps back to its source characters)."""
    special = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
    return [int(i) for i in ids if int(i) not in special]


def find_span(tokenizer, ids: Sequence[int], text: str) -> str | None:
    """The substring of ``text`` whose tokens are exactly ``ids`` (the first occurrence), or None.

    ``text`` is tokenized on its own; for WordPiece that equals its tokens inside a prompt, since
    words are split at whitespace and punctuation before the vocabulary is looked up.
    """
    ids = list(ids)
    if not ids or not text:
        return None
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    tokens, offsets = enc["input_ids"], enc["offset_mapping"]
    m = len(ids)
    for i in range(len(tokens) - m + 1):
        if tokens[i] == ids[0] and tokens[i : i + m] == ids:
            return text[offsets[i][0] : offsets[i + m - 1][1]]
    return None


def recover_span(tokenizer, ids: Sequence[int], passages: Sequence[PassageLike], fallback: str) -> str:
    """The answer as it is written in the first passage (in the order given: most probable first)
    whose text, or else title, contains the generated ``ids`` contiguously; ``fallback`` (the
    decode) when none does or the tokenizer has no offset mapping (a slow tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        return fallback
    ids = answer_ids(tokenizer, ids)
    if not ids:
        return fallback
    for passage in passages:
        for text in (passage.text, passage.title):
            span = find_span(tokenizer, ids, text)
            if span is not None and span.strip():
                return span.strip()
    return fallback
