"""Entry point for `ray job submit`: serve a trained model over an index until the job is stopped.

    ray job submit --working-dir . -- python jobs/serve.py --config jobs/configs/serve_squad_open.yaml \
        --set model=/mnt/shared/runs/rag-seq/checkpoint_<...>/model --set index=/mnt/shared/indexes/squad-open
    ray job stop <submission id>     # SIGTERM: the application is deleted, the cluster stays up

`model` and `index` are absolute paths as every replica sees them, or URIs (s3://, gs://) copied
once into $RAG_RAY_CACHE (default ~/.cache/rag_ray/remote; on several nodes make it a shared
volume). Runs the same ``run_serve(cfg)`` as ``rag-ray serve --config``; the job stays running,
as the service's owner, until SIGTERM or SIGINT.
"""

import dataclasses
import signal
import sys
import threading

from rag_ray.config import ServeConfig
from rag_ray.io import local_copy
from rag_ray.jobs import job_main, local_index
from rag_ray.serving.app import run_serve

APP = "rag"


def serve_until_stopped(cfg: ServeConfig) -> None:
    """Deploy, then hold the job open until SIGTERM (`ray job stop`) or SIGINT, then delete the app."""
    from ray import serve

    cfg = dataclasses.replace(cfg, model=str(local_copy(cfg.model)), index=cfg.index and local_index(cfg.index))
    url = run_serve(cfg, name=APP)
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stopped.set())
    print(f"serving {cfg.model} over {cfg.index} at {url}/ (API: {url}/docs)", flush=True)
    while not stopped.wait(timeout=1.0):
        pass
    print("stopping: deleting the application", flush=True)
    serve.delete(APP)


if __name__ == "__main__":
    sys.exit(job_main(ServeConfig, __doc__.splitlines()[0], serve_until_stopped))
