"""Fusion of dense and BM25 candidates (hand-made per-shard arrays, no index)."""

from __future__ import annotations

import numpy as np

from rag_ray.lexical import RRF_K, SOURCES, merge_hybrid


def test_merge_hybrid_fuses_by_reciprocal_rank_dedups_and_keeps_q_dot_d():
    """Two shards, one query. Dense global top-3: (0,0) 0.9, (1,0) 0.8, (0,1) 0.7. BM25 global
    top-3 by score: (1,5) 9.0, (0,1) 7.0, (1,0) 1.0 (row -1 slots are empty)."""
    dense_scores = [np.array([[0.9, 0.7]], np.float32), np.array([[0.8, 0.1]], np.float32)]
    dense_rows = [np.array([[0, 1]]), np.array([[0, 3]])]
    lex_scores = [np.array([[7.0, 0.0]], np.float32), np.array([[9.0, 1.0]], np.float32)]
    lex_rows = [np.array([[1, -1]]), np.array([[5, 0]])]
    lex_dots = [np.array([[0.7, -np.inf]], np.float32), np.array([[-0.4, 0.8]], np.float32)]
    scores, shards, rows, sources = merge_hybrid(dense_scores, dense_rows, lex_scores, lex_rows, lex_dots, 3, 3)
    # RRF (rank r counts 1/(60 + r)): (1,0) and (0,1) are in both lists at ranks 2 and 3 (a tie,
    # broken by q·d 0.8 > 0.7), then (0,0) and (1,5) each first in one list (q·d 0.9 > -0.4).
    assert RRF_K == 60
    assert list(zip(shards[0].tolist(), rows[0].tolist())) == [(1, 0), (0, 1), (0, 0)]
    assert [SOURCES[s] for s in sources[0]] == ["both", "both", "dense"]
    np.testing.assert_allclose(scores[0], [0.8, 0.7, 0.9])
    scores, shards, rows, sources = merge_hybrid(dense_scores, dense_rows, lex_scores, lex_rows, lex_dots, 4, 3)
    assert (shards[0, 3], rows[0, 3], SOURCES[sources[0, 3]]) == (1, 5, "lexical")
    np.testing.assert_allclose(scores[0, 3], -0.4)  # a BM25-only hit is scored by its q·d, not BM25
