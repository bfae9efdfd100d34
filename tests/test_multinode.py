"""Shards on a real multi-node Ray cluster (ray.cluster_utils.Cluster): spread over the nodes,
and a shard whose node dies comes back complete on a node that is still alive."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from conftest import exact_topk, write_vector_index
from rag_ray.shards import ShardSet

# Two logical CPUs a node: after a node is lost, the Ray Train workers left on the other nodes
# (0.4 CPU each) must leave a whole CPU free on some node for Ray Data's 1-CPU shuffle tasks, or
# the restarted run waits for its first batch forever.
NODE = {"num_cpus": 2, "object_store_memory": 200 * 1024**2}


def _cluster(nodes: int):
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args=NODE)
    for _ in range(nodes - 1):
        cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    _wait_until_schedulable_on_every_node()
    return cluster


@pytest.fixture()
def two_node_cluster():
    cluster = _cluster(2)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture()
def three_node_cluster():
    cluster = _cluster(3)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _wait_until_schedulable_on_every_node(timeout_s: float = 60.0) -> None:
    """The GCS lists a new node before the head's raylet can place work on it; until then a soft
    node-affinity request silently falls back to the head. Wait until each node takes a task."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def where() -> str:
        return ray.get_runtime_context().get_node_id()

    deadline = time.monotonic() + timeout_s
    for node in (nd["NodeID"] for nd in ray.nodes() if nd["Alive"]):
        strategy = NodeAffinitySchedulingStrategy(node, soft=True)
        while ray.get(where.options(scheduling_strategy=strategy).remote()) != node:
            assert time.monotonic() < deadline, f"node {node} never became schedulable"
            time.sleep(0.2)


def test_index_shards_live_on_different_nodes_and_search_merges(two_node_cluster, tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    write_vector_index(tmp_path / "two", vecs, shards=2)[1]
    shards = ShardSet.start(tmp_path / "two")
    retriever = shards.retriever()
    nodes = {s["node_id"] for s in retriever.stats()}
    assert len(nodes) == 2, f"shards were not spread: {retriever.stats()}"
    q = rng.normal(size=(3, 8)).astype(np.float32)
    expected, _ = exact_topk(vecs, q, [f"d{i:04d}::0" for i in range(40)], 5)
    assert [[h.passage_id for h in hits] for hits in retriever.search(q, 5).hits] == expected
    shards.retire()


def test_a_shard_whose_node_dies_comes_back_on_a_live_node(three_node_cluster, tmp_path):
    """The index directory is on storage every node sees (here: the same disk)."""
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(90, 8)).astype(np.float32)
    _, ids = write_vector_index(tmp_path / "three", vecs, shards=3)
    shards = ShardSet.start(tmp_path / "three")
    retriever = shards.retriever(timeout_s=180)
    q = rng.normal(size=(4, 8)).astype(np.float32)
    expected, _ = exact_topk(vecs, q, ids, 10)
    placed = [s["node_id"] for s in retriever.stats()]
    assert len(set(placed)) == 3, f"shards were not spread: {placed}"
    head = ray.get_runtime_context().get_node_id()
    victim_shard = next(i for i, n in enumerate(placed) if n != head)
    victim = next(n for n in three_node_cluster.list_all_nodes() if n.node_id == placed[victim_shard])
    three_node_cluster.remove_node(victim)
    # The search waits out the restart (the shard's placement bundle moves to a live node) and
    # returns the complete top-k; it never returns a partial result.
    assert [[h.passage_id for h in hits] for hits in retriever.search(q, 10).hits] == expected
    moved = ray.get(shards.actors[victim_shard].stats.remote())
    alive = {nd["NodeID"] for nd in ray.nodes() if nd["Alive"]}
    assert moved["node_id"] != placed[victim_shard] and moved["node_id"] in alive and moved["passages"] == 30
    shards.retire()


def _node_of_pid(cluster, pid: int):
    """The cluster node whose raylet is an ancestor of process ``pid`` (worker processes are
    children of their node's raylet)."""
    import psutil

    raylets = {n.all_processes["raylet"][0].process.pid: n for n in cluster.list_all_nodes()}
    process = psutil.Process(pid)
    while process is not None:
        if process.pid in raylets:
            return raylets[process.pid]
        process = process.parent()
    return None


def test_training_survives_losing_a_worker_node(three_node_cluster, toy_corpus, tmp_path):
    """Two Ray Train workers on a 3-node cluster; once a checkpoint is registered, the node of a
    worker that is not the head is removed (SPREAD placement puts the workers on two nodes, so one
    is always on a node that can be removed). The run restores from the checkpoint on the nodes that
    are left (and its shard, if it was there, moves too) and finishes at the configured step."""
    import threading

    import psutil

    from conftest import TOY_QUESTIONS, build_tiny_rag, registered_checkpoints, write_jsonl
    from rag_ray.config import TrainConfig, load_config
    from rag_ray.training import run_training

    build_tiny_rag(tmp_path, toy_corpus, n_docs=2)
    questions = write_jsonl(tmp_path / "q.jsonl", TOY_QUESTIONS * 4)
    cfg = load_config(TrainConfig, overrides={
        "index": str(tmp_path / "index"), "data.train": questions, "data.dev": None,
        "model.init_from": str(tmp_path / "init_model"), "model.n_docs": 2, "optim.batch_size": 2,
        "optim.warmup_steps": 0, "optim.max_steps": 80, "checkpoint.every": 8, "eval.questions": 0,
        "scaling.num_workers": 2, "scaling.cpus_per_worker": 0.4, "scaling.torch_threads": 1,
        "scaling.placement_strategy": "SPREAD",
        "checkpoint.storage_path": str(tmp_path / "runs"), "checkpoint.name": "node-loss",
        "checkpoint.max_failures": 3})
    head = ray.get_runtime_context().get_node_id()
    removed: list = []
    errors: list = []
    seen: dict = {"checkpoint": False, "worker_nodes": set()}

    def remove_a_worker_node() -> None:
        try:
            deadline = time.time() + 300
            while time.time() < deadline and not removed:
                if registered_checkpoints(tmp_path / "runs" / "node-loss"):
                    seen["checkpoint"] = True
                    for p in psutil.process_iter(["cmdline"]):
                        if any("RayTrainWorker" in part for part in (p.info["cmdline"] or [])):
                            node = _node_of_pid(three_node_cluster, p.pid)
                            seen["worker_nodes"].add(None if node is None else node.node_id)
                            if node is not None and node.node_id != head:
                                three_node_cluster.remove_node(node)
                                removed.append(node.node_id)
                                return
                time.sleep(0.5)
        except BaseException as exc:  # surfaced by the assertions below
            errors.append(exc)

    thread = threading.Thread(target=remove_a_worker_node, daemon=True)
    thread.start()
    report = run_training(cfg)
    thread.join(timeout=5)
    assert not errors, errors
    assert removed, f"no worker node was removed (head {head}, watcher saw {seen})"
    assert removed[0] not in {nd["NodeID"] for nd in ray.nodes() if nd["Alive"]}
    assert report["metrics"]["step"] == 80
    assert report["metrics"]["resumed_from_step"] is not None and report["metrics"]["resumed_from_step"] >= 8
