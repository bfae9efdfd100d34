"""The index as a service: named shard actors that other drivers attach to, that come back
complete after a crash, and versions that can be served side by side (real local Ray)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import ray

from conftest import exact_topk, write_vector_index
from rag_ray.errors import RagRayError
from rag_ray.manifest import resolve_index
from rag_ray.retriever import ShardUnavailable
from rag_ray.shards import ShardSet, running_shards

RNG = np.random.default_rng(7)
VECTORS = RNG.normal(size=(300, 16)).astype(np.float32)
QUERIES = RNG.normal(size=(6, 16)).astype(np.float32)


def _ids(result):
    return [[h.passage_id for h in hits] for hits in result.hits]


@pytest.fixture()
def vector_index(tmp_path):
    root = tmp_path / "vecs"
    _, ids = write_vector_index(root, VECTORS, shards=3)
    return root, ids


def test_start_attach_and_retire(ray_local, vector_index):
    root, ids = vector_index
    shards = ShardSet.start(root)
    assert shards.owned and running_shards("vecs", "v0001") == [f"vecs/v0001/shard-{i:05d}" for i in range(3)]
    attached = ShardSet.attach(root / "v0001")  # a version directory works as well as the root
    assert not attached.owned
    expected, scores = exact_topk(VECTORS, QUERIES, ids, 10)
    for client in (shards.retriever(), attached.retriever()):
        res = client.search(QUERIES, 10)
        assert _ids(res) == expected
        np.testing.assert_allclose([[h.score for h in hits] for hits in res.hits], scores, rtol=1e-5)
        assert _ids(asyncio.run(client.search_async(QUERIES, 10))) == expected
    again = ShardSet.start(root)  # already running: attaches, starts nothing new
    assert not again.owned and [a._actor_id for a in again.actors] == [a._actor_id for a in shards.actors]
    assert all(h["healthy"] and h["passages"] == 100 for h in shards.health())
    shards.retire()
    assert running_shards("vecs") == []
    with pytest.raises(RagRayError, match=r"index vecs/v0001 is not running"):
        ShardSet.attach(root)


def test_a_second_driver_attaches_to_a_running_index(ray_local, vector_index):
    """Another process (its own driver, same cluster, token auth as Ray 2.60 sets it up) attaches
    by name and gets the very same results, without loading the index."""
    root, ids = vector_index
    shards = ShardSet.start(root, detached=True)
    try:
        script = (
            "import json, sys, numpy as np, ray\n"
            "from rag_ray.runtime import init_ray\n"
            "from rag_ray.shards import ShardSet\n"
            "init_ray(address=sys.argv[1])\n"
            "q = np.array(json.loads(sys.argv[3]), dtype=np.float32)\n"
            "res = ShardSet.attach(sys.argv[2]).retriever().search(q, 10)\n"
            "print(json.dumps([[h.passage_id for h in hits] for hits in res.hits]))\n"
        )
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        out = subprocess.run([sys.executable, "-c", script, ray.get_runtime_context().gcs_address, str(root),
                              json.dumps(QUERIES.tolist())], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        assert json.loads(out.stdout.strip().splitlines()[-1]) == _ids(shards.retriever().search(QUERIES, 10))
        assert running_shards("vecs", "v0001")  # the other driver's exit left the index running
    finally:
        shards.retire()


def test_killed_shard_restarts_complete_and_no_search_is_partial(ray_local, vector_index):
    root, ids = vector_index
    shards = ShardSet.start(root)
    retriever = shards.retriever(timeout_s=60)
    expected, _ = exact_topk(VECTORS, QUERIES, ids, 10)
    outcomes: list[str] = []
    stop = threading.Event()

    def search_loop() -> None:
        while not stop.is_set():
            try:
                outcomes.append("complete" if _ids(retriever.search(QUERIES, 10)) == expected else "WRONG")
            except ShardUnavailable:
                outcomes.append("error")

    pid_before = ray.get(shards.actors[1].stats.remote())["pid"]
    thread = threading.Thread(target=search_loop)
    thread.start()
    try:
        time.sleep(1.0)
        before = len(outcomes)
        ray.kill(shards.actors[1], no_restart=False)
        deadline = time.monotonic() + 60
        while len(outcomes) < before + 20 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=120)
    assert "WRONG" not in outcomes  # every result is the full merged top-k, or an error
    assert outcomes.count("complete") >= before + 20, outcomes[-5:]
    stats = ray.get(shards.actors[1].stats.remote())
    assert stats["pid"] != pid_before and stats["passages"] == 100  # restarted, and restored its files
    shards.retire()


def test_versions_are_served_side_by_side_and_only_unserved_ones_are_pruned(ray_local, toy_corpus, tmp_path, encoder):
    from rag_ray.config import IndexConfig, load_config
    from rag_ray.indexing import build_index

    root = tmp_path / "toy"

    def build(overwrite: bool = False) -> None:
        build_index(load_config(IndexConfig, overrides={"corpus": [toy_corpus], "out": str(root), "shards": 2,
                                                       "overwrite": overwrite}))

    build()
    v1 = ShardSet.start(root)
    files_v1 = {p: p.stat().st_mtime_ns for p in (root / "v0001").rglob("*") if p.is_file()}
    build(overwrite=True)  # v0001 is being served: it must survive the overwrite
    assert resolve_index(root).name == "v0002"
    assert {p: p.stat().st_mtime_ns for p in (root / "v0001").rglob("*") if p.is_file()} == files_v1
    v2 = ShardSet.start(root)
    q = encoder.encode(["Who created the Python programming language?"])
    for served in (v1, v2):
        assert served.retriever().search(q, 1).hits[0][0].doc_id == "python"
    assert {v1.version, v2.version} == {"v0001", "v0002"}
    v1.retire()
    build(overwrite=True)  # v0002 is still served and v0003 is new: only v0001 goes
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("v")) == ["v0002", "v0003"]
    v2.retire()


def test_corrupt_shard_is_refused_with_the_file_named(ray_local, vector_index):
    root, _ = vector_index
    target = root / "v0001" / "shard-00002" / "vectors.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(RagRayError, match=r"index file corrupted: .*shard-00002/vectors.npy"):
        ShardSet.start(root)
    assert running_shards("vecs") == []  # nothing left behind


def test_shards_split_the_node_cpus_and_one_or_two_rounds_agree(ray_local, vector_index, monkeypatch):
    """Shards hold no CPUs, so Ray would run each with one OpenMP thread: ShardSet gives each
    shard the node's CPUs divided by the shards on it (4 logical CPUs / 3 shards -> 1; a single
    shard gets all 4). A search returns the same whether it takes one round trip or two."""
    import rag_ray.retriever as retriever_module
    from rag_ray.shards import shard_threads, spread_placement

    root, ids = vector_index
    shards = ShardSet.start(root)
    try:
        assert [s["threads"] for s in shards.retriever().stats()] == [1, 1, 1]
        group, _ = spread_placement(1, 0.0)
        assert shard_threads(group) == [4]
        ray.util.remove_placement_group(group)
        client = shards.retriever()
        expected, _ = exact_topk(VECTORS, QUERIES, ids, 10)
        for rows in (0, 10**9):  # two rounds (scores, then the winners' payload); one round
            monkeypatch.setattr(retriever_module, "ONE_ROUND_ROWS", rows)
            res = client.search(QUERIES, 10)
            assert _ids(res) == expected and res.vectors.shape == (len(QUERIES), 10, 16)
            hits_only = client.search(QUERIES, 10, vectors=False)
            assert _ids(hits_only) == expected and hits_only.vectors is None
    finally:
        shards.retire()


def test_hybrid_retrieval_returns_a_passage_only_bm25_finds(ray_local, tmp_path, monkeypatch):
    """Passage 13 holds the question's rare word but its stored vector points away from the query,
    so the dense top-5 misses it; the hybrid top-5 has it, marked "lexical", scored by its q·d
    (as p(z|x) needs) and with its stored vector. Passage 21 is both the query's nearest vector
    and holds the second question's rare word: "both", ranked first. Dense hits keep their order;
    the one-round, two-round and async paths agree."""
    import rag_ray.retriever as retriever_module

    rng = np.random.default_rng(11)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    queries = rng.normal(size=(2, 16)).astype(np.float32)
    vectors[13] = -3 * queries[0] / np.linalg.norm(queries[0])
    vectors[21] = 2 * queries[1]
    texts = [f"ordinary passage about rivers {i}" for i in range(40)]
    texts[13] = "the zanzibarite quarry is in the north"
    texts[21] = "the quokkafish lives in shallow reefs"
    questions = ["Where is zanzibarite mined?", "What does a quokkafish eat?"]
    root = tmp_path / "hybrid"
    _, ids = write_vector_index(root, vectors, shards=2, texts=texts)
    shards = ShardSet.start(root)
    try:
        client = shards.retriever()
        dense = _ids(client.search(queries, 5))
        assert ids[13] not in dense[0] and dense[1][0] == ids[21]
        results = []
        for rows in (0, 10**9):  # two rounds (scores, then the winners' payload); one round
            monkeypatch.setattr(retriever_module, "ONE_ROUND_ROWS", rows)
            results.append(client.search(queries, 5, questions=questions))
        results.append(asyncio.run(client.search_async(queries, 5, questions=questions)))
        for res in results:
            assert _ids(res) == _ids(results[0])
            hits = res.hits[0]
            # RRF: BM25 rank 1 ties dense rank 1; q·d breaks the tie, so it comes second
            assert [h.passage_id for h in hits] == [dense[0][0], ids[13], *dense[0][1:4]]
            assert [h.source for h in hits] == ["dense", "lexical", "dense", "dense", "dense"]
            np.testing.assert_allclose(hits[1].score, queries[0] @ vectors[13], rtol=1e-5)
            np.testing.assert_allclose(res.vectors[0, 1], vectors[13], atol=1e-2)  # fp16 stored vector
            np.testing.assert_allclose([h.score for h in hits], res.vectors[0] @ queries[0], rtol=1e-2)
            assert (res.hits[1][0].passage_id, res.hits[1][0].source) == (ids[21], "both")
            assert [h.source for h in res.hits[1][1:]] == ["dense"] * 4
        with pytest.raises(RagRayError, match="got 1 questions for 2 query vectors"):
            client.search(queries, 5, questions=questions[:1])
        with pytest.raises(RagRayError, match="questions must be a list of strings"):
            client.search(queries[:1], 5, questions=questions[0])
        with pytest.raises(RagRayError, match="lexical_k must be in 1..2048"):
            client.search(queries, 5, questions=questions, lexical_k=0)
        assert _ids(client.search(queries, 5)) == dense  # without questions: dense, unchanged
    finally:
        shards.retire()
