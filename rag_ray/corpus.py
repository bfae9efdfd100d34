"""Corpus ingestion: documents from JSONL, Parquet, CSV/TSV or SQuAD JSON -> 100-word passages.

The parsers are plain generators over a binary file object (testable without Ray); Ray Data
reaches them through :class:`CorpusDatasource`, which reads files in parallel on any
filesystem pyarrow supports (local, S3, GCS) and streams blocks, so a 13 GB ``psgs_w100.tsv``
never has to fit in one process.

A malformed row raises :class:`CorpusError` naming file, line and field; with
``on_error="skip"`` it is skipped and counted instead (the count comes back in the build report).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any, Iterator, Literal

from rag_ray.types import Passage
from rag_ray.errors import RagRayError

FORMATS = ("jsonl", "parquet", "csv", "tsv", "squad")
Format = Literal["jsonl", "parquet", "csv", "tsv", "squad"]
OnError = Literal["raise", "skip"]

_EXTENSIONS = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".csv": "csv",
    ".tsv": "tsv", ".json": "squad",
}
_ID_FIELDS = ("id", "doc_id", "_id")
#: Largest document text accepted, in characters; a bigger field is almost always a broken file.
MAX_TEXT_CHARS = 10_000_000


class CorpusError(RagRayError):
    """A corpus row that cannot be used, located by file, line (or row) and field."""

    def __init__(self, path: str, line: int | None, field_name: str | None, problem: str) -> None:
        where = path + (f", line {line}" if line is not None else "")
        where += f", field {field_name!r}" if field_name else ""
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.field, self.problem = path, line, field_name, problem

    def __reduce__(self):  # crosses Ray task boundaries intact
        return (CorpusError, (self.path, self.line, self.field, self.problem))


@dataclass
class SkipLog:
    """Rows skipped under ``on_error='skip'``: a count and the first few reasons."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, error: CorpusError) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))


