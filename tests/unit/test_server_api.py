"""Request validation, stop strings, metrics text and the install requirements (no model)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from edgesmith.device_server import openai_api as api
from edgesmith.device_server.engine import Finished, StopBuffer
from edgesmith.device_server.metrics import Metrics
from edgesmith.device_server.openai_api import ApiError

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"messages": [{"role": "user", "content": "Hi"}]}


def bad(model: type[Any], body: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        api.parse(model, body)
    assert info.value.status == 400
    return info.value


def test_valid_requests_parse() -> None:
    req = api.parse(api.ChatRequest, {**CHAT, "max_tokens": 5, "temperature": 0,
                                      "top_p": 0.5, "stop": ["\n"], "seed": 7, "stream": True,
                                      "stream_options": {"include_usage": True},
                                      "user": "ignored", "frequency_penalty": 0})
    assert req.requested_max_tokens() == 5 and req.stops() == ("\n",) and req.include_usage()
    assert req.messages[0].as_dict() == {"role": "user", "content": "Hi"}
    parts = api.parse(api.ChatRequest, {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ], "max_completion_tokens": 3})
    assert parts.messages[0].as_dict()["content"] == "ab" and parts.requested_max_tokens() == 3
    comp = api.parse(api.CompletionRequest, {"prompt": "x", "stop": "END"})
    assert comp.stops() == ("END",) and comp.requested_max_tokens() is None
    assert api.parse(api.GenerateRequest, {"prompt": "x"}).stream is False


@pytest.mark.parametrize(("body", "param"), [
    ({**CHAT, "max_tokens": "10"}, "max_tokens"),  # a string is not a number
    ({**CHAT, "max_tokens": True}, "max_tokens"),  # nor is a bool
    ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
    ({**CHAT, "max_tokens": 0}, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, "temperature"),
    ({**CHAT, "temperature": 3}, "temperature"),
    ({**CHAT, "top_p": 0}, "top_p"),
    ({**CHAT, "stream": "yes"}, "stream"),
    ({**CHAT, "seed": -1}, "seed"),
    ({**CHAT, "stop": 5}, "stop"),
    ({**CHAT, "n": 2}, "n"),
    ({**CHAT, "tools": [{"type": "function"}]}, "tools"),
    ({**CHAT, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({}, "messages"),
])
def test_wrong_types_and_values_are_400_naming_the_field(body: dict[str, Any],
                                                         param: str) -> None:
    err = bad(api.ChatRequest, body)
    assert err.param is not None and err.param.startswith(param), err.message
    assert err.message.startswith(param)
    out = err.body()["error"]
    assert out["type"] == "invalid_request_error" and out["message"] == err.message


def test_completion_and_generate_validation() -> None:
    def tokens(prompt: Any) -> list[int]:
        req = api.parse(api.CompletionRequest, {"prompt": prompt})
        return req.prompt_tokens(lambda text: [ord(c) for c in text], n_vocab=1000)

    assert tokens("ab") == tokens(["ab"]) == [97, 98] and tokens([5, 999]) == [5, 999]
    for prompt, message in [(["a", "b"], "one prompt"), ([1000], "outside the vocabulary"),
                            ([-1], "outside"), ([], "empty")]:
        with pytest.raises(ApiError, match=message) as info:
            tokens(prompt)
        assert info.value.status == 400 and info.value.param == "prompt"
    assert bad(api.CompletionRequest, {"prompt": [1, "a"]}).param.startswith("prompt")
    assert bad(api.CompletionRequest, {"prompt": 5}).param.startswith("prompt")
    assert bad(api.CompletionRequest, {"prompt": "x", "echo": True}).param == "echo"
    assert bad(api.GenerateRequest, {"prompt": "x", "stream": True}).param == "stream"
    assert bad(api.GenerateRequest, {"text": "x"}).param == "prompt"


@pytest.mark.parametrize("raw", [b"{", b"not json", b"\xff\xfe", b'{"a": NaN}',
                                 b'{"a": -Infinity}', b""])
def test_malformed_json_is_400(raw: bytes) -> None:
    with pytest.raises(ApiError) as info:
        api.parse_json(raw)
    assert info.value.status == 400 and "not valid JSON" in info.value.message


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_must_be_an_object(body: Any) -> None:
    assert "JSON object" in bad(api.ChatRequest, body).message


def test_too_many_stop_strings() -> None:
    err = bad(api.ChatRequest, {**CHAT, "stop": ["a", "b", "c", "d", "e"]})
    assert err.param == "stop" and err.message == "stop: at most 4 stop sequences"


def test_context_and_max_tokens_limits() -> None:
    req = api.parse(api.ChatRequest, CHAT)
    assert api.sampling(req, 10, 100, 50).max_tokens == 50  # the cap
    assert api.sampling(req, 90, 100, 50).max_tokens == 10  # what the context leaves
    with pytest.raises(ApiError) as info:
        api.sampling(req, 100, 100, 50)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"
    capped = api.parse(api.ChatRequest, {**CHAT, "max_tokens": 51})
    with pytest.raises(ApiError) as info:
        api.sampling(capped, 10, 100, 50)
    assert info.value.code == "max_tokens_exceeded" and "cap of 50" in info.value.message
    over = api.parse(api.ChatRequest, {**CHAT, "max_tokens": 40})
    with pytest.raises(ApiError, match="exceeds this server's context"):
        api.sampling(over, 70, 100, 50)
    p = api.sampling(api.parse(api.ChatRequest, {**CHAT, "max_tokens": 5, "temperature": 0.2,
                                                 "top_p": 0.9, "seed": 3}), 10, 100, 50)
    assert (p.max_tokens, p.temperature, p.top_p, p.seed) == (5, 0.2, 0.9, 3)


def test_response_shapes_match_openai() -> None:
    done = Finished("stop", 7, 3)
    c = api.chat("id1", "m", "hello", done)
    assert c["object"] == "chat.completion" and c["choices"][0]["finish_reason"] == "stop"
    assert c["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert c["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    chunk = api.chat_chunk("id1", "m", {"content": "he"})
    assert chunk["choices"][0]["finish_reason"] is None
    assert api.sse(chunk).startswith(b"data: {") and api.sse(chunk).endswith(b"\n\n")
    assert api.sse("[DONE]") == b"data: [DONE]\n\n"
    assert api.usage_chunk("id1", "m", "chat.completion.chunk", done)["choices"] == []
    assert api.completion("id2", "m", "x", Finished("length", 1, 1))["choices"][0][
        "finish_reason"] == "length"


@pytest.mark.parametrize(("pieces", "stops", "out", "hit"), [
    (["Hel", "lo wor", "ld"], (), "Hello world", False),
    (["Hello", " EN", "D more"], ("END",), "Hello ", True),
    (["ab", "c"], ("abd",), "abc", False),  # a held-back prefix that did not complete
    (["x\n", "\ny"], ("\n\n",), "x", True),
    (["aE", "NDb"], ("END", "Db"), "a", True),  # the earliest stop wins
])
def test_stop_buffer(pieces: list[str], stops: tuple[str, ...], out: str, hit: bool) -> None:
    buf, text, was_hit = StopBuffer(stops), "", False
    for p in pieces:
        t, was_hit = buf.push(p)
        text += t
        if was_hit:
            break
    if not was_hit:
        text += buf.flush()
    assert (text, was_hit) == (out, hit)


def _parse_metrics(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            m = re.fullmatch(r"([a-z_]+(?:\{[^}]*\})?) (\S+)", line)
            assert m, line
            values[m.group(1)] = float(m.group(2))
    return values


def test_metrics_text_format() -> None:
    m = Metrics()
    m.count_request("/v1/chat/completions", "POST", 200)
    m.count_request("/v1/chat/completions", "POST", 200)
    m.count_request("/v1/chat/completions", "POST", 503)
    m.record_generation(10, 5, 0.02, 40.0, cancelled=False)
    m.record_generation(3, 1, 0.2, None, cancelled=True)
    m.add_gauge("queue_depth", "Waiting.", lambda: 2)
    text = m.render()
    v = _parse_metrics(text)
    key = 'edgesmith_requests_total{route="/v1/chat/completions",method="POST",status="%d"}'
    assert v[key % 200] == 2 and v[key % 503] == 1
    assert v["edgesmith_prompt_tokens_total"] == 13
    assert v["edgesmith_completion_tokens_total"] == 6
    assert v["edgesmith_generations_cancelled_total"] == 1
    assert v['edgesmith_time_to_first_token_seconds_bucket{le="0.025"}'] == 1
    assert v['edgesmith_time_to_first_token_seconds_bucket{le="+Inf"}'] == 2
    assert v["edgesmith_time_to_first_token_seconds_count"] == 2
    assert v["edgesmith_decode_tokens_per_second_count"] == 1
    assert v["edgesmith_queue_depth"] == 2
    assert "# TYPE edgesmith_queue_depth gauge" in text and text.endswith("\n")


def test_install_requirements_match_pyproject() -> None:
    """install-pi.sh installs requirements-server.txt; its pins must be the project's."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + project["optional-dependencies"]["server"]
    pins = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0].lower(): d.replace(" ", "")
            for d in declared}
    req = ROOT / "edgesmith/device_server/install/requirements-server.txt"
    lines = [ln.strip() for ln in req.read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines, req
    for line in lines:
        name = re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower()
        assert name in pins, f"{name} is not a dependency in pyproject.toml"
        assert pins[name] == line, (pins[name], line)
    for needed in ("llama-cpp-python", "flask", "waitress", "pydantic", "typer"):
        assert needed in {re.split(r"[<>=!~ ]", ln, maxsplit=1)[0] for ln in lines}
    assert not {"torch", "transformers"} & {ln.split("=")[0].split(">")[0] for ln in lines}


def test_error_body_is_json_serialisable() -> None:
    err = ApiError(503, "busy", "overloaded_error", code="queue_full",
                   headers={"Retry-After": "3"})
    assert json.loads(json.dumps(err.body())) == {"error": {
        "message": "busy", "type": "overloaded_error", "param": None, "code": "queue_full"}}
