"""Entry point for `ray job submit`: EM / F1 / NLL / recall of a saved RagModel from a YAML EvalConfig.

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"RAG_RAY_DATA": "/mnt/shared/data/squad-open"}}' \
        -- python jobs/evaluate.py --config jobs/configs/eval_squad_open_cpu.yaml \
        --set model=/mnt/shared/runs/rag-seq/checkpoint_<...>/model \
        --set index=/mnt/shared/indexes/squad-open --set report=/mnt/shared/runs/eval/rag-seq.json

The job runs in a copy of the working dir unpacked elsewhere: `squad-open:dev` comes from
$RAG_RAY_DATA, and `model`, `index` and `report` must be absolute paths; `model` and `index` may
also be URIs (s3://, gs://), downloaded once into $RAG_RAY_CACHE (default ~/.cache/rag_ray/remote).
Runs the same ``run_eval(cfg)`` as ``rag-ray eval-qa`` and prints its report as JSON.
"""

import sys

from rag_ray.config import EvalConfig
from rag_ray.evaluation import run_eval
from rag_ray.jobs import job_main

if __name__ == "__main__":
    sys.exit(job_main(EvalConfig, __doc__.splitlines()[0], run_eval))
