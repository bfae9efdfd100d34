"""rag_ray: Retrieval-Augmented Generation (Lewis et al., 2020) as a distributed Ray application.

Indexing (Ray Data -> IndexShard actors), the index as a service (ShardSet) and its search client
(Retriever), the RAG model (RagModel), answering (RagPipeline), and joint fine-tuning (Ray Train). Public names are imported lazily, so ``import rag_ray`` stays cheap
and the CLI starts without loading torch until a command needs it.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Encoder": "rag_ray.encoders",
    "IndexShard": "rag_ray.shard",
    "IndexManifest": "rag_ray.manifest",
    "Retriever": "rag_ray.retriever",
    "ShardSet": "rag_ray.shards",
    "RagPipeline": "rag_ray.pipeline",
    "RagAnswer": "rag_ray.pipeline",
    "RagRayError": "rag_ray.errors",
    "Mode": "rag_ray.types",
    "build_index": "rag_ray.indexing",
    "Generator": "rag_ray.generator",
    "RagModel": "rag_ray.model",
    "RagConfig": "rag_ray.model",
    "Answer": "rag_ray.model",
    "run_training": "rag_ray.training",
    "IndexConfig": "rag_ray.config",
    "TrainConfig": "rag_ray.config",
    "load_config": "rag_ray.config",
    "Passage": "rag_ray.types",
    "Hit": "rag_ray.types",
    "SearchResult": "rag_ray.types",
    "init_ray": "rag_ray.runtime",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rag_ray' has no attribute {name!r}")
