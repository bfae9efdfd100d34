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


def write_vector_index(root, vectors, shards: int = 2, version: str = "v0001", texts=None):
    """A Flat index of hand-made vectors in the versioned layout (``root/vNNNN`` + ``current``),
    written with the real IndexShard and manifest code; returns (version dir, passage ids).
    ``texts``: the passages' texts (default "text <passage id>")."""
    from pathlib import Path

    from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo, set_current
    from rag_ray.shard import IndexShard

    root = Path(root)
    directory = root / version
    ids = [f"d{i:04d}::0" for i in range(len(vectors))]
    texts = texts or [f"text {i}" for i in ids]
    infos = []
    for s in range(shards):
        rows = list(range(s, len(vectors), shards))
        shard = IndexShard(vectors.shape[1])
        shard.add([ids[i] for i in rows], [ids[i][:5] for i in rows], ["t"] * len(rows), [texts[i] for i in rows],
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


def build_tiny_rag(root, corpus: str, n_docs: int = 2):
    """A tiny passage encoder, the corpus indexed with it at ``root/index``, and an untrained tiny
    RAG model (that encoder as query encoder, a 1-layer BERT2BERT with the copy head) saved at
    ``root/init_model``. Needs a running Ray (the index build uses Ray Data)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertLMHeadModel, BertModel, EncoderDecoderModel

    from rag_ray.config import IndexConfig, load_config
    from rag_ray.copy_head import PointerGenerator
    from rag_ray.encoders import Encoder, resolve_model_path
    from rag_ray.generator import Generator, _set_special_tokens
    from rag_ray.indexing import build_index
    from rag_ray.model import RagConfig, RagModel
    from rag_ray.types import DEFAULT_ENCODER

    tok = AutoTokenizer.from_pretrained(resolve_model_path(DEFAULT_ENCODER))

    def bert(**kw) -> BertConfig:
        return BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, max_position_embeddings=128, **kw)

    torch.manual_seed(0)
    encoder = Encoder(BertModel(bert()), tok, name="tiny-dpr", pooling="mean", normalize=True, max_length=64)
    encoder.save_pretrained(root / "passage_encoder")
    build_index(load_config(IndexConfig, overrides={"corpus": [corpus], "out": str(root / "index"), "shards": 2,
                                                   "encoder.name": str(root / "passage_encoder")}))
    ed = EncoderDecoderModel(encoder=BertModel(bert()),
                             decoder=BertLMHeadModel(bert(is_decoder=True, add_cross_attention=True)))
    _set_special_tokens(ed, tok)
    generator = Generator(PointerGenerator(ed), tok, max_source_length=64, max_target_length=8)
    query_encoder = Encoder.from_pretrained(str(root / "passage_encoder"))
    RagModel(query_encoder, generator, RagConfig(n_docs=n_docs)).save_pretrained(root / "init_model")
    return root / "index", root / "init_model"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(url: str, body=None, key: str | None = "test-key-0123456789", timeout: float = 60.0):
    """(status, JSON or text reply, headers) of a GET (no body) or a JSON POST; never raises on 4xx/5xx."""
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            raw, status, h = r.read(), r.status, dict(r.headers)
    except urllib.error.HTTPError as exc:
        raw, status, h = exc.read(), exc.code, dict(exc.headers)
    try:
        return status, json.loads(raw), h
    except json.JSONDecodeError:
        return status, raw.decode("utf-8", "replace"), h


def start_tiny_service(root, corpus: str, overrides: dict | None = None) -> dict:
    """The Serve application over a tiny RAG model and the corpus's index, on a free loopback port;
    returns once /healthz answers 200. Needs a running Ray; stop it with ``serve.shutdown()``."""
    import time

    from rag_ray.config import ServeConfig, load_config
    from rag_ray.serving.app import run_serve

    index, model = build_tiny_rag(root, corpus, n_docs=2)
    cfg = load_config(ServeConfig, overrides={"model": str(model), "index": str(index), "port": free_port(),
                                              **(overrides or {})})
    url = run_serve(cfg)
    deadline = time.monotonic() + 120
    while http(url + "/healthz")[0] != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the service never became healthy")
        time.sleep(0.5)
    return {"url": url, "root": root, "index": index, "model": model}


def registered_checkpoints(run_dir) -> list:
    """Checkpoints Ray Train has registered for a run (its snapshot lists them), not merely written."""
    import json

    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("checkpoint_results", [])
    except (OSError, ValueError):  # not written yet, or caught mid-write
        return []
