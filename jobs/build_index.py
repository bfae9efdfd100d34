"""Entry point for `ray job submit`: build a new version of a sharded index from a YAML IndexConfig.

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"RAG_RAY_DATA": "/mnt/shared/data/squad-open"}}' \
        -- python jobs/build_index.py --config jobs/configs/index_squad_open.yaml \
        --set out=/mnt/shared/indexes/squad-open [--set shards=4]

(Locally against `ray start --head`, Ray 2.60 also wants RAY_ADDRESS=http://127.0.0.1:8265 and
RAY_AUTH_MODE=token in the submitting shell.) The job runs in a copy of the working dir unpacked
elsewhere on the cluster, so relative paths there (`../shared`, `out: indexes/...`) point into
that copy: the squad-open data reaches it as $RAG_RAY_DATA (the runtime env above), and `out`
must be an absolute path on storage every node sees. Runs the same ``run_index(cfg)`` as
``rag-ray index --config``; under `ray job submit` it joins the job's cluster (RAY_ADDRESS).
"""

import sys

from rag_ray.config import IndexConfig
from rag_ray.indexing import run_index
from rag_ray.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main(IndexConfig, __doc__.splitlines()[0], run_index))
