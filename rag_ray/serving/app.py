"""The Serve application: ``build_app(args)`` composes ingress -> model replicas -> index host.

``rag-ray serve`` (``run_serve``) and ``serve run cluster/serve.yaml`` (import path
``rag_ray.serving.app:build_app``) deploy the same application. The ingress is FastAPI: request
validation and limits, the API key, error mapping (4xx naming the field, 503 with Retry-After on
overload, 504 on timeout), the web page at ``/`` and OpenAPI at ``/docs``.
"""

# No `from __future__ import annotations`: FastAPI reads the route annotations at run time.

import asyncio
import dataclasses
import hashlib
import hmac
import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import Any

from ray import serve

from rag_ray.config import ServeConfig, load_config
from rag_ray.errors import RagRayError, user_error

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
#: Paths that serve only static content (the page, its files, the API docs) need no API key.
_PUBLIC = ("/", "/docs", "/openapi.json", "/favicon.ico")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The key from ``api_key_file`` or $RAG_RAY_API_KEY; refuses a non-loopback host without one
    unless ``allow_no_api_key`` is set."""
    key = None
    if cfg.api_key_file:
        try:
            key = Path(cfg.api_key_file).read_text().strip()
        except OSError as exc:
            raise RagRayError(f"api_key_file {cfg.api_key_file}: {exc.strerror}") from None
        if not key:
            raise RagRayError(f"api_key_file {cfg.api_key_file} is empty")
    key = key or os.environ.get("RAG_RAY_API_KEY") or None
    if key is None and not is_loopback(cfg.host) and not cfg.allow_no_api_key:
        raise RagRayError(f"refusing to serve on {cfg.host} (beyond loopback) without an API key: set "
                          "$RAG_RAY_API_KEY or api_key_file, or pass --allow-no-api-key to serve openly")
    return key


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _first_error(errors: list[dict]) -> str:
    """'field questions[0]: String should have at most 2000 characters' from pydantic's errors."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x not in ("body",)]
    where = ""
    for part in loc:
        where += f"[{part}]" if part.isdigit() else (f".{part}" if where else part)
    return (f"field {where}: " if where else "") + e.get("msg", "invalid request")


def make_ingress(cfg: ServeConfig, key_hash: str | None):
    """The FastAPI ingress deployment class for ``cfg`` (its limits shape the request schemas)."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles
    from ray.serve.exceptions import BackPressureError

    from rag_ray.retriever import ShardUnavailable
    from rag_ray.serving.api import (AnswerOut, AnswersOut, RetrieveOut, SwapRequest, decode_params,
                                     request_models)

    AnswerRequest, RetrieveRequest = request_models(cfg.limits)
    api = FastAPI(title="rag_ray", version="1", description="Retrieval-Augmented Generation over a sharded index")
    api.mount("/static", StaticFiles(directory=STATIC), name="static")
    api.add_middleware(_BodyLimit, limit=cfg.limits.max_body_bytes)
    if key_hash:
        api.add_middleware(_ApiKey, key_hash=key_hash)

    def error(status: int, message: str, **headers: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers or None)

    @api.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": _first_error(exc.errors()), "details": json.loads(json.dumps(
            exc.errors(), default=str))}, status_code=422)

    async def call(coro_or_response) -> Any:
        """Await a downstream call; map its failures to HTTP statuses."""
        try:
            return await asyncio.wait_for(coro_or_response, cfg.request_timeout_s), None
        except BackPressureError:
            return None, error(503, "overloaded: too many requests queued; retry shortly", **{"Retry-After": "1"})
        except asyncio.TimeoutError:
            return None, error(504, f"no answer within {cfg.request_timeout_s} s")
        except Exception as exc:  # noqa: BLE001 - mapped to a status below, never a hang
            user = user_error(exc)
            if user is not None:
                return None, error(400, str(user))
            if _caused_by(exc, ShardUnavailable):
                return None, error(503, "the index is restarting a shard; retry shortly", **{"Retry-After": "5"})
            log.exception("request failed")
            return None, error(500, f"internal error: {type(exc).__name__}")

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=cfg.max_queued_requests + 100)
    @serve.ingress(api)
    class RagIngress:
        def __init__(self, model, index_host) -> None:
            self.model = model
            self.index_host = index_host

        @api.get("/", include_in_schema=False)
        async def page(self):
            return FileResponse(STATIC / "index.html")

        @api.get("/healthz")
        async def healthz(self):
            info, err = await call(self.index_host.info.remote())
            if err is not None:
                return err
            status = 200 if info["healthy"] else 503
            return JSONResponse({"status": "ok" if status == 200 else "unhealthy",
                                 "index_version": info["index_version"]}, status_code=status)

        @api.get("/v1/index")
        async def index(self):
            info, err = await call(self.index_host.info.remote())
            return err or info

        @api.post("/v1/answer", response_model=AnswerOut | AnswersOut)
        async def answer(self, req: AnswerRequest):
            params = decode_params(req)
            calls = [self.model.answer.remote(q, params) for q in req.all_questions]
            answers, err = await call(asyncio.gather(*calls))
            if err is not None:
                return err
            if req.question is not None:
                return answers[0]
            return {"answers": answers, "index_version": answers[0]["index_version"]}

        @api.post("/v1/retrieve", response_model=RetrieveOut)
        async def retrieve(self, req: RetrieveRequest):
            questions = req.all_questions
            out, err = await call(self.model.retrieve.remote(questions, req.k, req.hybrid))
            if err is not None:
                return err
            return {"questions": questions, "passages": out["hits"], "index_version": out["index_version"],
                    "timings_ms": out["timings_ms"]}

        @api.post("/v1/admin/index")
        async def swap(self, req: SwapRequest):
            """Serve another index version; returns once it answers (the old one keeps serving on failure)."""
            out, err = await call(self.index_host.swap.remote(req.index_dir))
            return err or out

    return RagIngress


def _caused_by(exc: BaseException, kind: type) -> bool:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kind):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
    return False


class _BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes gets 413, declared or streamed."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_json(send, 413, {"error": f"request body of {int(declared)} bytes is over the limit "
                                                         f"of {self.limit} bytes"})
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _send_json(send, 413, {"error": f"request body is over the limit of {self.limit} bytes"})


class _TooLarge(Exception):
    pass


class _ApiKey:
    """ASGI middleware: ``Authorization: Bearer <key>`` on every path but the static page and docs.
    Only the key's sha256 is held (and crosses Ray), compared in constant time."""

    def __init__(self, app, key_hash: str) -> None:
        self.app, self.key_hash = app, key_hash

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in _PUBLIC or scope["path"].startswith("/static/"):
            return await self.app(scope, receive, send)
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(_key_hash(token.strip()), self.key_hash):
            return await _send_json(send, 401, {"error": "missing or wrong API key (Authorization: Bearer <key>)"},
                                    [(b"www-authenticate", b"Bearer")])
        return await self.app(scope, receive, send)


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


