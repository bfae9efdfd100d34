"""Retrieval report helpers as pure functions (no index, no Ray)."""

from __future__ import annotations

from rag_ray.datasets import QAExample
from rag_ray.evaluation import format_table, gold_sources, recall_table


def test_hybrid_report_says_where_the_gold_hits_came_from():
    examples = [QAExample("q0", ["a"], "g0"), QAExample("q1", ["b"], "g1"), QAExample("q2", ["c"], "g2"),
                QAExample("q3", ["d"], None)]
    doc_ids = [["x", "g0"], ["g1", "g1"], ["y", "z"], ["w", "v"]]
    sources = [["dense", "lexical"], ["both", "dense"], ["dense", "dense"], ["lexical", "dense"]]
    by_source = gold_sources(doc_ids, sources, examples, ks=(1, 2))
    assert by_source["@1"] == {"found": 1, "dense": 0.0, "lexical": 0.0, "both": 1.0}
    assert by_source["@2"] == {"found": 2, "dense": 0.0, "lexical": 0.5, "both": 0.5}  # best-ranked gold hit
    texts = [["t"] * 2] * 4
    table = recall_table(doc_ids, texts, examples, ks=(1, 2))
    report = {"questions": 4, "index": "idx", "dense": table, "bm25": table, "hybrid": table,
              "hybrid_sources": by_source}
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["metric", "dense", "bm25", "hybrid"]
    assert "hybrid gold hit from" in lines[-4] and lines[-4].split()[-4:] == ["dense", "lexical", "both", "found"]
    assert lines[-2].split() == ["top2", "0.000", "0.500", "0.500", "2"]
