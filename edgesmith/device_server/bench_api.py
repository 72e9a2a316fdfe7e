"""The device server's benchmark endpoint: ``POST /v1/edgesmith/bench`` (for ``bench --remote``).

It runs the same harness as a local ``edgesmith bench`` (``speed.measure`` over
``generate_greedy``) on the model the server has loaded, holding the engine exclusively so no
chat request shares the CPU, and answers with a results document (schema edgesmith.bench).
The route exists only when the server has an API key, and every call must carry
``Authorization: Bearer <key>``: a benchmark occupies the device for a while.

Its body is read like every other route's (openai_api.parse_json + parse: a JSON object, or
400; ``{}`` asks for the defaults explicitly) and validated as strictly (no ``"8"`` for 8);
errors have the OpenAI shape with ``param`` and ``code``.
"""

from __future__ import annotations

import hmac
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from edgesmith.bench import speed
from edgesmith.bench.env import environment
from edgesmith.bench.results import ArtifactInfo
from edgesmith.bench.runners.base import GenerationResult
from edgesmith.bench.runners.llama_cpp import generate_greedy
from edgesmith.device_server import openai_api
from edgesmith.device_server.openai_api import ApiError
from edgesmith.errors import EdgesmithError

ROUTE = "/v1/edgesmith/bench"
MAX_DEVICE_CHARS = 100


def host_cpus() -> int:
    """CPUs this process may run on (the most threads a benchmark can use)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


class BenchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt_tokens: int = Field(128, ge=1, le=16384)
    gen_tokens: int = Field(128, ge=1, le=8192)
    repeat: int = Field(5, ge=1, le=100)
    warmup: int = Field(1, ge=0, le=10)
    threads: int | None = Field(None, ge=1)
    device: str | None = Field(None, min_length=1, max_length=MAX_DEVICE_CHARS)

    @field_validator("threads")
    @classmethod
    def _threads_on_this_host(cls, threads: int | None) -> int | None:
        if threads is not None and threads > host_cpus():
            raise ValueError(f"{threads} threads asked for; this host has {host_cpus()} CPUs")
        return threads

    @field_validator("device")
    @classmethod
    def _printable(cls, device: str | None) -> str | None:
        if device is not None and not device.isprintable():
            raise ValueError("only printable characters (no control characters or line "
                             "breaks: the label is copied into results and reports)")
        return device


class ServedSession:
    """The Session interface over the server's loaded ``llama_cpp.Llama`` (never reloads)."""

    def __init__(self, llm: Any, load_s: float) -> None:
        self.llm = llm
        self.load_s = load_s
        self.n_vocab = int(llm.n_vocab())

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special,
                                      special=add_special))

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.llm.detokenize(tokens).decode("utf-8", errors="replace"))

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        return generate_greedy(self.llm, prompt_tokens, n)

    def close(self) -> None:
        """The server keeps its model loaded."""


def run_bench(llm: Any, model_path: Path, load_s: float, req: BenchRequest,
              info: ArtifactInfo) -> dict[str, Any]:
    """The harness on the served model, at ``req.threads`` (restored afterwards)."""
    threads = req.threads or int(llm.n_threads)
    spec = speed.SpeedSpec(threads=threads, prompt_tokens=req.prompt_tokens,
                           gen_tokens=req.gen_tokens, repeat=req.repeat, warmup=req.warmup)
    if spec.n_ctx > llm.n_ctx():
        raise EdgesmithError(f"prompt + generated tokens ({spec.n_ctx}) exceed the server's "
                             f"context of {llm.n_ctx()} tokens",
                             "lower --prompt-tokens or --gen-tokens")
    old = (int(llm.n_threads), int(llm.n_threads_batch))
    llm._ctx.set_n_threads(threads, threads)
    try:
        env = environment(threads)
        session = ServedSession(llm, load_s)
        metrics = speed.measure(lambda: session, spec, reload_each_repeat=False)
    finally:
        llm._ctx.set_n_threads(*old)
        llm.reset()
    result = speed.assemble(info=info, spec=spec, metrics=metrics, env=env, runtime="llama_cpp",
                            reload_each_repeat=False, device=req.device, source="device-server",
                            command=["edgesmith", "serve", model_path.name])
    return result.to_json()


def register(app: Flask, engine: Any, config: Any, read_body: Callable[[], Any]) -> None:
    """Add the benchmark route to ``app`` when ``config.api_key`` is set (else: no route).
    ``read_body`` is the app's body reader (size limit, ``openai_api.parse_json``); errors
    are raised as ``ApiError``, which the app answers."""
    api_key: str | None = getattr(config, "api_key", None)
    if not api_key:
        return
    busy = threading.Lock()
    infos: dict[tuple[str, int, int], ArtifactInfo] = {}

    def info_of(path: Path) -> ArtifactInfo:
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in infos:  # hashing a multi-GB model on an SD card takes a while: once
            infos[key] = speed.artifact_info(path)
        return infos[key]

    @app.post(ROUTE)
    def bench() -> Any:
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
            # the app's own check answers first; this one stays, as the route's own guard
            raise ApiError(401, "missing or wrong API key", "authentication_error",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        req = openai_api.parse(BenchRequest, read_body())
        n_ctx = req.prompt_tokens + req.gen_tokens
        if n_ctx > engine.n_ctx:
            raise ApiError(400, f"gen_tokens: prompt_tokens + gen_tokens ({n_ctx}) exceed the "
                                f"server's context of {engine.n_ctx} tokens", param="gen_tokens",
                           code="context_length_exceeded")
        if not busy.acquire(blocking=False):
            raise ApiError(409, "a benchmark is already running; retry when it has finished",
                           "invalid_request_error", code="busy")
        try:
            return jsonify(engine.run_exclusive(
                lambda llm: run_bench(llm, Path(engine.model_path), float(engine.load_s), req,
                                      info_of(Path(engine.model_path)))))
        except EdgesmithError as exc:
            raise ApiError(400, exc.one_line(), code="bench_failed") from None
        finally:
            busy.release()
