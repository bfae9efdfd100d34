"""Shared benchmark helpers: peak memory sampling of the Ray processes, JSON output."""

from __future__ import annotations

import json
import os
import resource
import threading
import time


def rss_mb() -> float:
    """This process's peak RSS in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RaySampler:
    """Samples the summed RSS of this process and every Ray worker process (``ray::`` titles),
    reporting the peak: the memory a whole pipeline needs, not just the driver's share.

    ``peak_single_anon`` is the largest single worker's RSS less its file-backed pages (memory-
    mapped files such as spilled or stored vectors, which the kernel can drop and reread): the
    part that must fit in RAM."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval, self.peak_total, self.peak_single, self.peak_single_anon = interval, 0.0, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = os.getpid()
        while not self._stop.is_set():
            total = single = anon = 0.0
            for p in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmd = p.info["cmdline"] or []
                if p.info["pid"] == me or (cmd and cmd[0].startswith("ray::")):
                    info = p.info["memory_info"]
                    mb = info.rss / 2**20 if info else 0.0
                    total += mb
                    if p.info["pid"] != me:
                        single = max(single, mb)
                        anon = max(anon, (info.rss - getattr(info, "shared", 0)) / 2**20 if info else 0.0)
            self.peak_total, self.peak_single = max(self.peak_total, total), max(self.peak_single, single)
            self.peak_single_anon = max(self.peak_single_anon, anon)
            time.sleep(self.interval)

    def __enter__(self) -> "RaySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


class Passage:
    """Just the two fields prompts use (title, text); what retrieval returns also fits."""

    __slots__ = ("title", "text")

    def __init__(self, title: str, text: str) -> None:
        self.title, self.text = title, text


def read_jsonl(path) -> list[dict]:
    from pathlib import Path

    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