def build_app(args: "dict | ServeConfig"):
    """The application: typed builder for ``serve run`` (``args`` as in cluster/serve.yaml) and
    ``rag-ray serve``. Replica counts and batching come from the config; the served index from
    the IndexHost's ``user_config``."""
    from rag_ray.manifest import EncoderInfo, resolve_index
    from rag_ray.serving.index_host import IndexHost
    from rag_ray.serving.model_server import RagModelServer

    cfg = args if isinstance(args, ServeConfig) else load_config(ServeConfig, overrides=dict(args or {}))
    key = resolve_api_key(cfg)
    model_dir = Path(cfg.model).resolve()
    if not (model_dir / "rag_config.json").is_file():
        raise RagRayError(f"{cfg.model} is not a saved RagModel (no rag_config.json)")
    query_encoder = EncoderInfo.from_checkpoint(str(model_dir / "query_encoder"))
    roots = [str(Path(r).resolve()) for r in cfg.index_roots]
    if not roots and cfg.index:
        index_dir = resolve_index(cfg.index)
        roots = [str(index_dir.parent.parent if index_dir.name.startswith("v") else index_dir.parent)]
    a = cfg.autoscaling
    threads = a.torch_threads or max(1, round(a.replica_cpus))
    host = IndexHost.options(user_config={"index": cfg.index}).bind(roots, dataclasses.asdict(query_encoder),
                                                                     cfg.swap_grace_s)
    model = RagModelServer.options(
        ray_actor_options={"num_cpus": a.replica_cpus},
        autoscaling_config={"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                            "initial_replicas": a.min_replicas, "target_ongoing_requests": a.target_ongoing_requests,
                            "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s},
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
    ).bind(str(model_dir), host, threads, cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.n_docs,
           cfg.span_recovery, cfg.hybrid, cfg.lexical_k)
    return make_ingress(cfg, _key_hash(key) if key else None).bind(model, host)


def run_serve(cfg: ServeConfig, name: str = "rag") -> str:
    """Start (or join) Ray, start Serve's HTTP proxy on ``cfg.host:cfg.port``, deploy the app and
    return its URL once every deployment is running."""
    from rag_ray.runtime import init_ray_from

    app = build_app(cfg)  # fails fast (model, key, index) before anything starts
    init_ray_from(cfg.ray)
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(app, name=name, route_prefix="/", blocking=False)
    return f"http://{cfg.host}:{cfg.port}"
