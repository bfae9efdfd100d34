"""Starting or joining Ray with safe defaults.

Locally, rag_ray starts a private Ray on loopback only (Ray 2.60 otherwise binds its services to
the machine's public address), with usage stats off and a capped object store. On a cluster,
pass ``address="auto"`` (or run under ``ray job submit``) and nothing here changes the cluster.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

_LOCAL_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Makes Ray 2.60 bind every local service to 127.0.0.1 (checked with `ss`, ENVIRONMENT.md).
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    "TOKENIZERS_PARALLELISM": "false",
}


def init_ray(address: str | None = None, num_cpus: int | None = None,
             object_store_memory: int | None = 2 * 1024**3, **kwargs) -> None:
    """Join ``address`` (or $RAY_ADDRESS) if given, else start a loopback-only local Ray."""
    for key, value in _LOCAL_ENV.items():  # before Ray reads its settings at import
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
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
