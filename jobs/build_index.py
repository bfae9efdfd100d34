"""Entry point for `ray job submit`: build a new version of a sharded index from a YAML IndexConfig.

    ray job submit --working-dir . -- python jobs/build_index.py --config jobs/configs/index_squad_open.yaml [--set shards=4]

Runs the same ``run_index(cfg)`` as ``rag-ray index --config``; ``ray.address: auto`` in the
config (or ``--set ray.address=auto``) joins the cluster the job runs on.
"""

import argparse
import json
import logging

from rag_ray.config import IndexConfig, load_config
from rag_ray.indexing import run_index

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run_index(load_config(IndexConfig, args.config, args.set)), indent=2))
