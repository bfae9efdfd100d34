"""Lexical (BM25) retrieval and its fusion with dense candidates: hybrid retrieval.

Each shard keeps a :class:`Bm25Index` over "title text" of its own passages (built on the first
lexical query, from the passages it already holds: nothing more is saved). The client merges the
shards' dense and BM25 candidates with :func:`merge_hybrid`. The fused list is ranked by
reciprocal-rank fusion, but every hit keeps its q·d score, so p(z|x) = softmax(scale · q·d) over
the returned passages is computed exactly as for dense hits, and the answer loss trains the query
encoder on passages that only BM25 found.
"""

from __future__ import annotations

import threading
from typing import Sequence

import numpy as np

#: Reciprocal-rank fusion constant (Cormack et al. 2009): score = Σ 1 / (RRF_K + rank).
RRF_K = 60
#: Hit sources, indexed by a bit mask: 1 = dense top-k, 2 = BM25 top-k, 3 = both.
SOURCES = ("", "dense", "lexical", "both")
DENSE, LEXICAL = 1, 2


class Bm25Index:
    """bm25s over passages, English stop words removed (as evaluation's BM25 baseline).

    Rows with no query term (BM25 score 0) are not returned: they are no lexical evidence."""

    def __init__(self, titles: Sequence[str], texts: Sequence[str]) -> None:
        import bm25s

        self.size = len(texts)
        self.bm25 = bm25s.BM25()
        if self.size:
            corpus = [f"{t} {x}" for t, x in zip(titles, texts)]
            self.bm25.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)

    def search(self, questions: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Questions -> (BM25 scores [B, k'], rows [B, k']), k' = min(k, size); row -1 = no match."""
        import bm25s

        kk = min(k, self.size)
        if kk == 0:
            return np.zeros((len(questions), 0), np.float32), np.zeros((len(questions), 0), np.int64)
        rows, scores = self.bm25.retrieve(bm25s.tokenize(list(questions), stopwords="en", show_progress=False),
                                          k=kk, show_progress=False)
        rows, scores = rows.astype(np.int64), scores.astype(np.float32)
        rows[scores <= 0] = -1
        return scores, rows


class LazyBm25:
    """A Bm25Index built on first use (shards that never serve a lexical query pay nothing); the
    lock keeps concurrent actor calls from building it twice."""

    def __init__(self) -> None:
        self._index: Bm25Index | None = None
        self._lock = threading.Lock()

    def get(self, passages) -> Bm25Index:
        """The index over ``passages`` (an Arrow table with title and text columns)."""
        with self._lock:
            if self._index is None:
                self._index = Bm25Index(passages.column("title").to_pylist(), passages.column("text").to_pylist())
            return self._index

    def reset(self) -> None:
        with self._lock:
            self._index = None


def merge_hybrid(dense_scores: list[np.ndarray], dense_rows: list[np.ndarray], lex_scores: list[np.ndarray],
                 lex_rows: list[np.ndarray], lex_dots: list[np.ndarray], k: int,
                 lexical_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fuse per-shard dense top-k and BM25 top-``lexical_k`` into a global top-k.

    Inputs per shard: dense q·d scores and rows [B, k_s]; BM25 scores, rows and the q·d of those
    rows [B, l_s] (row -1 = empty). The global dense list is the top-k by q·d; the global lexical
    list is the top-``lexical_k`` by BM25 score across shards. That is an approximation: each shard
    computes IDF over its own passages, so BM25 scores of different shards are not exactly
    comparable (close for shards of a randomly split corpus). The candidates (the union of both
    lists, one entry per passage) are ranked by reciprocal-rank fusion, ties by q·d.

    Returns (q·d scores [B, k'], shard numbers [B, k'], local rows [B, k'], sources [B, k'] as
    :data:`SOURCES` bit masks); empty slots have shard -1 and source 0. k' = min(k, candidates).
    """
    from rag_ray.shard import topk_order  # shard.py imports this module

    d_at, d_shards, d_rows = topk_order(dense_scores, dense_rows, k)
    d_scores = np.take_along_axis(np.concatenate(dense_scores, axis=1), d_at, 1)
    l_at, l_shards, l_rows = topk_order(lex_scores, lex_rows, lexical_k)
    l_dots = np.take_along_axis(np.concatenate(lex_dots, axis=1), l_at, 1)
    b = d_shards.shape[0]
    fused: list[list[tuple[float, int, int, int]]] = []
    for i in range(b):
        cand: dict[tuple[int, int], list] = {}  # (shard, row) -> [rrf, q·d, source]
        for rank, (s, r, score) in enumerate(zip(d_shards[i], d_rows[i], d_scores[i]), start=1):
            if s >= 0:
                cand[(int(s), int(r))] = [1.0 / (RRF_K + rank), float(score), DENSE]
        for rank, (s, r, dot) in enumerate(zip(l_shards[i], l_rows[i], l_dots[i]), start=1):
            if s < 0:
                continue
            c = cand.setdefault((int(s), int(r)), [0.0, float(dot), 0])
            c[0] += 1.0 / (RRF_K + rank)
            c[2] |= LEXICAL
        ranked = sorted(cand.items(), key=lambda item: (-item[1][0], -item[1][1]))[:k]
        fused.append([(c[1], s, r, c[2]) for (s, r), c in ranked])
    kk = max((len(f) for f in fused), default=0)
    scores = np.zeros((b, kk), np.float32)
    shards = np.full((b, kk), -1, np.int64)
    rows = np.full((b, kk), -1, np.int64)
    sources = np.zeros((b, kk), np.int8)
    for i, row in enumerate(fused):
        for j, (score, s, r, src) in enumerate(row):
            scores[i, j], shards[i, j], rows[i, j], sources[i, j] = score, s, r, src
    return scores, shards, rows, sources
