"""Entry point for `ray job submit`: build a sharded index from a YAML IndexConfig.

    ray job submit --working-dir . -- python jobs/build_index.py --config jobs/configs/index_squad_open.yaml [--set shards=4]
"""

import argparse
import logging

from rag_ray.config import IndexConfig, load_config
from rag_ray.indexing import build_index
from rag_ray.runtime import init_ray

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    cfg = load_config(IndexConfig, args.config, args.set)
    init_ray(address=cfg.ray.address, num_cpus=cfg.ray.num_cpus, object_store_memory=cfg.ray.object_store_memory)
    manifest = build_index(cfg)
    print(f"index at {cfg.out}: {manifest.passage_count} passages in {manifest.shard_count} shards")
