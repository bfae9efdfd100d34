"""Ray Serve application: real Serve on a local Ray, HTTP on loopback at a free port, tiny model.

One deployment serves the module's tests: round trips, every class of bad input, batching, an
index swap under load, a corrupt index refused, a killed model replica replaced, autoscaling.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TOY_QUESTIONS, http, start_tiny_service, write_jsonl
from rag_ray.cli import main
from rag_ray.config import IndexConfig, ServeConfig, load_config
from rag_ray.errors import RagRayError
from rag_ray.manifest import resolve_index

KEY = "test-key-0123456789"  # http() sends it unless told otherwise
NEW_DOCS = [
    {"id": "quintaria", "title": "Quintaria", "text": "Zorblax is the capital of Quintaria, founded in 2051 by glassmakers."},
    {"id": "glass", "title": "Quintarian glass", "text": "Quintarian glass is blown in Zorblax from violet sand."},
]


@pytest.fixture(scope="module")
def service(ray_local, toy_corpus, tmp_path_factory, monkeypatch_module):
    from ray import serve

    monkeypatch_module.setenv("RAG_RAY_API_KEY", KEY)
    yield start_tiny_service(tmp_path_factory.mktemp("serving"), toy_corpus, {
        "swap_grace_s": 2.0, "batch_wait_timeout_s": 0.05, "request_timeout_s": 60,
        "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1.0, "replica_cpus": 0.25,
                        "upscale_delay_s": 1.0, "downscale_delay_s": 4.0}})
    serve.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _load(url: str, seconds: float, clients: int, body: dict) -> list[tuple[float, int, dict | str]]:
    """Closed-loop load: ``clients`` threads post ``body`` for ``seconds``; (time, status, reply) each."""
    out: list = []
    stop = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < stop:
            status, reply, _ = http(url, body)
            out.append((time.monotonic(), status, reply))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_answer_retrieve_index_and_page_round_trips(service):
    url = service["url"]
    q = TOY_QUESTIONS[1]["question"]
    status, reply, _ = http(url + "/v1/answer", {"question": q, "decoding": "sequence-fast", "max_new_tokens": 4})
    assert status == 200, reply
    assert set(reply) == {"question", "answer", "score", "passages", "index_version", "timings_ms"}
    assert reply["question"] == q and reply["index_version"] == "index/v0001" and len(reply["passages"]) == 2
    assert abs(sum(p["posterior"] for p in reply["passages"]) - 1) < 1e-4
    status, reply, _ = http(url + "/v1/answer", {"questions": [q, TOY_QUESTIONS[2]["question"]], "n_docs": 1,
                                                  "decoding": "token-greedy", "max_new_tokens": 3})
    assert status == 200 and [len(a["passages"]) for a in reply["answers"]] == [1, 1]
    status, reply, _ = http(url + "/v1/retrieve", {"questions": [q], "k": 3})
    assert status == 200 and len(reply["passages"][0]) == 3 and reply["index_version"] == "index/v0001"
    assert {p["source"] for p in reply["passages"][0]} == {"dense"}
    # hybrid on request: BM25 candidates fused in, each passage says which list found it, still scored by q·d
    rare = "Which passage mentions word137?"  # one passage holds the term: BM25's first candidate
    status, reply, _ = http(url + "/v1/retrieve", {"question": rare, "k": 3, "hybrid": True})
    assert status == 200 and len(reply["passages"][0]) == 3, reply
    found = [p for p in reply["passages"][0] if "word137" in p["text"].split()]
    assert len(found) == 1 and found[0]["source"] in {"lexical", "both"}, reply
    assert {p["source"] for p in reply["passages"][0]} <= {"dense", "lexical", "both"}
    status, reply, _ = http(url + "/v1/answer", {"question": rare, "hybrid": True, "max_new_tokens": 3})
    assert status == 200 and any("word137" in p["text"].split() and p["source"] in {"lexical", "both"}
                                 for p in reply["passages"]), reply
    status, info, _ = http(url + "/v1/index")
    assert status == 200 and info["healthy"] and info["manifest"]["passages"] == 9 and len(info["shards"]) == 2
    status, page, _ = http(url + "/", key=None)
    assert status == 200 and "<html" in page.lower() and "/v1/answer" in page
    assert http(url + "/openapi.json", key=None)[0] == 200


BAD_REQUESTS = [
    ("malformed JSON", b'{"question": ', 422, "json"),
    ("wrong type", {"question": 5}, 422, "field question"),
    ("empty question", {"question": "   "}, 422, "field question"),
    ("question too long", {"question": "x" * 2001}, 422, "field question"),
    ("too many questions", {"questions": ["q"] * 17}, 422, "field questions"),
    ("one long question of many", {"questions": ["ok", "y" * 2001]}, 422, "field questions[1]"),
    ("both question and questions", {"question": "a", "questions": ["b"]}, 422, "exactly one"),
    ("unknown field", {"question": "a", "n_dcos": 3}, 422, "field n_dcos"),
    ("n_docs out of range", {"question": "a", "n_docs": 0}, 422, "field n_docs"),
    ("n_docs over the limit", {"question": "a", "n_docs": 21}, 422, "field n_docs"),
    ("bad decoding", {"question": "a", "decoding": "magic"}, 422, "field decoding"),
    ("num_beams over the limit", {"question": "a", "num_beams": 9}, 422, "field num_beams"),
    ("max_new_tokens over the limit", {"question": "a", "max_new_tokens": 65}, 422, "field max_new_tokens"),
    ("body over the limit", {"question": "a", "pad": "z" * 70_000}, 413, "over the limit"),
]


@pytest.mark.parametrize("name,body,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_input_gets_a_4xx_naming_the_problem_and_the_service_stays_healthy(service, name, body, status, message):
    url = service["url"]
    got, reply, _ = http(url + "/v1/answer", body)
    assert got == status, reply
    assert message in reply["error"].lower() or message in reply["error"], reply
    assert http(url + "/v1/answer", {"question": "Who created Python?", "max_new_tokens": 2})[0] == 200


def test_api_key_is_required_everywhere_but_the_static_page(service):
    url = service["url"]
    assert http(url + "/v1/answer", {"question": "a"}, key=None)[0] == 401
    assert http(url + "/v1/answer", {"question": "a"}, key="wrong")[0] == 401
    assert http(url + "/v1/index", key=None)[0] == 401
    assert http(url + "/healthz", key=None)[0] == 401
    assert http(url + "/", key=None)[0] == 200


def test_binding_beyond_loopback_without_a_key_refuses_to_start(monkeypatch, service):
    from rag_ray.serving.app import resolve_api_key

    monkeypatch.delenv("RAG_RAY_API_KEY", raising=False)
    with pytest.raises(RagRayError, match="refusing to serve on 0.0.0.0"):
        resolve_api_key(load_config(ServeConfig, overrides={"model": "m", "host": "0.0.0.0"}))
    assert resolve_api_key(load_config(ServeConfig, overrides={"model": "m", "host": "0.0.0.0",
                                                               "allow_no_api_key": True})) is None


def test_concurrent_requests_are_batched(service):
    url = service["url"] + "/v1/answer"
    body = {"question": TOY_QUESTIONS[0]["question"], "decoding": "sequence-fast", "max_new_tokens": 3}
    with ThreadPoolExecutor(12) as pool:
        replies = list(pool.map(lambda _: http(url, body), range(24)))
    assert all(status == 200 for status, _, _ in replies)
    assert max(reply["timings_ms"]["batch"] for _, reply, _ in replies) > 1


def test_overload_gets_503_with_retry_after_and_the_service_recovers(service):
    """More concurrent requests than max_ongoing_requests + max_queued_requests (16 + 64): the
    excess is refused at once with 503 and Retry-After, never left hanging; each request is cheap,
    so the accepted ones finish well within the request timeout."""
    url = service["url"] + "/v1/answer"
    body = {"question": "Into which sea does the Nile flow?", "decoding": "sequence-fast", "max_new_tokens": 4}
    with ThreadPoolExecutor(200) as pool:
        replies = list(pool.map(lambda _: http(url, body, timeout=300), range(200)))
    statuses = sorted({status for status, _, _ in replies})
    assert set(statuses) <= {200, 503}, statuses
    refused = [(reply, {k.lower(): v for k, v in headers.items()}) for status, reply, headers in replies
               if status == 503]
    assert refused, statuses
    assert all(headers.get("retry-after") == "1" and "overloaded" in reply["error"] for reply, headers in refused)
    assert http(url, {"question": "Who created Python?", "max_new_tokens": 2})[0] == 200


def test_index_swap_under_load_has_no_failed_request_and_moves_forward(service, tmp_path):
    from rag_ray.indexing import build_index

    url, root = service["url"], service["root"]
    before = http(url + "/v1/index")[1]["index_version"]
    new_corpus = write_jsonl(tmp_path / "new.jsonl", NEW_DOCS)
    build_index(load_config(IndexConfig, overrides={"corpus": [new_corpus], "out": str(service["index"]),
                                                   "shards": 2, "encoder.name": str(root / "passage_encoder")}))
    after = f"index/{resolve_index(service['index']).name}"
    assert after != before
    body = {"question": "What is the capital of Quintaria?", "decoding": "sequence-fast", "max_new_tokens": 3}
    results: list = []
    loader = threading.Thread(target=lambda: results.extend(_load(url + "/v1/answer", 12.0, 2, body)))
    loader.start()
    time.sleep(3.0)
    assert main(["swap-index", "--url", url, "--index", str(service["index"]), "--api-key", KEY, "--json"]) == 0
    swapped_at = time.monotonic()
    status, reply, _ = http(url + "/v1/answer", body)  # the new index's text is what the model reads now
    assert status == 200 and reply["index_version"] == after
    assert {p["doc_id"] for p in reply["passages"]} == {"quintaria", "glass"}
    loader.join()
    assert results and all(status == 200 for _, status, _ in results), [r for r in results if r[1] != 200][:3]
    versions = [reply["index_version"] for _, _, reply in sorted(results, key=lambda r: r[0])]
    assert versions[0] == before and versions[-1] == after
    first_new = versions.index(after)
    assert set(versions[first_new:]) == {after}  # versions only move forward
    assert all(r["index_version"] == after for t, _, r in results if t > swapped_at + 0.5)


def test_a_corrupt_or_foreign_index_is_refused_and_the_old_one_keeps_serving(service, tmp_path, capsys):
    url, index = service["url"], service["index"]
    before = http(url + "/v1/index")[1]["index_version"]
    bad = index / "v0009"
    shutil.copytree(index / "v0001", bad)
    target = bad / "shard-00000" / "passages.parquet"
    target.write_bytes(target.read_bytes()[:-10] + b"corrupted!")
    assert main(["swap-index", "--url", url, "--index", str(bad), "--api-key", KEY]) == 2
    assert "index file corrupted" in capsys.readouterr().err
    outside = tmp_path / "elsewhere"
    shutil.copytree(index / "v0001", outside)
    assert main(["swap-index", "--url", url, "--index", str(outside), "--api-key", KEY]) == 2
    assert "outside the directories this service may serve" in capsys.readouterr().err
    status, info, _ = http(url + "/v1/index")
    assert status == 200 and info["index_version"] == before and info["healthy"]
    assert http(url + "/v1/answer", {"question": "a", "max_new_tokens": 2})[0] == 200
    shutil.rmtree(bad)


def _model_replicas() -> list[str]:
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "RagModelServer" in a["name"]]


def _running_model_replicas() -> int:
    from ray import serve

    states = serve.status().applications["rag"].deployments["RagModelServer"].replica_states
    return int(states.get("RUNNING", 0))


def test_a_killed_model_replica_is_replaced_while_requests_succeed(service):
    import ray

    url = service["url"]
    body = {"question": "Who created Python?", "max_new_tokens": 2, "decoding": "sequence-fast"}
    results: list = []
    loader = threading.Thread(target=lambda: results.extend(_load(url + "/v1/answer", 20.0, 2, body)))
    loader.start()
    time.sleep(4.0)
    victim = _model_replicas()[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    loader.join()
    ok = sum(status == 200 for _, status, _ in results)
    assert ok / len(results) >= 0.99, f"{ok}/{len(results)} succeeded"
    deadline = time.monotonic() + 60
    while victim in _model_replicas() or _running_model_replicas() < 1:
        assert time.monotonic() < deadline, "the killed replica was not replaced"
        time.sleep(0.5)
    assert http(url + "/v1/answer", body)[0] == 200


def test_autoscaling_adds_replicas_under_load_and_removes_them_after(service):
    url = service["url"]
    body = {"question": "Which city hosted the 1964 Summer Olympics?", "max_new_tokens": 4,
            "decoding": "sequence-thorough", "num_beams": 2}
    counts: list[int] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            counts.append(_running_model_replicas())
            time.sleep(0.5)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = _load(url + "/v1/answer", 25.0, 8, body)
        assert all(status == 200 for _, status, _ in results)
        assert max(counts) == 2, counts
        deadline = time.monotonic() + 90
        while _running_model_replicas() > 1:
            assert time.monotonic() < deadline, "replicas did not scale back down"
            time.sleep(1.0)
    finally:
        stop.set()
        watcher.join()


def test_the_serve_config_file_describes_this_application(tmp_path):
    """cluster/serve.yaml: loopback HTTP, an import path that is the builder, args that are a valid
    ServeConfig, and deployment names the builder really creates."""
    import importlib
    from pathlib import Path

    import yaml

    from rag_ray.serving.app import is_loopback

    config = yaml.safe_load((Path(__file__).parents[1] / "cluster" / "serve.yaml").read_text())
    assert is_loopback(config["http_options"]["host"])
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), name).__name__ == "build_app"
    cfg = load_config(ServeConfig, overrides=app["args"])
    assert is_loopback(cfg.host) and cfg.autoscaling.max_replicas >= cfg.autoscaling.min_replicas
    assert {d["name"] for d in app["deployments"]} <= {"IndexHost", "RagModelServer", "RagIngress"}
    assert app["deployments"][0]["user_config"]["index"] == cfg.index
