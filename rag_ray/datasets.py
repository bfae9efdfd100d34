"""Question files and where the public benchmark data lives.

Question files are JSONL in either the squad-open layout ``{question, answers, doc_id}`` or the
NQ/TriviaQA layout ``{question, answer: [...]}``. The squad-open data is found through
``$RAG_RAY_DATA`` or ``../shared/data/squad-open``; with neither, :func:`squad_open_dir` builds
it from SQuAD v1.1's official dev file (downloaded once into ``~/.cache/rag_ray``), never from a
copy committed to this repository (the data is CC BY-SA).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from rag_ray.errors import RagRayError
from rag_ray.io import atomic_write_text, iter_jsonl

#: Request-size style limits on question files, so a broken file fails fast and clearly.
MAX_QUESTION_CHARS = 2000
SQUAD_DEV_URL = "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json"


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]
    doc_id: str | None = None
    qid: str | None = None


def read_questions(path: str | os.PathLike, limit: int | None = None) -> list[QAExample]:
    """Read a JSONL question file; a bad line is a ValueError naming file, line and field."""
    path = resolve_data_path(str(path))
    if not os.path.isfile(path):
        raise RagRayError(f"question file {path} does not exist")
    out: list[QAExample] = []
    for lineno, row in iter_jsonl(path):
        q = row.get("question")
        if not isinstance(q, str) or not q.strip():
            raise RagRayError(f"{path}, line {lineno}, field 'question': missing or empty")
        if len(q) > MAX_QUESTION_CHARS:
            raise RagRayError(f"{path}, line {lineno}, field 'question': {len(q)} characters, over the limit of {MAX_QUESTION_CHARS}")
        answers = row.get("answers", row.get("answer", []))
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise RagRayError(f"{path}, line {lineno}, field 'answers': must be a list of strings")
        doc_id = row.get("doc_id")
        out.append(QAExample(q.strip(), tuple(answers), None if doc_id is None else str(doc_id),
                             None if row.get("id") is None else str(row["id"])))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise RagRayError(f"question file {path} holds no questions")
    return out


def resolve_data_path(name: str) -> str:
    """``squad-open`` -> its corpus.jsonl, ``squad-open:train|dev`` -> that question file; other
    strings are paths and pass through unchanged."""
    if name == "squad-open":
        return str(squad_open_dir() / "corpus.jsonl")
    if name.startswith("squad-open:"):
        split = name.split(":", 1)[1]
        if split not in ("train", "dev"):
            raise RagRayError(f"unknown squad-open split {split!r}; use squad-open:train or squad-open:dev")
        return str(squad_open_dir() / f"{split}.jsonl")
    return name


def squad_open_dir() -> Path:
    """Directory with squad-open's corpus.jsonl / train.jsonl / dev.jsonl.

    Order: ``$RAG_RAY_DATA`` (the squad-open folder itself), ``../shared/data/squad-open`` next to
    the current directory, else a copy built from SQuAD v1.1 dev under ``~/.cache/rag_ray``.
    """
    env = os.environ.get("RAG_RAY_DATA")
    candidates = [Path(env)] if env else []
    candidates += [Path.cwd() / ".." / "shared" / "data" / "squad-open",
                   Path(__file__).resolve().parents[2] / "shared" / "data" / "squad-open"]
    for c in candidates:
        if (c / "corpus.jsonl").is_file():
            return c.resolve()
    if env:
        raise RagRayError(f"$RAG_RAY_DATA={env} has no corpus.jsonl")
    return build_squad_open(Path.home() / ".cache" / "rag_ray" / "squad-open")


def build_squad_open(out: Path, url: str = SQUAD_DEV_URL) -> Path:
    """Download SQuAD v1.1 dev and write the squad-open layout: corpus plus a 70% / 10% train / dev
    split of the questions by a hash of their id (the shared copy's proportions; which questions
    land where may differ from it, so compare numbers only within one copy)."""
    if (out / "corpus.jsonl").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} (SQuAD v1.1 dev, CC BY-SA 4.0) into {out} ...", flush=True)
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 - fixed https URL
        data = json.load(resp)
    corpus, train, dev = [], [], []
    for article in data["data"]:
        title = article["title"].replace("_", " ")
        for p, para in enumerate(article["paragraphs"]):
            doc_id = f"{article['title']}#{p}"
            corpus.append({"id": doc_id, "title": title, "text": para["context"]})
            for qa in para["qas"]:
                row = {"id": qa["id"], "question": qa["question"],
                       "answers": sorted({a["text"] for a in qa["answers"]}), "doc_id": doc_id}
                bucket = int(hashlib.sha1(qa["id"].encode()).hexdigest(), 16) % 10
                (train if bucket < 7 else dev if bucket == 7 else []).append(row)
    for name, rows in (("corpus", corpus), ("train", train), ("dev", dev)):
        atomic_write_text(out / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    return out
