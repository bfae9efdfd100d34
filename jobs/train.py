"""Entry point for `ray job submit`: joint RAG fine-tuning from a YAML TrainConfig.

    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"RAG_RAY_DATA": "/mnt/shared/data/squad-open"}}' \
        -- python jobs/train.py --config jobs/configs/train_squad_open_cpu.yaml \
        --set index=/mnt/shared/indexes/squad-open --set checkpoint.storage_path=/mnt/shared/runs \
        [--set scaling.num_workers=4]

The job runs in a copy of the working dir unpacked elsewhere: `squad-open:*` data comes from
$RAG_RAY_DATA, and the index and checkpoint storage must be absolute paths (or s3:// / gs:// for
`checkpoint.storage_path`) that every node sees. Runs what ``rag-ray train --config`` runs; prints
the final metrics as JSON.
"""

import sys

from rag_ray.config import TrainConfig
from rag_ray.jobs import job_main
from rag_ray.runtime import init_ray_from
from rag_ray.training import run_training


def train(cfg: TrainConfig) -> dict:
    """Start or join Ray as ``cfg.ray`` says (as ``rag-ray train`` does), then fit."""
    init_ray_from(cfg.ray)
    return run_training(cfg)["metrics"]


if __name__ == "__main__":
    sys.exit(job_main(TrainConfig, __doc__.splitlines()[0], train))