def detect_format(path: str) -> Format:
    name = path.lower()
    for compressed in (".gz", ".bz2", ".zst", ".lz4"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    ext = os.path.splitext(name)[1]
    if ext not in _EXTENSIONS:
        raise RagRayError(
            f"{path}: cannot tell the corpus format from extension {ext!r}; "
            f"name it one of {sorted(_EXTENSIONS)} or pass --format {'|'.join(FORMATS)}"
        )
    return _EXTENSIONS[ext]  # type: ignore[return-value]


def _document(path: str, line: int, row: Any, fallback_id: str) -> dict:
    """Validate one raw row and return a document dict (doc_id, title, text)."""
    if not isinstance(row, dict):
        raise CorpusError(path, line, None, f"expected an object with a 'text' field, got {type(row).__name__}")
    text = row.get("text")
    if text is None:
        raise CorpusError(path, line, "text", "missing required field")
    if not isinstance(text, str):
        raise CorpusError(path, line, "text", f"must be a string, got {type(text).__name__}")
    if not text.strip():
        raise CorpusError(path, line, "text", "is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise CorpusError(path, line, "text", f"has {len(text):,} characters, over the limit of {MAX_TEXT_CHARS:,}")
    title = row.get("title", "")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise CorpusError(path, line, "title", f"must be a string, got {type(title).__name__}")
    doc_id: Any = fallback_id
    for name in _ID_FIELDS:
        if row.get(name) not in (None, ""):
            doc_id = row[name]
            if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool):
                raise CorpusError(path, line, name, f"must be a string or integer, got {type(doc_id).__name__}")
            break
    return {"doc_id": str(doc_id), "title": title, "text": text}


def _raw_rows(f: IO[bytes], path: str, fmt: Format) -> Iterator[tuple[int, Any]]:
    """(line or row number, raw row) pairs; a row that cannot even be parsed is a CorpusError."""
    if fmt == "jsonl":
        for lineno, raw in enumerate(io.TextIOWrapper(f, encoding="utf-8", errors="strict"), start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, json.loads(raw)
            except json.JSONDecodeError as exc:
                yield lineno, CorpusError(path, lineno, None, f"invalid JSON ({exc.msg} at column {exc.colno})")
    elif fmt in ("csv", "tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        text = io.TextIOWrapper(f, encoding="utf-8", newline="")
        reader = csv.reader(text, delimiter="\t" if fmt == "tsv" else ",")
        header = next(reader, None)
        if header is None:
            return
        header = [h.strip() for h in header]
        if "text" not in header:
            raise CorpusError(path, 1, "text", f"header {header} has no 'text' column (DPR's psgs_w100.tsv header is: id, text, title)")
        for row in reader:
            if len(row) != len(header):
                yield reader.line_num, CorpusError(path, reader.line_num, None, f"has {len(row)} columns, the header has {len(header)}")
                continue
            yield reader.line_num, dict(zip(header, row))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table_file = pq.ParquetFile(pa.BufferReader(f.read()))
        if "text" not in table_file.schema_arrow.names:
            raise CorpusError(path, None, "text", f"parquet schema {table_file.schema_arrow.names} has no 'text' column")
        rownum = 0
        for batch in table_file.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                rownum += 1
                yield rownum, row
    elif fmt == "squad":
        try:
            data = json.load(io.TextIOWrapper(f, encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise CorpusError(path, exc.lineno, None, f"invalid JSON ({exc.msg})") from None
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise CorpusError(path, None, "data", "not SQuAD format: expected {'data': [{'title', 'paragraphs': [{'context'}]}]}")
        for a, article in enumerate(data["data"]):
            title = article.get("title", "") if isinstance(article, dict) else ""
            paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
            if not isinstance(paragraphs, list):
                yield None, CorpusError(path, None, f"data[{a}].paragraphs", "missing or not a list")
                continue
            for p, para in enumerate(paragraphs):
                if not isinstance(para, dict) or "context" not in para:
                    yield None, CorpusError(path, None, f"data[{a}].paragraphs[{p}].context", "missing required field")
                    continue
                yield None, {"id": f"{title}#{p}", "title": title, "text": para["context"]}
    else:
        raise RagRayError(f"unknown corpus format {fmt!r}; expected one of {FORMATS}")


def iter_documents(
    f: IO[bytes], path: str, fmt: Format | None = None, on_error: OnError = "raise", skips: SkipLog | None = None
) -> Iterator[dict]:
    """Documents (doc_id, title, text) from one file; malformed rows raise or are counted in ``skips``."""
    if on_error not in ("raise", "skip"):
        raise RagRayError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    fmt = fmt or detect_format(path)
    base = os.path.basename(path)
    for n, (lineno, row) in enumerate(_raw_rows(f, path, fmt)):
        try:
            if isinstance(row, CorpusError):
                raise row
            yield _document(path, lineno, row, fallback_id=f"{base}:{lineno or n}")
        except CorpusError as exc:
            if on_error == "raise":
                raise
            (skips if skips is not None else SkipLog()).add(exc)


def embedding_text(title: str, text: str) -> str:
    """What a passage encoder reads for one passage: its title, then its text (DPR's input).
    The index build and passage-encoder training both use this, so trained and indexed vectors match."""
    return f"{title} {text}" if title else str(text)


def split_passages(doc: dict, max_words: int = 100) -> list[Passage]:
    """Cut a document into ceil(n / max_words) consecutive passages of near-equal length.

    Every passage has at most ``max_words`` words (the paper's 100-word unit); balancing the
    sizes avoids the few-word tail fragments that fixed-size cutting leaves, which otherwise
    match short queries on chance words. The passage id is ``<doc_id>::<i>``, stable across runs
    and shard counts, so a rebuilt or resharded index returns the same ids.
    """
    if max_words < 1:
        raise RagRayError(f"max_words must be >= 1, got {max_words}")
    words = doc["text"].split()
    pieces = max(1, -(-len(words) // max_words))
    bounds = [round(i * len(words) / pieces) for i in range(pieces + 1)]
    return [
        Passage(passage_id=f"{doc['doc_id']}::{i}", doc_id=doc["doc_id"], title=doc["title"],
                text=" ".join(words[bounds[i] : bounds[i + 1]]))
        for i in range(pieces)
    ]


def read_passages(path: str, fmt: Format | None = None, max_words: int = 100, on_error: OnError = "raise") -> list[Passage]:
    """All passages of one local file, in order, without Ray (small corpora, tests, BM25)."""
    out: list[Passage] = []
    with open(path, "rb") as f:
        for doc in iter_documents(f, path, fmt, on_error):
            out.extend(split_passages(doc, max_words))
    return out


def expand_paths(paths: list[str] | str) -> list[str]:
    """Local files and directories -> sorted file list (remote URIs pass through to pyarrow)."""
    paths = [paths] if isinstance(paths, str) else list(paths)
    out: list[str] = []
    for p in paths:
        if "://" in p:
            out.append(p)
        elif os.path.isdir(p):
            out.extend(sorted(os.path.join(p, n) for n in os.listdir(p) if not n.startswith(".")))
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise RagRayError(f"corpus path {p!r} does not exist")
    if not out:
        raise RagRayError(f"no corpus files found under {paths}")
    return out


# --------------------------------------------------------------------------- Ray Data edge

def _passage_block(passages: list[Passage]):
    import pyarrow as pa

    return pa.table({
        "passage_id": [p.passage_id for p in passages],
        "doc_id": [p.doc_id for p in passages],
        "title": [p.title for p in passages],
        "text": [p.text for p in passages],
    })


def make_datasource(paths: list[str], fmt: Format | None, max_words: int, on_error: OnError, skip_counter=None):
    """A Ray Data datasource that parses corpus files and emits passage rows.

    Splitting into passages happens in the read tasks so documents never materialise as a
    second dataset; ``skip_counter`` is an optional actor handle with ``add(count, examples)``.
    """
    from ray.data.datasource import FileBasedDatasource

    class CorpusDatasource(FileBasedDatasource):
        _FILE_EXTENSIONS = None

        def _read_stream(self, f, path: str):
            import ray

            skips = SkipLog()
            batch: list[Passage] = []
            for doc in iter_documents(f, path, fmt, on_error, skips):
                batch.extend(split_passages(doc, max_words))
                if len(batch) >= 2048:
                    yield _passage_block(batch)
                    batch = []
            if batch:
                yield _passage_block(batch)
            if skips.count and skip_counter is not None:
                ray.get(skip_counter.add.remote(skips.count, skips.examples))

    return CorpusDatasource(paths)


def read_corpus(paths: list[str] | str, fmt: Format | None = None, max_words: int = 100,
                on_error: OnError = "raise", skip_counter=None):
    """Ray Dataset of passages (passage_id, doc_id, title, text) from corpus files."""
    import ray.data

    files = expand_paths(paths)
    for p in files:  # fail fast on an unknown extension, before any task starts
        if fmt is None:
            detect_format(p)
    # Parsing and splitting is light next to embedding: the read holds no CPU, so a pool of
    # embedding actors sized to every CPU can start at once without waiting on it.
    return ray.data.read_datasource(make_datasource(files, fmt, max_words, on_error, skip_counter), num_cpus=0)
