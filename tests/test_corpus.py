"""Corpus parsing and passage splitting, without Ray."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rag_ray.corpus import CorpusError, SkipLog, detect_format, iter_documents, read_passages, split_passages


def _docs(path, fmt=None, on_error="raise", skips=None):
    with open(path, "rb") as f:
        return list(iter_documents(f, str(path), fmt, on_error, skips))


def test_jsonl_csv_tsv_parquet_squad_give_the_same_documents(tmp_path):
    rows = [{"id": "a", "title": "Alpha", "text": "first, with \"quotes\"\tand a tab"}, {"id": 7, "title": "Beta", "text": "second"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    (tmp_path / "c.csv").write_text('id,text,title\na,"first, with ""quotes""\tand a tab",Alpha\n7,second,Beta\n')
    # DPR psgs_w100.tsv layout: header id, text, title
    (tmp_path / "c.tsv").write_text('id\ttext\ttitle\na\t"first, with ""quotes""\tand a tab"\tAlpha\n7\tsecond\tBeta\n')
    pq.write_table(pa.table({"id": ["a", "7"], "title": ["Alpha", "Beta"], "text": [rows[0]["text"], "second"]}), tmp_path / "c.parquet")
    squad = {"data": [{"title": "Alpha", "paragraphs": [{"context": rows[0]["text"], "qas": []}]},
                      {"title": "Beta", "paragraphs": [{"context": "second", "qas": []}]}]}
    (tmp_path / "c.json").write_text(json.dumps(squad))
    expected = [{"doc_id": "a", "title": "Alpha", "text": rows[0]["text"]}, {"doc_id": "7", "title": "Beta", "text": "second"}]
    for name in ("c.jsonl", "c.csv", "c.tsv", "c.parquet"):
        assert _docs(tmp_path / name) == expected, name
    squad_docs = _docs(tmp_path / "c.json")
    assert [d["doc_id"] for d in squad_docs] == ["Alpha#0", "Beta#0"]
    assert [d["text"] for d in squad_docs] == [rows[0]["text"], "second"]


def test_split_passages_at_most_max_words_with_stable_ids():
    doc = {"doc_id": "d1", "title": "T", "text": " ".join(f"w{i}" for i in range(251))}
    passages = split_passages(doc, max_words=100)
    assert [len(p.text.split()) for p in passages] == [84, 83, 84]
    assert all(len(p.text.split()) <= 100 for p in passages)
    assert " ".join(p.text for p in passages) == doc["text"]  # nothing lost, order kept
    assert [p.passage_id for p in passages] == ["d1::0", "d1::1", "d1::2"]
    assert all(p.doc_id == "d1" and p.title == "T" for p in passages)
    assert split_passages(doc) == passages  # deterministic


@pytest.mark.parametrize(
    "content, line, field, problem",
    [
        ('{"id": "a", "text": "ok"}\n{"id": "b", "text": \n', 2, None, "invalid JSON"),
        ('{"id": "a", "text": "ok"}\n\n{"id": "b", "title": "x"}\n', 3, "text", "missing required field"),
        ('{"id": "a", "text": 12}\n', 1, "text", "must be a string"),
        ('{"id": "a", "text": "  "}\n', 1, "text", "is empty"),
        ('{"id": [1], "text": "ok"}\n', 1, "id", "must be a string or integer"),
        ('[1, 2]\n', 1, None, "expected an object"),
    ],
)
def test_malformed_jsonl_names_file_line_and_field(tmp_path, content, line, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(CorpusError) as info:
        _docs(path)
    err = info.value
    assert (err.path, err.line, err.field) == (str(path), line, field)
    assert problem in str(err) and f"line {line}" in str(err) and "bad.jsonl" in str(err)


def test_malformed_tsv_row_and_header(tmp_path):
    bad = tmp_path / "bad.tsv"
    bad.write_text("id\ttext\ttitle\n1\tgood\tT\n2\tmissing a column\n")
    with pytest.raises(CorpusError, match=r"bad.tsv, line 3: has 2 columns, the header has 3"):
        _docs(bad)
    nohdr = tmp_path / "nohdr.tsv"
    nohdr.write_text("1\tgood\tT\n")
    with pytest.raises(CorpusError, match="no 'text' column"):
        _docs(nohdr)


def test_skip_mode_counts_and_keeps_good_rows(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"id": "a", "text": "one"}\nnot json\n{"id": "c"}\n{"id": "d", "text": "four"}\n')
    skips = SkipLog()
    docs = _docs(path, on_error="skip", skips=skips)
    assert [d["doc_id"] for d in docs] == ["a", "d"]
    assert skips.count == 2
    assert "line 2" in skips.examples[0] and "line 3" in skips.examples[1]


def test_unknown_extension_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot tell the corpus format"):
        detect_format(str(tmp_path / "corpus.xml"))
    assert detect_format("psgs_w100.tsv.gz") == "tsv"


def test_read_passages_without_ray(toy_corpus):
    passages = read_passages(toy_corpus)
    assert len(passages) == 9  # 6 short documents + one 250-word document in 3 passages
    assert len({p.passage_id for p in passages}) == len(passages)
