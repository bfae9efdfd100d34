"""Atomic writes and checksums: every index, model and checkpoint file is written aside, then
renamed into place, so a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not a JSON
    object is an error naming the file and line (the caller checks the fields)."""
    from rag_ray.errors import RagRayError

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RagRayError(f"{path}, line {lineno}: invalid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise RagRayError(f"{path}, line {lineno}: expected a JSON object")
            yield lineno, row


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``path``; on success it replaces ``path`` (an
    existing one is moved aside first and deleted after), on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def local_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local path for ``uri``, so code that opens files (FAISS, safetensors) can read remote storage.

    A plain path comes back as is. A URI (``s3://``, ``gs://``, ``file://``: anything pyarrow's
    ``FileSystem.from_uri`` reads) is downloaded, file or whole directory, into
    ``cache_dir/<hash of uri>/<its name>`` (default ``$RAG_RAY_CACHE`` or ``~/.cache/rag_ray/remote``)
    once, written aside and renamed, and reused by every later call: give it something that does
    not change, such as a checkpoint's model directory or an index version directory.
    """
    uri = os.fspath(uri)
    if "://" not in uri:
        return Path(uri)
    import pyarrow.fs as pafs

    from rag_ray.errors import RagRayError

    try:
        fs, remote = pafs.FileSystem.from_uri(uri)
        kind = fs.get_file_info(remote).type
    except (OSError, ValueError) as exc:
        raise RagRayError(f"cannot read {uri}: {exc}") from None
    if kind == pafs.FileType.NotFound:
        raise RagRayError(f"{uri} does not exist")
    root = Path(cache_dir or os.environ.get("RAG_RAY_CACHE") or Path.home() / ".cache" / "rag_ray" / "remote")
    name = remote.rstrip("/").rsplit("/", 1)[-1] or "root"
    dest = root / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16] / name
    if dest.exists():
        return dest
    local = pafs.LocalFileSystem()
    with (atomic_dir(dest) if kind == pafs.FileType.Directory else atomic_path(dest)) as tmp:
        pafs.copy_files(remote, str(tmp), source_filesystem=fs, destination_filesystem=local)
    return dest
