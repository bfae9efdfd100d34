"""The index manifest: what a persisted index is, so a searcher rebuilds from the directory alone.

An index directory holds ``manifest.json`` and ``shard-00000/ …``. The manifest records the
format version, the passage encoder (name, dim, pooling, normalisation), the FAISS index type
and parameters, the shard count, the passage count and every file's sha256; loading checks all
of it before a shard answers a query (ColBERT's ``load_from_index`` idea).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rag_ray.errors import RagRayError
from rag_ray.io import atomic_write_text, sha256_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
#: In an index root, the file naming the version that readers get by default (e.g. "v0003").
CURRENT = "current"
_VERSION = re.compile(r"^v(\d{4,})$")


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
        atomic_write_text(Path(directory) / MANIFEST, self.to_json())

    @classmethod
    def read(cls, directory: str | os.PathLike) -> "IndexManifest":
        path = Path(directory) / MANIFEST
        if not Path(directory).is_dir():
            raise RagRayError(f"index directory {directory} does not exist")
        if not path.is_file():
            raise RagRayError(f"{path} is missing: {directory} is not a rag_ray index (build one with `rag-ray index`)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RagRayError(f"{path} is corrupted: invalid JSON at line {exc.lineno} ({exc.msg})") from None
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise RagRayError(f"{path}: index format version {version!r} is not supported (this rag_ray reads "
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
            raise RagRayError(f"{path} is corrupted: missing or malformed field {exc}") from None
        if data.get("shard_count", manifest.shard_count) != manifest.shard_count:
            raise RagRayError(f"{path} is corrupted: shard_count {data['shard_count']} but {manifest.shard_count} shards listed")
        if sum(s.passages for s in manifest.shards) != manifest.passage_count:
            raise RagRayError(f"{path} is corrupted: shard passage counts do not add up to {manifest.passage_count}")
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


def version_dirs(root: str | os.PathLike) -> list[Path]:
    """The version directories of an index root (``v0001``, ``v0002``, ...), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name)),
                  key=lambda p: int(p.name[1:]))


def resolve_index(path: str | os.PathLike) -> Path:
    """The directory that holds ``manifest.json``: ``path`` itself when it is a version directory
    (or an unversioned index), else the version its ``current`` pointer names."""
    path = Path(path).resolve()
    if (path / MANIFEST).is_file():
        return path
    pointer = path / CURRENT
    if pointer.is_file():
        name = pointer.read_text().strip()
        if not _VERSION.match(name) or not (path / name).is_dir():
            raise RagRayError(f"{pointer} names version {name!r}, which is not a version directory of {path}")
        return path / name
    if not path.is_dir():
        raise RagRayError(f"index directory {path} does not exist")
    raise RagRayError(f"{path} is not a rag_ray index: it has neither {MANIFEST} nor a {CURRENT!r} pointer "
                      "(build one with `rag-ray index`)")


def index_name_and_version(version_dir: str | os.PathLike) -> tuple[str, str]:
    """(index name, version) of a resolved index directory: the root's name and ``vNNNN``, or the
    directory's own name and "v0000" for an unversioned index."""
    version_dir = Path(version_dir).resolve()
    if _VERSION.match(version_dir.name):
        return version_dir.parent.name, version_dir.name
    return version_dir.name, "v0000"


def next_version(root: str | os.PathLike) -> str:
    existing = version_dirs(root)
    return f"v{int(existing[-1].name[1:]) + 1 if existing else 1:04d}"


def set_current(root: str | os.PathLike, version: str) -> None:
    """Point readers of ``root`` at ``version`` (one atomic rename)."""
    atomic_write_text(Path(root) / CURRENT, version + "\n")


def index_identity(index_dir: str | os.PathLike) -> dict:
    """What a model records about the index it was trained or evaluated against: the resolved
    version directory, the index name and version, and the sha256 of its manifest."""
    path = resolve_index(index_dir)
    name, version = index_name_and_version(path)
    return {"path": str(path), "name": name, "version": version, "manifest_sha256": sha256_file(path / MANIFEST)}
