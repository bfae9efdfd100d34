"""ShardSet: the live ``IndexShard`` actors of one index version, as a service.

Actors are named ``<index>/<version>/shard-<i>`` in the ``rag_ray`` namespace, so any process on
the cluster (a Serve replica, a job, the CLI) attaches to a running index instead of loading it
again. Each actor restores its own files in its constructor, so ``max_restarts`` brings back a
complete shard, and searches retry through a restart (``max_task_retries``: a search is an
idempotent read). Shards are placed through a SPREAD placement group: bundles go to different
nodes, and when a node dies Ray reschedules its bundle on a live node and restarts the shard
there. That needs the index directory on storage every node sees (a shared volume).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from rag_ray.errors import RagRayError
from rag_ray.manifest import EncoderInfo, IndexManifest, index_name_and_version, resolve_index
from rag_ray.shard import IndexShard

log = logging.getLogger(__name__)

#: Every rag_ray shard actor lives here, whatever namespace the process that started it runs in.
NAMESPACE = "rag_ray"
#: What a shard's placement bundle reserves when the caller gives it no CPUs: a token amount of
#: Ray's logical "memory" resource. A bundle needs some resource to exist, and reserving even
#: 0.01 CPU per shard left a 2-CPU node unable to run a 1-CPU read task beside a 1-CPU embedding
#: actor, so the index build waited forever.
SHARD_BUNDLE_MEMORY = 16 * 1024**2


def actor_name(index: str, version: str, shard: int) -> str:
    return f"{index}/{version}/shard-{shard:05d}"


def shard_actor_class(cls: type = IndexShard):
    """A shard class as a Ray actor; a few concurrent calls so a slow search does not queue a fetch."""
    import ray

    return ray.remote(max_concurrency=4)(cls)


class ServedShard(IndexShard):
    """A saved shard as a long-lived actor. A load failure (a missing or corrupted file) is kept
    and raised by every call, so callers get the RagRayError naming the file rather than a dead
    actor with a crash log, and Ray does not restart it in a loop."""

    def __init__(self, *args, **kwargs) -> None:
        self.load_error: RagRayError | None = None
        try:
            super().__init__(*args, **kwargs)
        except RagRayError as exc:
            self.load_error = exc

    def _check_loaded(self) -> None:
        if self.load_error is not None:
            raise self.load_error

    def search(self, queries, k):
        self._check_loaded()
        return super().search(queries, k)

    def search_payload(self, queries, k, vectors=True):
        self._check_loaded()
        return super().search_payload(queries, k, vectors)

    def lexical_search(self, questions, k):
        self._check_loaded()
        return super().lexical_search(questions, k)

    def hybrid_search(self, queries, questions, k, lexical_k):
        self._check_loaded()
        return super().hybrid_search(queries, questions, k, lexical_k)

    def hybrid_search_payload(self, queries, questions, k, lexical_k, vectors=True):
        self._check_loaded()
        return super().hybrid_search_payload(queries, questions, k, lexical_k, vectors)

    def fetch(self, rows, vectors=True):
        self._check_loaded()
        return super().fetch(rows, vectors)

    def tune(self, nprobe=None, ef_search=None, refine=None):
        self._check_loaded()
        return super().tune(nprobe, ef_search, refine)

    def stats(self) -> dict:
        self._check_loaded()
        return super().stats()


def spread_placement(n: int, num_cpus: float, name: str | None = None, detached: bool = False):
    """A SPREAD placement group of ``n`` one-shard bundles, ready; returns (group, per-shard options).

    Ray's "SPREAD" actor strategy does not spread zero-CPU actors and soft node affinity was
    measured to be ignored for actors on Ray 2.60, while hard affinity pins a shard to a node that
    may die. Placement-group bundles are both spread and rescheduled when their node dies.
    """
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": num_cpus} if num_cpus > 0 else {"memory": SHARD_BUNDLE_MEMORY}
    group = placement_group([bundle] * n, strategy="SPREAD", name=name or "",
                            lifetime="detached" if detached else None)
    if not group.wait(timeout_seconds=120):
        ray.util.remove_placement_group(group)
        raise RagRayError(f"could not reserve {n} shard slots of {bundle} each within 120 s: the cluster "
                          f"offers {ray.available_resources()}")
    options = [{"num_cpus": num_cpus, "memory": bundle.get("memory", 0),
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, i)} for i in range(n)]
    return group, options


def shard_threads(group, num_cpus: float = 0.0) -> list[int]:
    """FAISS threads per shard of a placement group: the CPUs a shard reserved, or else its node's
    CPUs divided by the shards on that node (at least 1).

    Shards hold no CPUs (so they never block embedding or training), which makes Ray start them
    with OMP_NUM_THREADS=1: one shard alone on a node would scan with one core and leave the rest
    idle. Dividing the node between its shards uses every core without oversubscribing it.
    """
    if num_cpus > 0:
        return [max(1, int(num_cpus))] * group.bundle_count
    nodes, cpus = bundle_nodes(group), node_cpus()
    return [max(1, int(cpus.get(node, 1) // nodes.count(node))) for node in nodes]


def bundle_nodes(group) -> list[str | None]:
    """The node id each bundle of a (ready) placement group sits on."""
    from ray.util.placement_group import placement_group_table

    where = placement_group_table(group).get("bundles_to_node_id", {})
    return [where.get(i) for i in range(group.bundle_count)]


def node_cpus() -> dict[str, float]:
    """Logical CPUs per live node, as Ray reports them."""
    import ray

    return {node["NodeID"]: node["Resources"].get("CPU", 1) for node in ray.nodes() if node.get("Alive")}


class ShardSet:
    """The shard actors of one index version: :meth:`start` (or attach if running), :meth:`attach`,
    :meth:`retriever`, :meth:`health`, :meth:`retire`."""

    def __init__(self, directory: Path, manifest: IndexManifest, actors: list, owned: bool) -> None:
        self.directory = directory
        self.manifest = manifest
        self.actors = actors
        #: True when this process created the actors (and so retires them when done with them)
        self.owned = owned
        self.name, self.version = index_name_and_version(directory)

    def __repr__(self) -> str:
        return f"ShardSet({self.name}/{self.version}, {len(self.actors)} shards, {self.directory})"

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def start(cls, index: str | os.PathLike, *, query_encoder: EncoderInfo | None = None, detached: bool = False,
              num_cpus: float = 0.0, max_restarts: int = -1, timeout_s: float = 600.0) -> "ShardSet":
        """Start one actor per shard of ``index`` (an index root: its current version; or a version
        directory), or attach to them when they already run; returns once every shard answers.

        ``detached`` actors outlive this process (a long-lived index service); otherwise they die
        with it. ``query_encoder`` is checked against the manifest before anything starts.
        """
        import ray

        directory, manifest = _read(index, query_encoder)
        name, version = index_name_and_version(directory)
        if running_shards(name, version):
            return cls.attach(directory, timeout_s=timeout_s)
        group_name = f"{name}/{version}/shards"
        stale = _find_group(group_name)  # left by a set whose actors were dropped without retire()
        if stale is not None:
            ray.util.remove_placement_group(stale)
        group, placement = spread_placement(manifest.shard_count, num_cpus, group_name, detached)
        threads = shard_threads(group, num_cpus)
        actor = shard_actor_class(ServedShard)
        actors = [
            actor.options(name=actor_name(name, version, i), namespace=NAMESPACE, get_if_exists=True,
                          lifetime="detached" if detached else None, max_restarts=max_restarts,
                          max_task_retries=-1, **opts).remote(
                manifest.encoder.dim, manifest.index_type, restore_from=str(directory / info.directory),
                files=info.files, threads=t, **manifest.index_params)
            for i, (info, opts, t) in enumerate(zip(manifest.shards, placement, threads))
        ]
        shard_set = cls(directory, manifest, actors, owned=True)
        try:
            # Each actor reads and checksums its own files: nothing funnels through this process.
            ray.get([a.stats.remote() for a in actors], timeout=timeout_s)
        except Exception as exc:
            shard_set.retire(group)
            raise _unwrap(exc) from None
        log.info("started %r", shard_set)
        return shard_set

    @classmethod
    def attach(cls, index: str | os.PathLike, *, query_encoder: EncoderInfo | None = None,
               timeout_s: float = 60.0) -> "ShardSet":
        """Attach to the running shard actors of ``index``; a RagRayError when they do not run."""
        import ray

        directory, manifest = _read(index, query_encoder)
        name, version = index_name_and_version(directory)
        actors = []
        for i in range(manifest.shard_count):
            try:
                actors.append(ray.get_actor(actor_name(name, version, i), namespace=NAMESPACE))
            except ValueError:
                raise RagRayError(f"index {name}/{version} is not running here (no actor "
                                  f"{actor_name(name, version, i)!r} in namespace {NAMESPACE!r}); "
                                  "start it with ShardSet.start") from None
        served = ray.get([a.stats.remote() for a in actors], timeout=timeout_s)
        for i, (stats, info) in enumerate(zip(served, manifest.shards)):
            expected = str((directory / info.directory).resolve())
            if stats["directory"] != expected:
                raise RagRayError(f"a running index named {name}/{version} serves {stats['directory']}, not "
                                  f"{expected}: two indexes share a name; rename one root directory")
        return cls(directory, manifest, actors, owned=False)

    def retriever(self, timeout_s: float = 300.0):
        """A search client over these shards (cheap; safe to pass to Ray tasks and actors)."""
        from rag_ray.retriever import Retriever

        return Retriever(self.actors, self.manifest, name=f"{self.name}/{self.version}", timeout_s=timeout_s,
                         shard_set=self)

    def health(self, timeout_s: float = 5.0) -> list[dict]:
        """Per shard: whether it answered within ``timeout_s``, its node and passage count."""
        import ray

        refs = [a.stats.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for i, ref in enumerate(refs):
            row = {"shard": i, "name": actor_name(self.name, self.version, i), "healthy": False}
            if ref in ready:
                try:
                    stats = ray.get(ref)
                    row.update(healthy=True, node_id=stats["node_id"], passages=stats["passages"])
                except Exception as exc:  # noqa: BLE001 - reported, not raised: this is a health probe
                    row["error"] = str(_unwrap(exc)).splitlines()[0]
            else:
                row["error"] = f"no answer within {timeout_s} s"
            out.append(row)
        return out

    def retire(self, group=None) -> None:
        """Stop the actors (no restart) and release their placement group."""
        import ray

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        group = group or _find_group(f"{self.name}/{self.version}/shards")
        if group is not None:
            ray.util.remove_placement_group(group)
        log.info("retired %s/%s", self.name, self.version)


def running_shards(index: str, version: str | None = None) -> list[str]:
    """Names of the running shard actors of ``index`` (optionally of one version) on this cluster."""
    import ray

    prefix = f"{index}/{version}/" if version else f"{index}/"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].startswith(prefix))


def _read(index: str | os.PathLike, query_encoder: EncoderInfo | None) -> tuple[Path, IndexManifest]:
    directory = resolve_index(index)
    manifest = IndexManifest.read(directory)
    if query_encoder is not None:
        manifest.check_query_encoder(query_encoder)
    return directory, manifest


def _find_group(name: str):
    """A live placement group by name, in any namespace (get_placement_group only searches the caller's)."""
    import ray
    from ray.util.placement_group import PlacementGroup

    for group_id, row in ray.util.placement_group_table().items():
        if row.get("name") == name and row.get("state") != "REMOVED":
            return PlacementGroup(ray.PlacementGroupID.from_hex(group_id))
    return None


def _unwrap(exc: BaseException) -> BaseException:
    """The user's error (e.g. a RagRayError naming a corrupted file) out of Ray's wrappers."""
    from rag_ray.errors import user_error

    return user_error(exc) or exc
