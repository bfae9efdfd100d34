"""Plumbing shared by the ``jobs/*.py`` entry points of ``ray job submit``.

Each job reads ``--config YAML`` plus ``--set key.sub=value`` overrides into one typed config and
calls the same ``run_*`` function as the CLI; this module holds what they would otherwise each
repeat: the parser, JSON output, user errors as one line, and remote (URI) inputs made local.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from rag_ray.config import load_config

T = TypeVar("T")


def job_config(cls: type[T], description: str, argv: list[str] | None = None) -> T:
    """``--config YAML --set KEY=VALUE ...`` -> a validated ``cls`` (every bad field reported at once)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="YAML config, e.g. one of jobs/configs/*.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any field, e.g. --set ray.address=auto (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return load_config(cls, args.config, args.set)


def job_main(cls: type[T], description: str, run: Callable[[T], Any], argv: list[str] | None = None) -> int:
    """Parse the config, call ``run(cfg)`` and print its result as JSON. A user error (a bad config
    field, a missing file) ends as one line and exit status 2, as in the CLI, so the job's log
    says what to fix instead of burying it in a traceback."""
    from rag_ray.errors import user_error

    try:
        result = run(job_config(cls, description, argv))
    except Exception as exc:  # turned into one clear line, or re-raised
        err = user_error(exc)
        if err is None:
            raise
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str), flush=True)
    return 0


def local_index(uri: str | os.PathLike) -> str:
    """A local path for an index given as a path or a URI. A URI to an index root is resolved to the
    version its ``current`` pointer names *now*, and only that version is downloaded (once: version
    directories never change, a root's pointer does), so a cached copy is never stale."""
    from rag_ray.io import local_copy
    from rag_ray.manifest import CURRENT

    uri = os.fspath(uri)
    if "://" not in uri:
        return uri
    import pyarrow.fs as pafs

    from rag_ray.errors import RagRayError

    try:
        fs, remote = pafs.FileSystem.from_uri(uri)
        pointer = f"{remote.rstrip('/')}/{CURRENT}"
        if fs.get_file_info(pointer).type == pafs.FileType.File:
            with fs.open_input_stream(pointer) as f:
                uri = f"{uri.rstrip('/')}/{f.read().decode().strip()}"
    except (OSError, ValueError) as exc:
        raise RagRayError(f"cannot read index {uri}: {exc}") from None
    return str(local_copy(uri))
