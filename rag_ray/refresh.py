"""Index refresh during training: the index re-embedded with the passage encoder being trained.

The rag objective with ``model.train_passage_encoder`` (the end-to-end retriever follow-up to RAG)
trains the passage encoder through p(z|x), so the vectors the index was built with go stale and
retrieval searches a space the encoder has left. ``IndexRefresher`` (the rank-0 worker's) saves the
encoder, rebuilds the index from the same corpus with the same Ray Data path as ``rag-ray index``
into a new version of the run's own index root, and starts that version's shard actors; the other
workers attach to them by name (``attach_refreshed``). The user's index is read, never written.

While a refresh runs the training waits (its CPUs or GPUs stay reserved), so the embedding pool is
sized from what Ray reports free beside it: on the 2-CPU local Ray of the squad-open configs
(``ray.num_cpus: 4``, one worker holding 2) two 1-thread actors.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from rag_ray.config import EncoderConfig, IndexConfig, TrainConfig, load_config
from rag_ray.encoders import Encoder
from rag_ray.errors import RagRayError
from rag_ray.io import atomic_dir
from rag_ray.manifest import IndexManifest, resolve_index, version_dirs


def refresh_root(cfg: TrainConfig) -> Path:
    """Where a run's refreshed versions go: ``index_refresh.root``, else inside the run's folder."""
    if cfg.index_refresh.root is not None:
        return Path(cfg.index_refresh.root).resolve()
    name = cfg.checkpoint.name
    return (Path(cfg.checkpoint.storage_path) / name / f"{name}-index").resolve()


def check_refresh_source(cfg: TrainConfig) -> None:
    """On the driver, before any worker starts: the index records a corpus that is still there to
    re-embed, and the refresh root is not the training's own index."""
    from rag_ray.indexing import _check_root

    source = resolve_index(cfg.index)
    paths = IndexManifest.read(source).corpus.get("paths") or []
    if not paths:
        raise RagRayError(f"index_refresh: the manifest of {source} records no corpus to re-embed (indexes built by "
                          "this rag_ray record it); rebuild the index with rag-ray index")
    missing = [p for p in paths if "://" not in p and not Path(p).exists()]
    if missing:
        raise RagRayError(f"index_refresh: the corpus {source} was built from is gone: {missing[0]} does not exist")
    root = refresh_root(cfg)
    if root == source.parent:
        raise RagRayError(f"index_refresh.root: {root} is the training's own index; the run writes its refreshed "
                          "versions to a root of their own")
    _check_root(root)


class IndexRefresher:
    """Rank 0's: :meth:`refresh` rebuilds the index with a passage encoder and starts its shards."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.source = IndexManifest.read(resolve_index(cfg.index))
        self.root = refresh_root(cfg)  # absolute: run_training resolved it on the driver
        #: beside the root (an index root holds versions only): the encoders the versions were built with
        self.encoders = self.root.parent / f"{self.root.name}-encoders"
        self.embedders = cfg.index_refresh.embedders
        self.shard_set = None  # the version this process started; retired when the next one serves

    def index_config(self, encoder_dir: Path) -> IndexConfig:
        """The source index's build (corpus, cut, shards, FAISS type and parameters, precision)
        with another passage encoder, into the refresh root, older unserved versions deleted."""
        import ray

        m, corpus = self.source, self.source.corpus  # its paths: checked by check_refresh_source
        free = ray.available_resources()
        gpus = int(free.get("GPU", 0))
        embedders = self.embedders or (gpus if gpus else int(free.get("CPU", 0)))
        if embedders < 1:
            raise RagRayError("index refresh: Ray reports no free CPU or GPU beside the training workers to embed "
                              "the corpus with; give Ray more CPUs than the workers hold (ray.num_cpus, "
                              "scaling.cpus_per_worker) or set index_refresh.embedders")
        overrides = {
            "corpus": list(corpus["paths"]), "out": str(self.root), "max_words": corpus.get("max_words", 100),
            "format": corpus.get("format"), "on_error": "skip" if corpus.get("skipped_rows") else "raise",
            "shards": m.shard_count, "index_type": m.index_type, **m.index_params, "overwrite": True,
            "embedders": embedders, "embedder_gpus": 1.0 if gpus and not self.embedders else 0.0,
            "torch_threads": None if gpus and not self.embedders else 1,
            "encoder": EncoderConfig(name=str(encoder_dir), pooling=m.encoder.pooling, normalize=m.encoder.normalize,
                                     max_length=m.encoder.max_length,
                                     precision=corpus.get("precision") or "auto").__dict__,
        }
        return load_config(IndexConfig, overrides={k: v for k, v in overrides.items() if v is not None})

    def refresh(self, passage_encoder: Encoder, step: int, number: int) -> Path:
        """Save the encoder, build a new version with it, start its shard actors (retiring the
        previous refresh's), and return the version directory every worker should now search.
        ``number`` is the training's count of this refresh, for the log line."""
        from rag_ray.indexing import build_index
        from rag_ray.shards import ShardSet

        start = time.perf_counter()
        encoder_dir = self.encoders / f"step-{step:08d}"
        with atomic_dir(encoder_dir) as tmp:
            passage_encoder.save_pretrained(tmp)
        manifest = build_index(self.index_config(encoder_dir))
        version = resolve_index(self.root)
        started = ShardSet.start(version)
        previous, self.shard_set = self.shard_set, started
        if previous is not None:
            previous.retire()
        self._prune_encoders()
        seconds = time.perf_counter() - start
        print(f"[rag_ray.train] index refresh {number} at step {step}: {manifest.passage_count} passages "
              f"re-embedded into {version} in {seconds:.1f} s; training searches it from now on", flush=True)
        return version

    def _prune_encoders(self) -> None:
        """Delete the saved encoders no version on disk was built with."""
        used = {IndexManifest.read(v).encoder.name for v in version_dirs(self.root)}
        for d in self.encoders.iterdir():
            if str(d) not in used and not d.name.startswith("."):
                shutil.rmtree(d, ignore_errors=True)

    def retriever(self):
        return self.shard_set.retriever()

    def close(self) -> None:
        """Retire the shard actors this process started (the version stays on disk)."""
        if self.shard_set is not None:
            self.shard_set.retire()
            self.shard_set = None


def attach_refreshed(version: str | Path):
    """A search client over a refreshed version's running shards (the workers other than rank 0)."""
    from rag_ray.shards import ShardSet

    return ShardSet.attach(version).retriever()
