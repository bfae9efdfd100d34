"""Shared fixtures: a real local Ray (loopback, capped object store), the packaged MiniLM, and
tiny corpora written by the tests themselves."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

# A small corpus with known content: the question about each topic has one right document.
TOY_DOCS = [
    {"id": "paris", "title": "Paris", "text": "Paris is the capital and most populous city of France. The Eiffel Tower was completed in 1889 for the World's Fair."},
    {"id": "tokyo", "title": "Tokyo", "text": "Tokyo is the capital of Japan. It hosted the Summer Olympic Games in 1964 and again in 2021."},
    {"id": "nile", "title": "Nile", "text": "The Nile is a major north-flowing river in northeastern Africa and flows into the Mediterranean Sea."},
    {"id": "python", "title": "Python (programming language)", "text": "Python is a high-level programming language created by Guido van Rossum and first released in 1991."},
    {"id": "everest", "title": "Mount Everest", "text": "Mount Everest is Earth's highest mountain above sea level, located in the Himalayas on the border of Nepal and China."},
    {"id": "photosynthesis", "title": "Photosynthesis", "text": "Photosynthesis is the process plants use to convert light energy into chemical energy stored in sugar, releasing oxygen."},
    {"id": "long", "title": "Long document", "text": " ".join(f"word{i}" for i in range(250))},
]
TOY_QUESTIONS = [
    {"question": "When was the Eiffel Tower completed?", "answers": ["1889"], "doc_id": "paris"},
    {"question": "Which city hosted the 1964 Summer Olympics?", "answers": ["Tokyo"], "doc_id": "tokyo"},
    {"question": "Into which sea does the Nile flow?", "answers": ["Mediterranean Sea"], "doc_id": "nile"},
    {"question": "Who created the Python programming language?", "answers": ["Guido van Rossum"], "doc_id": "python"},
    {"question": "What is the highest mountain on Earth?", "answers": ["Mount Everest"], "doc_id": "everest"},
]


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("corpus") / "toy.jsonl", TOY_DOCS)


@pytest.fixture(scope="session")
def toy_questions(tmp_path_factory) -> str:
    return write_jsonl(tmp_path_factory.mktemp("questions") / "toy_q.jsonl", TOY_QUESTIONS)


@pytest.fixture(scope="session")
def encoder():
    from rag_ray.encoders import Encoder

    return Encoder.from_pretrained()


def start_local_ray() -> None:
    from rag_ray.runtime import init_ray

    # 4 logical CPUs on a 2-core machine: shard actors, an embedding actor and Ray Data tasks
    # must all fit at once or the pipeline waits on itself.
    init_ray(num_cpus=4, object_store_memory=400 * 1024**2)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    start_local_ray()
    yield ray
    ray.shutdown()


def write_vector_index(root, vectors, shards: int = 2, version: str = "v0001"):
    """A Flat index of hand-made vectors in the versioned layout (``root/vNNNN`` + ``current``),
    written with the real IndexShard and manifest code; returns (version dir, passage ids)."""
    from pathlib import Path

    from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo, set_current
    from rag_ray.shard import IndexShard

    root = Path(root)
    directory = root / version
    ids = [f"d{i:04d}::0" for i in range(len(vectors))]
    infos = []
    for s in range(shards):
        rows = list(range(s, len(vectors), shards))
        shard = IndexShard(vectors.shape[1])
        shard.add([ids[i] for i in rows], [ids[i][:5] for i in rows], ["t"] * len(rows), [f"text {ids[i]}" for i in rows],
                  vectors[rows])
        shard.finalize()
        infos.append(ShardInfo(f"shard-{s:05d}", len(rows), shard.save(directory / f"shard-{s:05d}")))
    IndexManifest(EncoderInfo("hand-made", vectors.shape[1], "mean", False, 16), "flat", {}, infos,
                  len(vectors)).write(directory)
    set_current(root, version)
    return directory, ids


def exact_topk(vectors, queries, ids, k):
    """Ground truth: passage ids and scores of one faiss.IndexFlatIP over all vectors."""
    import faiss

    single = faiss.IndexFlatIP(vectors.shape[1])
    single.add(vectors)
    scores, rows = single.search(queries, k)
    return [[ids[r] for r in row] for row in rows], scores
