"""The index manifest: what a persisted index is, so a searcher rebuilds from the directory alone.

An index directory holds ``manifest.json`` and ``shard-00000/ …``. The manifest records the
format version, the passage encoder (name, dim, pooling, normalisation), the FAISS index type
and parameters, the shard count, the passage count and every file's sha256; loading checks all
of it before a shard answers a query (ColBERT's ``load_from_index`` idea).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_ray.errors import RagRayError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class EncoderInfo:
    """An encoder's identity: the one place that says which vector space its outputs live in."""

    name: str
    dim: int
    pooling: str
    normalize: bool
    max_length: int

    @classmethod
    def from_checkpoint(cls, name: str, pooling: str | None = None, normalize: bool | None = None,
                        max_length: int = 256) -> "EncoderInfo":
        """Read from a checkpoint's config and metadata without loading its weights; pooling and
        normalisation default to what the checkpoint was trained with."""
        from transformers import AutoConfig

        from rag_ray.encoders import detect_pooling, resolve_model_path

        path = resolve_model_path(name)
        try:
            hf = AutoConfig.from_pretrained(path)
        except OSError as exc:
            raise RagRayError(f"cannot read encoder {name!r}: {exc}") from None
        det_pooling, det_normalize = detect_pooling(path)
        return cls(name=name, dim=int(hf.hidden_size), pooling=pooling or det_pooling,
                   normalize=det_normalize if normalize is None else bool(normalize), max_length=max_length)


@dataclass(frozen=True)
class ShardInfo:
    directory: str  # relative to the index directory
    passages: int
    files: dict[str, dict]


@dataclass(frozen=True)
class IndexManifest:
    encoder: EncoderInfo
    index_type: str
    index_params: dict
    shards: list[ShardInfo]
    passage_count: int
    corpus: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def shard_count(self) -> int:
        return len(self.shards)

    def to_json(self) -> str:
        data = asdict(self)
        data["shard_count"] = self.shard_count
        return json.dumps(data, indent=2, sort_keys=True)

    def write(self, directory: str | os.PathLike) -> None:
        """Atomic: written aside, then renamed over ``manifest.json``."""
        path = Path(directory) / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "IndexManifest":
        path = Path(directory) / MANIFEST
        if not Path(directory).is_dir():
            raise ValueError(f"index directory {directory} does not exist")
        if not path.is_file():
            raise ValueError(f"{path} is missing: {directory} is not a rag_ray index (build one with `rag-ray index`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is corrupted: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: index format version {version!r} is not supported (this rag_ray reads "
                             f"version {FORMAT_VERSION}); rebuild the index")
        try:
            manifest = cls(
                encoder=EncoderInfo(**data["encoder"]),
                index_type=data["index_type"],
                index_params=dict(data["index_params"]),
                shards=[ShardInfo(**s) for s in data["shards"]],
                passage_count=int(data["passage_count"]),
                corpus=dict(data.get("corpus", {})),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path} is corrupted: missing or malformed field {exc}") from None
        if data.get("shard_count", manifest.shard_count) != manifest.shard_count:
            raise ValueError(f"{path} is corrupted: shard_count {data['shard_count']} but {manifest.shard_count} shards listed")
        if sum(s.passages for s in manifest.shards) != manifest.passage_count:
            raise ValueError(f"{path} is corrupted: shard passage counts do not add up to {manifest.passage_count}")
        return manifest

    def check_query_encoder(self, query: EncoderInfo) -> None:
        """Refuse a query encoder whose vectors do not live in this index's space.

        The name may differ (RAG fine-tunes the query encoder), but the dimension, pooling and
        normalisation must match the passage encoder's or scores are meaningless.
        """
        problems = []
        if query.dim != self.encoder.dim:
            problems.append(f"dimension {query.dim} != index's {self.encoder.dim}")
        if query.pooling != self.encoder.pooling:
            problems.append(f"pooling {query.pooling!r} != index's {self.encoder.pooling!r}")
        if bool(query.normalize) != bool(self.encoder.normalize):
            problems.append(f"normalize={query.normalize} != index's {self.encoder.normalize}")
        if problems:
            raise RagRayError(f"query encoder {query.name!r} does not match the index (built with "
                              f"{self.encoder.name!r}): " + "; ".join(problems))


def index_identity(index_dir: str | os.PathLike) -> dict:
    """What a model records about the index it was trained or evaluated against: the resolved
    directory, its version name (when versioned) and the sha256 of its manifest."""
    from rag_ray.io import sha256_file

    path = Path(index_dir).resolve()
    return {"path": str(path), "version": path.name if path.name[:1] == "v" and path.name[1:].isdigit() else None,
            "manifest_sha256": sha256_file(path / MANIFEST)}
