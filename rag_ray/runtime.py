"""Starting or joining Ray with safe defaults.

Locally, rag_ray starts a private Ray on loopback only (Ray 2.60 otherwise binds its services to
the machine's public address), with usage stats off and a capped object store. Joining a cluster
(``address="auto"``, $RAY_ADDRESS, or under ``ray job submit``) changes nothing in the process's
environment: a job that names a hub model gets the hub access its cluster has.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

#: Set (unless already set) only before starting a private local Ray, before Ray reads them.
_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Makes Ray 2.60 bind every local service to 127.0.0.1 (checked with `ss`, ENVIRONMENT.md).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "TOKENIZERS_PARALLELISM": "false",
}


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = 2 * 1024**3, **kwargs) -> None:
    """Join ``address`` (or $RAY_ADDRESS) if given, else start a loopback-only local Ray."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        for key, value in _LOCAL_ENV.items():  # before `import ray` reads its settings
            os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, **kwargs)
        return
    ray.init(
        num_cpus=num_cpus,
        object_store_memory=object_store_memory,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        **kwargs,
    )


def init_ray_from(cfg) -> None:
    """``init_ray`` from a config's ``ray`` section (RayConfig): what every job entry point calls."""
    init_ray(address=cfg.address, num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory)
