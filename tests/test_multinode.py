"""Shards spread over the nodes of a real multi-node Ray cluster (ray.cluster_utils.Cluster)."""

from __future__ import annotations

import numpy as np
import pytest
import ray
from ray.cluster_utils import Cluster

from rag_ray.shard import IndexShard


@pytest.fixture()
def two_node_cluster():
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 200 * 1024**2})
    cluster.add_node(num_cpus=1, object_store_memory=200 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    _wait_until_schedulable_on_every_node()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _wait_until_schedulable_on_every_node(timeout_s: float = 60.0) -> None:
    """The GCS lists a new node before the head's raylet can place work on it; until then a soft
    node-affinity request silently falls back to the head. Wait until each node takes a task."""
    import time

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
    from rag_ray.manifest import EncoderInfo, IndexManifest, ShardInfo
    from rag_ray.retriever import Retriever

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(40, 8)).astype(np.float32)
    ids = [f"d{i:02d}::0" for i in range(40)]
    infos = []
    for s in range(2):
        shard = IndexShard(8)
        rows = list(range(s, 40, 2))
        shard.add([ids[i] for i in rows], [ids[i][:3] for i in rows], ["t"] * 20, ["x"] * 20, vecs[rows])
        shard.finalize()
        infos.append(ShardInfo(f"shard-{s:05d}", 20, shard.save(tmp_path / f"shard-{s:05d}")))
    IndexManifest(EncoderInfo("hand-made", 8, "mean", False, 16), "flat", {}, infos, 40).write(tmp_path)

    retriever = Retriever.load(tmp_path, spread=True)
    nodes = {s["node_id"] for s in retriever.stats()}
    assert len(nodes) == 2, f"shards were not spread: {retriever.stats()}"
    q = rng.normal(size=(3, 8)).astype(np.float32)
    res = retriever.search(q, 5)
    expected = np.argsort(-(q @ vecs.T), axis=1)[:, :5]
    assert [[h.passage_id for h in hits] for hits in res.hits] == [[ids[i] for i in row] for row in expected]
    retriever.shutdown()
