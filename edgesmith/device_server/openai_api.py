"""OpenAI-compatible request validation and response shapes (no Flask here).

Every route's body goes through the same two steps: ``parse_json`` (UTF-8, JSON nested at most
``MAX_JSON_DEPTH`` deep, checked on the bytes before the parser recurses into them) and
``parse`` (a JSON object, no lone UTF-16 surrogate in any string, then the route's pydantic
model). Requests are parsed strictly (a string where a number belongs is a 400, not a guess);
fields of the OpenAI API that do not change the result here (``user``, ``frequency_penalty``...)
are ignored, and ones we cannot honour (``n`` > 1, ``logprobs``, ``tools``) are refused.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgesmith.device_server.engine import Finished, SamplingParams

M = TypeVar("M", bound=BaseModel)

MAX_JSON_DEPTH = 64  # an OpenAI chat body is about 5 deep; a parser's recursion is not free
MAX_STOPS = 4  # as OpenAI documents
MAX_STOP_CHARS = 256  # each stop string; the stop scan keeps MAX_STOP_CHARS - 1 chars back


class ApiError(Exception):
    """An error answered as ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    logprobs: Literal[False, None] = None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        longest = max((len(s) for s in stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence is {longest} characters; at most "
                             f"{MAX_STOP_CHARS} are allowed")
        return stop

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Sampling):
    # OpenAI's forms: a string, a list of one string, or token ids (one prompt per request)
    prompt: str | list[int] | list[str] = Field(max_length=1_000_000)
    echo: Literal[False] = False

    def prompt_tokens(self, tokenize: Any, n_vocab: int) -> list[int]:
        p = self.prompt
        if isinstance(p, str):
            return list(tokenize(p))
        if not p:
            raise ApiError(400, "prompt: must not be empty", param="prompt")
        if isinstance(p[0], str):
            if len(p) != 1:
                raise ApiError(400, "prompt: one prompt per request (n > 1 and batches are not "
                                    "supported)", param="prompt")
            return list(tokenize(p[0]))
        bad = next((t for t in p if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise ApiError(400, f"prompt: token id {bad} is outside the vocabulary "
                                f"(0-{n_vocab - 1})", param="prompt")
        return list(p)  # type: ignore[arg-type]


class GenerateRequest(_Sampling):
    prompt: str = Field(max_length=1_000_000)
    stream: Literal[False] = False


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return {"role": self.role, "content": content}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Any] | None = Field(None, max_length=0)

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# A JSON string (its escapes included; an unterminated one runs to the end) and a map that
# turns the brackets left outside strings into steps: opening +1, closing -1 (byte - 1).
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")


def json_depth(raw: bytes) -> int:
    """How deep ``raw``'s arrays and objects nest, read from the bytes (strings skipped), in
    linear time and without recursion: the parser is only handed bodies this says are flat."""
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if not brackets:
        return 0
    steps = np.frombuffer(brackets.translate(_STEPS), dtype=np.uint8).astype(np.int64) - 1
    return int(np.cumsum(steps).max())


def parse_json(raw: bytes) -> Any:
    """The request body as JSON: UTF-8, nested at most ``MAX_JSON_DEPTH`` deep."""
    try:
        text = raw.decode("utf-8-sig")  # a UTF-8 byte order mark is tolerated, as before
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: it is not UTF-8 ({exc})"
                       ) from exc
    depth = json_depth(raw)  # UTF-8: quotes, backslashes and brackets are single bytes
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests arrays/objects {depth} deep; at most "
                            f"{MAX_JSON_DEPTH} levels are allowed", code="json_too_deep")
    try:
        return json.loads(text, parse_constant=_no_constant)  # NaN and Infinity are not JSON
    except RecursionError:  # not reached after the depth check; kept as the last guard
        raise ApiError(400, "the request body nests arrays/objects too deeply",
                       code="json_too_deep") from None
    except ValueError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from exc


def _not_unicode(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (JSON's "\\ud800" escape decodes to
    one): such a string cannot be encoded, tokenized or written out as UTF-8."""
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def invalid_text_at(value: Any) -> str | None:
    """The path (``messages.0.content``) of the first string or key in a parsed JSON value
    that is not valid Unicode, or None. Iterative: the depth is already bounded, this keeps
    it so."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            if _not_unicode(item):
                return ".".join(map(str, path)) or "body"
        elif isinstance(item, dict):
            for key in item:
                if _not_unicode(key):
                    return ".".join(map(str, path)) or "body"
            stack.extend(((*path, k), v) for k, v in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*path, i), v) for i, v in reversed(list(enumerate(item))))
    return None


def parse(model: type[M], body: Any) -> M:
    """Validate a parsed body against a route's model; every error is a 400 naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    where = invalid_text_at(body)
    if where is not None:
        raise ApiError(400, f"{where}: the text holds a lone UTF-16 surrogate (a \\ud800-"
                            "\\udfff escape that is not half of a pair), which is not valid "
                            "Unicode", param=where, code="invalid_unicode")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        msg = first["msg"].removeprefix("Value error, ")
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ApiError(400, f"{where}: {msg}{more}", param=where) from exc


def sampling(req: _Sampling, n_prompt: int, n_ctx: int, cap: int) -> SamplingParams:
    """Check the prompt and max_tokens against the context and the cap."""
    if n_prompt >= n_ctx:
        raise ApiError(400, f"the prompt is {n_prompt} tokens; this server's context is "
                            f"{n_ctx} tokens", param="messages", code="context_length_exceeded")
    requested = req.requested_max_tokens()
    if requested is not None and requested > cap:
        raise ApiError(400, f"max_tokens {requested} is above this server's cap of {cap}",
                       param="max_tokens", code="max_tokens_exceeded")
    if requested is not None and n_prompt + requested > n_ctx:
        raise ApiError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({requested}) "
                            f"exceeds this server's context of {n_ctx} tokens",
                       param="max_tokens", code="context_length_exceeded")
    max_tokens = requested if requested is not None else min(cap, n_ctx - n_prompt)
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                          stop=req.stops(), seed=req.seed)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(done: Finished) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _reason(done: Finished | None) -> str | None:
    # A cancelled generation has no client left to read it; "length" is the closest value.
    return None if done is None else ("length" if done.finish_reason == "cancelled"
                                      else done.finish_reason)


def completion(rid: str, model: str, text: str, done: Finished) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": _reason(done)}],
            "usage": usage(done)}


def chat(rid: str, model: str, text: str, done: Finished) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": _reason(done)}],
            "usage": usage(done)}


def completion_chunk(rid: str, model: str, text: str,
                     done: Finished | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": _reason(done)}]}


def chat_chunk(rid: str, model: str, delta: dict[str, str],
               done: Finished | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": _reason(done)}]}


def usage_chunk(rid: str, model: str, obj: str, done: Finished) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [], "usage": usage(done)}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()
