"""The device server's Flask app: ``create_app(ServerConfig) -> Flask``.

OpenAI-compatible routes (``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``), the
simple ``/generate``, ``/health`` and ``/metrics``. The model is loaded once, here, into an
``Engine`` (engine.py): one llama.cpp context behind a bounded queue. Every error a client can
cause is answered as OpenAI-style JSON (``{"error": {message, type, param, code}}``).

The app is served by waitress (see cli.py); nothing here depends on the WSGI server, except
that waitress's ``waitress.client_disconnected`` is used, when present, to drop a request whose
client went away while it waited in the queue.
"""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from edgesmith.device_server import bench_api, openai_api
from edgesmith.device_server.chat_prompt import ControlTokenText
from edgesmith.device_server.engine import Engine, Finished, Job, QueueFull
from edgesmith.device_server.metrics import Metrics
from edgesmith.device_server.openai_api import ApiError
from edgesmith.device_server.templates import TemplateInputError, TemplateRenderError

log = logging.getLogger("edgesmith.server")

# Routes that answer without the API key: a liveness probe must not need a secret.
PUBLIC_ROUTES = frozenset({"/health"})
_KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 503: "overloaded_error"}


def default_threads() -> int:
    """Physical cores where known (llama.cpp gains nothing from SMT siblings)."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except ImportError:  # pragma: no cover - psutil is a core dependency
        n = None
    return max(1, n or os.cpu_count() or 1)


@dataclass
class ServerConfig:
    """Everything the app needs; the CLI builds it from its options."""

    model: str | Path
    n_ctx: int = 2048
    threads: int = 0  # 0: default_threads()
    queue_size: int = 8  # requests waiting behind the running one
    max_tokens: int = 512  # cap on max_tokens per request
    max_body_bytes: int = 1 << 20
    api_key: str | None = None  # the key itself (the CLI reads it from --api-key-file)
    model_id: str | None = None  # name in /v1/models; default: the file's stem
    template_deadline_s: float = 1.0  # wall-clock limit of one chat template render

    def __post_init__(self) -> None:
        self.model = Path(self.model)
        if not self.threads:
            self.threads = default_threads()
        if not self.model_id:
            self.model_id = self.model.stem
        if not self.template_deadline_s > 0:
            raise ValueError("ServerConfig.template_deadline_s must be > 0")
        for name in ("n_ctx", "queue_size", "max_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerConfig.{name} must be >= 1")


def _error(err: ApiError) -> Response:
    resp = jsonify(err.body())
    resp.status_code = err.status
    for k, v in err.headers.items():
        resp.headers[k] = v
    return resp


def create_app(config: ServerConfig, engine: Engine | None = None) -> Flask:
    """The app for ``config``; loads the model unless an ``engine`` is given."""
    metrics = Metrics()
    if engine is None:
        from edgesmith.device_server.templates import TemplateLimits

        engine = Engine(Path(config.model), n_ctx=config.n_ctx, threads=config.threads,
                        queue_size=config.queue_size, metrics=metrics,
                        template_limits=TemplateLimits(deadline_s=config.template_deadline_s))
    else:
        metrics = engine.metrics
    model_id = str(config.model_id)
    created = int(time.time())
    app = Flask("edgesmith.device_server", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.extensions["edgesmith_engine"] = engine
    app.extensions["edgesmith_config"] = config
    metrics.add_gauge("queue_depth", "Requests waiting for the model.", engine.queue_depth)
    metrics.add_gauge("queue_capacity", "Size of the request queue.", lambda: engine.queue_size)
    metrics.add_gauge("busy", "1 while the model is generating.", lambda: float(engine.busy()))
    metrics.add_gauge("model_loaded", "1 once the model is loaded.", lambda: 1.0)

    # -- cross-cutting: auth, request counting, errors -------------------------------------
    @app.before_request
    def _auth() -> Response | None:
        if not config.api_key or request.url_rule is None or request.path in PUBLIC_ROUTES:
            return None  # unknown routes fall through to 404, auth or not
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
            return _error(ApiError(401, "missing or wrong API key (send 'Authorization: Bearer "
                                   "KEY')", "authentication_error", code="invalid_api_key",
                                   headers={"WWW-Authenticate": "Bearer"}))
        return None

    @app.after_request
    def _count(resp: Response) -> Response:
        route = request.url_rule.rule if request.url_rule is not None else "unmatched"
        metrics.count_request(route, request.method, resp.status_code)
        return resp

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError) -> Response:
        return _error(err)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        if status == 404:
            msg = f"unknown route {request.method} {request.path}"
        elif status == 405:
            msg = f"method {request.method} is not allowed on {request.path}"
        elif status == 413:
            msg = f"the request body is larger than this server's limit of " \
                  f"{config.max_body_bytes} bytes"
        else:
            msg = exc.description or exc.name
        resp = _error(ApiError(status, msg, _KINDS.get(status, "invalid_request_error")))
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            resp.headers["Allow"] = ", ".join(exc.valid_methods)
        return resp

    @app.errorhandler(Exception)
    def _internal(exc: Exception) -> Response:
        log.exception("internal error on %s %s", request.method, request.path)
        return _error(ApiError(500, f"internal server error: {type(exc).__name__}",
                               "server_error"))

    # -- helpers ---------------------------------------------------------------------------
    def body() -> Any:
        if request.content_length is not None and request.content_length > config.max_body_bytes:
            raise RequestEntityTooLarge()
        return openai_api.parse_json(request.get_data(cache=False))

    def submit(prompt_tokens: list[int], req: Any) -> Job:
        params = openai_api.sampling(req, len(prompt_tokens), engine.n_ctx, config.max_tokens)
        disconnected = request.environ.get("waitress.client_disconnected")
        try:
            return engine.submit(prompt_tokens, params, disconnected)
        except QueueFull as exc:
            raise ApiError(503, f"the server is busy: {exc}", "overloaded_error",
                           code="queue_full",
                           headers={"Retry-After": str(exc.retry_after_s)}) from None

    def chat_prompt(req: openai_api.ChatRequest) -> list[int]:
        try:
            return engine.chat_tokens([m.as_dict() for m in req.messages])
        except TemplateInputError as exc:
            raise ApiError(400, f"the model's chat template rejected the messages: "
                                f"{exc.message}", param="messages") from None
        except TemplateRenderError as exc:
            raise ApiError(500, exc.message, "server_error") from None
        except ControlTokenText as exc:
            where = "messages" if exc.index is None else f"messages.{exc.index}.content"
            raise ApiError(400, f"{where}: {exc.message}", param=where,
                           code="control_token_in_content") from None

    def stream(job: Job, first: Callable[[], list[bytes]], piece: Callable[[str], bytes],
               last: Callable[[Finished], list[bytes]]) -> Response:
        def events() -> Iterator[bytes]:
            try:
                yield from first()
                gen = job.deltas()
                while True:
                    try:
                        text = next(gen)
                    except StopIteration as stop:
                        done: Finished = stop.value
                        break
                    yield piece(text)
                yield from last(done)
                yield openai_api.sse("[DONE]")
            except Exception as exc:  # the status line is gone: report it in the stream
                log.exception("streaming failed")
                yield openai_api.sse(ApiError(500, f"generation failed: {exc}",
                                              "server_error").body())
            finally:  # also reached when the client went away (the server closes us)
                job.cancel()

        return Response(events(), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def result(job: Job) -> tuple[str, Finished]:
        try:
            return job.result()
        finally:
            job.cancel()  # no-op once finished; stops the worker if we are interrupted

    # -- routes ----------------------------------------------------------------------------
    @app.get("/v1/models")
    def models() -> Response:
        return jsonify({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "edgesmith",
             "context_length": engine.n_ctx}]})

    @app.post("/v1/completions")
    def completions() -> Response:
        req = openai_api.parse(openai_api.CompletionRequest, body())
        job = submit(req.prompt_tokens(lambda t: engine.tokenize(t, special=True),
                                       engine.n_vocab), req)
        rid = openai_api.new_id("cmpl")
        if not req.stream:
            text, done = result(job)
            return jsonify(openai_api.completion(rid, model_id, text, done))
        usage = req.include_usage()

        def last(done: Finished) -> list[bytes]:
            out = [openai_api.sse(openai_api.completion_chunk(rid, model_id, "", done))]
            if usage:
                out.append(openai_api.sse(openai_api.usage_chunk(
                    rid, model_id, "text_completion", done)))
            return out

        return stream(job, lambda: [],
                      lambda t: openai_api.sse(openai_api.completion_chunk(rid, model_id, t)),
                      last)

    @app.post("/v1/chat/completions")
    def chat_completions() -> Response:
        req = openai_api.parse(openai_api.ChatRequest, body())
        job = submit(chat_prompt(req), req)
        rid = openai_api.new_id("chatcmpl")
        if not req.stream:
            text, done = result(job)
            return jsonify(openai_api.chat(rid, model_id, text, done))
        usage = req.include_usage()

        def last(done: Finished) -> list[bytes]:
            out = [openai_api.sse(openai_api.chat_chunk(rid, model_id, {}, done))]
            if usage:
                out.append(openai_api.sse(openai_api.usage_chunk(
                    rid, model_id, "chat.completion.chunk", done)))
            return out

        return stream(
            job,
            lambda: [openai_api.sse(openai_api.chat_chunk(
                rid, model_id, {"role": "assistant", "content": ""}))],
            lambda t: openai_api.sse(openai_api.chat_chunk(rid, model_id, {"content": t})),
            last)

    @app.post("/generate")
    def generate() -> Response:
        req = openai_api.parse(openai_api.GenerateRequest, body())
        text, done = result(submit(engine.tokenize(req.prompt, special=True), req))
        return jsonify({"text": text, "finish_reason": openai_api.completion(
            "", model_id, text, done)["choices"][0]["finish_reason"],
            "usage": openai_api.usage(done)})

    @app.get("/health")
    def health() -> Response:
        alive = engine.alive()
        resp = jsonify({"status": "ok" if alive else "error", "model_loaded": alive,
                        "model": model_id, "queue_depth": engine.queue_depth(),
                        "queue_size": engine.queue_size, "busy": engine.busy(),
                        "n_ctx": engine.n_ctx, "threads": config.threads})
        resp.status_code = 200 if alive else 503
        return resp

    @app.get("/metrics")
    def prometheus() -> Response:
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    bench_api.register(app, engine, config, body)
    return app
