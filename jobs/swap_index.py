"""Entry point for `ray job submit`: make the running service serve another index; returns once it answers.

    ray job submit --working-dir . -- python jobs/swap_index.py --config jobs/configs/serve_squad_open.yaml \
        --set index=/mnt/shared/indexes/squad-open/v0002

Takes the service's address (host, port) and API key (api_key_file or $RAG_RAY_API_KEY) from the
ServeConfig it was started with, and the new ``index`` (a root or version directory as the
service sees it, under its index_roots; a URI is copied once into $RAG_RAY_CACHE first). Runs
``rag-ray swap-index``: the old index keeps serving if the service refuses the new one.
"""

import sys

from rag_ray.cli import main
from rag_ray.config import ServeConfig
from rag_ray.errors import RagRayError
from rag_ray.jobs import job_main, local_index
from rag_ray.serving.app import resolve_api_key


def swap(cfg: ServeConfig) -> None:
    """``rag-ray swap-index`` against the service ``cfg`` describes (a wildcard host is reached on loopback)."""
    if not cfg.index:
        raise RagRayError("index: give the index to serve, e.g. --set index=/mnt/shared/indexes/squad-open")
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    key = resolve_api_key(cfg)
    rc = main(["swap-index", "--url", f"http://{host}:{cfg.port}", "--index", local_index(cfg.index), "--json"]
              + (["--api-key", key] if key else []))
    if rc:
        raise SystemExit(rc)


if __name__ == "__main__":
    sys.exit(job_main(ServeConfig, __doc__.splitlines()[0], swap))
