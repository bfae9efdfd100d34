"""The jobs/ entry points: remote inputs made local, config errors as one line, and the index and
evaluate jobs submitted to a real `ray start --head` through the Job Submission SDK, the way a
cluster runs them (working dir unpacked elsewhere, data located through the runtime env)."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import TOY_DOCS, TOY_QUESTIONS, free_port, write_jsonl

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------- without Ray

def test_local_copy_downloads_a_uri_once_and_passes_paths_through(tmp_path):
    from rag_ray.errors import RagRayError
    from rag_ray.io import local_copy

    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"\x00\x01")
    cache = tmp_path / "cache"
    copy = local_copy(src.as_uri(), cache_dir=cache)
    assert copy.name == "model" and copy.is_relative_to(cache)
    assert (copy / "a.json").read_text() == "{}" and (copy / "sub" / "b.bin").read_bytes() == b"\x00\x01"
    (src / "a.json").write_text("changed")
    assert local_copy(src.as_uri(), cache_dir=cache) == copy and (copy / "a.json").read_text() == "{}"
    single = local_copy((src / "a.json").as_uri(), cache_dir=cache)
    assert single.is_file() and single.read_text() == "changed"
    assert local_copy(str(src)) == src
    with pytest.raises(RagRayError, match="does not exist"):
        local_copy((tmp_path / "missing").as_uri(), cache_dir=cache)


def test_local_index_fetches_only_the_current_version(tmp_path, monkeypatch):
    from rag_ray.jobs import local_index

    root = tmp_path / "indexes" / "toy"
    for version in ("v0001", "v0002"):
        (root / version).mkdir(parents=True)
        (root / version / "manifest.json").write_text(version)
    (root / "current").write_text("v0002\n")
    monkeypatch.setenv("RAG_RAY_CACHE", str(tmp_path / "cache"))
    local = Path(local_index(root.as_uri()))
    assert local.name == "v0002" and (local / "manifest.json").read_text() == "v0002"
    assert not list((tmp_path / "cache").rglob("v0001"))
    assert local_index(str(root)) == str(root)


def test_job_reports_config_errors_in_one_line(capsys):
    from rag_ray.config import EvalConfig
    from rag_ray.evaluation import run_eval
    from rag_ray.jobs import job_main

    argv = ["--config", str(REPO / "jobs" / "configs" / "eval_squad_open_cpu.yaml"), "--set", "limit=0",
            "--set", "mode=token"]
    assert job_main(EvalConfig, "evaluate", run_eval, argv) == 2
    err = capsys.readouterr().err
    assert "limit: must be >= 1, got 0" in err and "decoding: 'fast' does not apply to mode 'token'" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- ray job submit

def _kill_leftovers(temp_dir: str) -> None:
    """SIGKILL processes of this head only: those whose command line or working directory is under
    its private temp dir (job drivers and workers a lost process group could leave behind)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        try:
            cmd, cwd = " ".join(proc.info["cmdline"] or []), proc.info["cwd"] or ""
            if proc.pid != os.getpid() and (temp_dir in cmd or cwd.startswith(temp_dir)):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def ray_head():
    """A private `ray start --head --block` (loopback, own temp dir, own auth token), ended by
    terminating its process group: `ray stop` would stop every Ray on the machine."""
    ray_bin = BIN / "ray"
    temp_dir = tempfile.mkdtemp(prefix="rrjob-", dir="/tmp")  # short: Ray's socket paths have a length limit
    port, dashboard = free_port(), free_port()
    # the head's own token (the job drivers inherit it), so ~/.ray/auth_token is neither read nor written
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # the job driver's `python`
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    log_path = Path(temp_dir) / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
             f"--object-store-memory={400 * 1024**2}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dashboard}", "--disable-usage-stats", f"--temp-dir={temp_dir}",
             # every other fixed default port (10001, 52365, ...) may belong to another Ray on this machine
             *(f"--{flag}={free_port()}" for flag in ("ray-client-server-port", "dashboard-agent-listen-port",
                                                      "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                                      "metrics-export-port"))],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        from ray.job_submission import JobSubmissionClient

        # the token as a header: no process-wide Ray auth setting changes in this test process
        headers = {"Authorization": f"Bearer {env['RAY_AUTH_TOKEN']}"}
        client, error = None, None
        deadline = time.monotonic() + 90
        while client is None:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"`ray start --head` did not come up ({error!r}): {log_path.read_text()[-600:]}")
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}", headers=headers)
            except Exception as exc:  # noqa: BLE001 - the dashboard is still starting
                error = exc
                time.sleep(1)
        yield client
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(head.pid, signal.SIGKILL)
                head.wait(timeout=10)
        _kill_leftovers(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run_job(client, entrypoint: list[str], env_vars: dict, timeout_s: float = 300) -> str:
    """Submit ``entrypoint`` with the repo as working dir; wait for SUCCEEDED; return its logs."""
    from ray.job_submission import JobStatus

    job = client.submit_job(entrypoint=shlex.join(entrypoint), runtime_env={
        "working_dir": str(REPO), "excludes": [".git", ".venv", "indexes", "runs", ".pytest_cache"],
        "env_vars": env_vars})
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(job)
            logs = client.get_job_logs(job)
            pytest.fail(f"job {shlex.join(entrypoint)[:200]} still {status} after {timeout_s} s:\n{logs[-3000:]}")
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, f"job {shlex.join(entrypoint)[:200]} {status}:\n{logs[-3000:]}"
    return logs


#: Builds the tiny encoder, index and model of conftest.build_tiny_rag as a job on the head (it needs Ray).
TINY_RAG = ("import pathlib, sys; sys.path.insert(0, 'tests'); from conftest import build_tiny_rag; "
            "build_tiny_rag(pathlib.Path(sys.argv[1]), sys.argv[2])")


def test_index_then_evaluate_jobs_on_a_head(ray_head, tmp_path):
    """The shipped configs as they are, run where `ray job submit` runs them: `squad-open` comes from
    $RAG_RAY_DATA (a tiny copy written here), every output path is absolute."""
    data = tmp_path / "squad-open"
    data.mkdir()
    write_jsonl(data / "corpus.jsonl", TOY_DOCS)
    write_jsonl(data / "dev.jsonl", TOY_QUESTIONS)
    env_vars = {"RAG_RAY_DATA": str(data), "HF_HUB_OFFLINE": "1", "RAG_RAY_CACHE": str(tmp_path / "cache")}
    _run_job(ray_head, ["python", "-c", TINY_RAG, str(tmp_path), str(data / "corpus.jsonl")], env_vars)
    out, report = tmp_path / "job-index", tmp_path / "eval" / "report.json"
    logs = _run_job(ray_head, [
        "python", "jobs/build_index.py", "--config", "jobs/configs/index_squad_open.yaml", "--set", f"out={out}",
        "--set", f"encoder.name={tmp_path / 'passage_encoder'}"], env_vars)
    assert (out / "current").read_text().strip() == "v0001" and (out / "v0001" / "manifest.json").is_file()
    assert '"passages": 9' in logs
    logs = _run_job(ray_head, [
        "python", "jobs/evaluate.py", "--config", "jobs/configs/eval_squad_open_cpu.yaml",
        "--set", f"model={tmp_path / 'init_model'}", "--set", f"index={out}", "--set", f"report={report}",
        "--set", "limit=5"], env_vars)
    result = json.loads(report.read_text())
    assert result["dev_questions"] == 5 and {"dev_em", "dev_f1", "dev_nll", "dev_recall@5"} <= set(result)
    assert result["retrieval"]["index"] == str(out) and "bm25" in result["retrieval"]
    assert '"dev_em"' in logs
