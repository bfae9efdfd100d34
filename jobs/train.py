"""Entry point for `ray job submit`: joint RAG fine-tuning from a YAML TrainConfig.

    ray job submit --working-dir . -- python jobs/train.py --config jobs/configs/train_squad_open_cpu.yaml --set scaling.num_workers=4
"""

import argparse
import json
import logging

from rag_ray.config import TrainConfig, load_config
from rag_ray.runtime import init_ray_from
from rag_ray.training import run_training

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(TrainConfig, args.config, args.set)
    init_ray_from(cfg.ray)
    print(json.dumps(run_training(cfg)["metrics"], indent=2))
