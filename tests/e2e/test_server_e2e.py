"""End to end: `edgesmith serve` (waitress, in a subprocess) on the real SmolLM2-135M, through
real HTTP on loopback: the official `openai` client, every error path, overload, disconnects."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

KEY = "test-key-0123456789abcdef"
# one llama.cpp thread: with two on two cores that other work shares, its spinning threads
# wait on each other and decode slows down tenfold
THREADS = 1
CTX, CAP, QUEUE, BODY_KB = 512, 400, 4, 16
CHAT = "/v1/chat/completions"


def smollm2_gguf(qtype: str = "Q4_K_M") -> Path:
    """SmolLM2-135M as a GGUF made by edgesmith's own converter and quantizer, cached.

    The F16 GGUF is cached under the name `compress` gives it, so the two share it; the
    quantized file is a plain (no importance matrix) ``qtype`` next to it.
    """
    from edgesmith.context import make_progress
    from edgesmith.pipeline import plain_gguf

    with make_progress(quiet=True) as progress:
        return plain_gguf("builtin:smollm2-135m", qtype, progress)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        return rc, self.log.read_text()


def start_server(model: Path, tmp: Path, *args: str) -> Server:
    port = free_port()
    log = tmp / f"server-{port}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "edgesmith.cli", "serve", str(model), "--port", str(port),
             "--threads", str(THREADS), "--ctx", str(CTX), *args],
            stdout=f, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "200"})
    server = Server(proc, port, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if http_request(server, "GET", "/health")[0] == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise AssertionError(f"the server did not start: {log.read_text()}")


def http_request(server: Server, method: str, path: str, body: Any = None, raw: bytes | None = None,
                 key: str | None = KEY, headers: dict[str, str] | None = None,
                 timeout: float = 120) -> tuple[int, dict[str, str], Any]:
    """One request on a fresh connection: (status, headers, JSON body or text)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            hdrs["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        text = resp.read().decode()
        out = json.loads(text) if resp.getheader("Content-Type", "").startswith(
            "application/json") else text
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, out
    finally:
        conn.close()


def metrics(server: Server) -> dict[str, float]:
    status, _, text = http_request(server, "GET", "/metrics")
    assert status == 200
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def requests_total(m: dict[str, float], route: str, status: int, method: str = "POST") -> float:
    return m.get(f'edgesmith_requests_total{{route="{route}",method="{method}",'
                 f'status="{status}"}}', 0.0)


@pytest.fixture(scope="module")
def model() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="module")
def server(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("server")
    key_file = tmp / "key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    srv = start_server(model, tmp, "--api-key-file", str(key_file), "--max-tokens", str(CAP),
                       "--queue-size", str(QUEUE), "--max-body-kb", str(BODY_KB),
                       "--model-id", "smollm2")
    yield srv
    rc, log = srv.stop()
    assert rc == 0, log
    assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def client(server: Server) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


# --- the official openai client -------------------------------------------------------------

def test_models_and_health(server: Server, client: Any) -> None:
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    status, _, health = http_request(server, "GET", "/health", key=None)  # no key needed
    assert status == 200 and health["model_loaded"] is True and health["status"] == "ok"
    assert health["queue_depth"] == 0 and health["queue_size"] == QUEUE and health["n_ctx"] == CTX


def test_chat_completion(client: Any, model: Path) -> None:
    from llama_cpp import Llama

    from edgesmith.bench.runners.llama_cpp import CONTEXT_DEFAULTS

    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24,
                                       temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    # the same answer as llama-cpp-python's own chat formatting of the GGUF's template, in
    # process: the sandboxed template and the tokenization match (greedy, same threads and
    # context settings)
    llm = Llama(model_path=str(model), n_ctx=CTX, n_threads=THREADS, verbose=False,
                **CONTEXT_DEFAULTS)
    try:
        own = llm.create_chat_completion(msgs, temperature=0, max_tokens=24)
    finally:
        llm.close()
    assert text == own["choices"][0]["message"]["content"] and len(text) > 5
    assert r.usage.prompt_tokens == own["usage"]["prompt_tokens"]
    # a stop string cuts the text before it
    word = text.split()[len(text.split()) // 2]
    r2 = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=24,
                                        temperature=0, stop=[word])
    assert r2.choices[0].message.content == text[: text.index(word)]
    assert r2.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(client: Any) -> None:
    def once(seed: int) -> str:
        return client.completions.create(model="smollm2", prompt="Once upon a time",
                                         max_tokens=16, temperature=1.0, top_p=0.95,
                                         seed=seed).choices[0].text

    a, b, c = once(11), once(11), once(12)
    assert a == b and len(a) > 0
    assert a != c


def test_completion(client: Any) -> None:
    r = client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=12,
                                  temperature=0)
    assert r.object == "text_completion" and r.choices[0].text.startswith(" 6, 7")
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    r = client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,", max_tokens=12,
                                  temperature=0, stop=[", 8"])
    assert r.choices[0].text == " 6, 7" and r.choices[0].finish_reason == "stop"


def test_completion_prompt_forms(client: Any, server: Server, model: Path) -> None:
    """OpenAI's prompt forms: a list of one string and token ids give the string's answer."""
    from llama_cpp import Llama

    def text(prompt: Any) -> str:
        return client.completions.create(model="smollm2", prompt=prompt, max_tokens=6,
                                         temperature=0).choices[0].text

    plain = text("1, 2, 3, 4, 5,")
    assert text(["1, 2, 3, 4, 5,"]) == plain
    vocab = Llama(model_path=str(model), vocab_only=True, verbose=False)
    ids = vocab.tokenize(b"1, 2, 3, 4, 5,", add_bos=True, special=True)
    assert text(ids) == plain
    for prompt, message in [(["a", "b"], "one prompt per request"),
                            ([1, 10**9], "outside the vocabulary"), ([], "must not be empty")]:
        status, _, out = http_request(server, "POST", "/v1/completions",
                                      {"prompt": prompt, "max_tokens": 2})
        assert status == 400 and message in out["error"]["message"], out


def test_chat_streaming_arrives_token_by_token(client: Any) -> None:
    msgs = [{"role": "user", "content": "Write a short poem about the sea."}]
    whole = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32,
                                           temperature=0)
    stream = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=32,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    deltas, arrivals, usage, finish = [], [], None, None
    for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                deltas.append(ch.delta.content)
                arrivals.append(time.perf_counter())
            finish = ch.finish_reason or finish
    assert len(deltas) > 5  # one event per token, not one blob
    assert arrivals[-1] - arrivals[0] > 0.005  # spread over the generation, not at once
    assert "".join(deltas) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens and finish == whole.choices[
        0].finish_reason


def test_completion_streaming(client: Any) -> None:
    chunks = list(client.completions.create(model="smollm2", prompt="1, 2, 3, 4, 5,",
                                            max_tokens=10, temperature=0, stream=True))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) > 3 and "".join(texts).startswith(" 6, 7")
    assert chunks[-1].choices[0].finish_reason == "length"
    # no usage unless asked for
    assert all(getattr(c, "usage", None) is None for c in chunks)


def test_generate_endpoint(server: Server) -> None:
    status, _, out = http_request(server, "POST", "/generate",
                                  {"prompt": "1, 2, 3, 4, 5,", "max_tokens": 6, "temperature": 0})
    assert status == 200 and out["text"].startswith(" 6, 7") and out["usage"][
        "completion_tokens"] == 6 and out["finish_reason"] == "length"


def test_raw_sse_format(server: Server) -> None:
    status, headers, text = http_request(server, "POST", CHAT, {
        "messages": [{"role": "user", "content": "Hi"}], "stream": True, "max_tokens": 4,
        "temperature": 0})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}


# --- every bad request gets its status and an OpenAI-style error body ------------------------

LONG_PROMPT = "word " * (CTX + 50)
MSG = [{"role": "user", "content": "Hi"}]
BAD = [
    # (name, method, path, json body or raw bytes, key, status, error type, message pattern)
    ("too large", "POST", CHAT, b'{"messages": [], "x": "' + b"a" * (BODY_KB * 1024) + b'"}',
     KEY, 413, "invalid_request_error", "larger than this server's limit"),
    ("malformed JSON", "POST", CHAT, b'{"messages": [', KEY, 400, "invalid_request_error",
     "not valid JSON"),
    ("not an object", "POST", CHAT, b"[1, 2]", KEY, 400, "invalid_request_error", "JSON object"),
    ("deeply nested", "POST", CHAT, b'{"messages": ' + b"[" * 10000, KEY, 400,
     "invalid_request_error", "nests arrays/objects 10001 deep"),
    ("lone surrogate", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     KEY, 400, "invalid_request_error", "^messages.0.content: .*surrogate"),
    ("stop too long", "POST", "/v1/completions", {"prompt": "x", "stop": ["y" * 257]}, KEY, 400,
     "invalid_request_error", "^stop: .*at most 256"),
    ("wrong type", "POST", CHAT, {"messages": MSG, "max_tokens": "5"}, KEY, 400,
     "invalid_request_error", "^max_tokens"),
    ("wrong type nested", "POST", CHAT, {"messages": [{"role": "user", "content": 3}]}, KEY,
     400, "invalid_request_error", "^messages.0.content"),
    ("missing field", "POST", "/v1/completions", {"max_tokens": 3}, KEY, 400,
     "invalid_request_error", "^prompt"),
    ("prompt too long", "POST", "/v1/completions", {"prompt": LONG_PROMPT}, KEY, 400,
     "invalid_request_error", f"context is {CTX} tokens"),
    ("chat too long", "POST", CHAT, {"messages": [{"role": "user", "content": LONG_PROMPT}]},
     KEY, 400, "invalid_request_error", f"context is {CTX} tokens"),
    ("max_tokens above cap", "POST", CHAT, {"messages": MSG, "max_tokens": CAP + 1}, KEY, 400,
     "invalid_request_error", f"cap of {CAP}"),
    ("unknown route", "GET", "/v1/nothing", None, KEY, 404, "not_found_error", "unknown route"),
    ("unknown route no key", "POST", "/admin", None, None, 404, "not_found_error",
     "unknown route"),
    ("wrong method", "GET", CHAT, None, KEY, 405, "invalid_request_error", "not allowed"),
    ("missing key", "POST", CHAT, {"messages": MSG}, None, 401, "authentication_error",
     "API key"),
    ("wrong key", "POST", CHAT, {"messages": MSG}, "nope", 401, "authentication_error",
     "API key"),
    ("metrics need the key", "GET", "/metrics", None, None, 401, "authentication_error",
     "API key"),
]


@pytest.mark.parametrize(("method", "path", "body", "key", "status", "kind", "pattern"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests(server: Server, method: str, path: str, body: Any, key: str | None,
                      status: int, kind: str, pattern: str) -> None:
    raw = body if isinstance(body, bytes) else None
    got, headers, out = http_request(server, method, path, None if raw else body, raw, key=key)
    assert got == status, out
    assert headers["content-type"].startswith("application/json")
    err = out["error"]
    assert err["type"] == kind and re.search(pattern, err["message"]), err
    assert set(err) == {"message", "type", "param", "code"}
    if status == 401:
        assert headers["www-authenticate"] == "Bearer"
    if status == 405:
        assert "POST" in headers["allow"]


def raw_exchange(server: Server, data: bytes) -> tuple[int, dict[str, str], Any]:
    """Send raw bytes on a socket (the server may answer before the body is sent)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        text = resp.read().decode()
    hdrs = {k.lower(): v for k, v in resp.getheaders()}
    return resp.status, hdrs, json.loads(text) if "json" in hdrs.get("content-type", "") else text


def test_requests_refused_by_the_http_layer_get_json_errors(server: Server) -> None:
    """Bodies far over the limit are refused by waitress before they are read; those
    answers, and its answer to a malformed request, have the same OpenAI error form."""
    head = (f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\n").encode()
    huge = head + b"Content-Length: 1000000000\r\n\r\n{"
    chunk = b"a" * 4096
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + \
        (b"1000\r\n" + chunk + b"\r\n") * (BODY_KB // 4 + 2) + b"0\r\n\r\n"
    for data in (huge, chunked):
        status, hdrs, out = raw_exchange(server, data)
        assert status == 413 and hdrs["content-type"] == "application/json", out
        assert out["error"]["type"] == "invalid_request_error"
        assert f"limit of {BODY_KB * 1024} bytes" in out["error"]["message"]
    status, hdrs, out = raw_exchange(server, b"POST /v1/x HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    assert status == 400 and out["error"]["type"] == "invalid_request_error", out
    # a body of exactly the limit is accepted
    body = {"messages": MSG, "max_tokens": 1, "pad": ""}
    body["pad"] = "a" * (BODY_KB * 1024 - len(json.dumps(body).encode()))
    raw = json.dumps(body).encode()
    assert len(raw) == BODY_KB * 1024
    assert http_request(server, "POST", CHAT, raw=raw)[0] == 200


def test_openai_client_sees_errors(server: Server, client: Any) -> None:
    import openai

    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="cap of"):
        client.chat.completions.create(model="smollm2", messages=MSG, max_tokens=CAP + 1)


# --- overload, disconnects ------------------------------------------------------------------

def test_32_clients_3_requests_each(server: Server) -> None:
    before = metrics(server)
    results: list[tuple[int, dict[str, str], Any] | BaseException] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(3):
            try:
                r: Any = http_request(server, "POST", CHAT, {
                    "messages": [{"role": "user", "content": f"Say a number ({i}.{j})"}],
                    "max_tokens": 8, "temperature": 0.7, "seed": i}, timeout=60)
            except BaseException as exc:  # a timeout here is a hung request
                r = exc
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "requests hung"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [] and len(results) == 96
    statuses = Counter(r[0] for r in results if not isinstance(r, BaseException))
    assert set(statuses) <= {200, 503} and statuses[200] > 0 and statuses[503] > 0, statuses
    for status, headers, body in (r for r in results if not isinstance(r, BaseException)):
        if status == 503:
            assert int(headers["retry-after"]) >= 1
            assert body["error"]["type"] == "overloaded_error"
            assert body["error"]["code"] == "queue_full"
        else:
            assert body["choices"][0]["message"]["content"] is not None
    # the server stays up and its counters match what the clients saw
    status, _, health = http_request(server, "GET", "/health")
    assert status == 200 and health["queue_depth"] == 0
    after = metrics(server)
    for code in (200, 503):
        assert requests_total(after, CHAT, code) - requests_total(before, CHAT, code) \
            == statuses[code], code
    assert after["edgesmith_queue_capacity"] == QUEUE
    print(f"32x3 in {time.monotonic() - t0:.1f} s: {dict(statuses)}")


def test_client_disconnect_mid_stream_stops_generation(server: Server) -> None:
    before = metrics(server)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    # counting goes on without an end of text: the model would run to max_tokens
    conn.request("POST", "/v1/completions", body=json.dumps({
        "prompt": "1, 2, 3, 4, 5,", "max_tokens": CAP, "temperature": 0, "stream": True}),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    events = 0
    while events < 3:
        line = resp.readline()
        assert line, "the stream ended early"
        events += line.startswith(b"data: ")
    resp.close()
    conn.close()  # the client goes away after 3 tokens
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        after = metrics(server)
        if after["edgesmith_generations_cancelled_total"] > before[
                "edgesmith_generations_cancelled_total"] and not after["edgesmith_busy"]:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the generation was not cancelled")
    generated = after["edgesmith_completion_tokens_total"] - before[
        "edgesmith_completion_tokens_total"]
    assert 3 <= generated < CAP / 2, generated  # stopped soon after the client left
    # and the server goes on serving
    status, _, out = http_request(server, "POST", "/generate", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200 and out["usage"]["completion_tokens"] <= 2


def test_client_gone_while_queued_is_skipped(server: Server) -> None:
    """A non-streaming request whose client left while it waited is never generated."""
    before = metrics(server)
    hdrs = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    long = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    long.request("POST", "/v1/completions", body=json.dumps({
        "prompt": "1, 2, 3, 4, 5,", "max_tokens": CAP, "temperature": 0, "stream": True}),
        headers=hdrs)
    resp = long.getresponse()
    while not resp.readline().startswith(b"data: "):  # the worker is busy with it
        pass
    queued = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    queued.request("POST", "/generate", body=json.dumps({"prompt": "Hi", "max_tokens": 50}),
                   headers=hdrs)
    deadline = time.monotonic() + 20
    while http_request(server, "GET", "/health")[2]["queue_depth"] != 1:
        assert time.monotonic() < deadline, "the request was not queued"
        time.sleep(0.05)
    queued.close()  # gone while waiting
    time.sleep(0.3)
    resp.close()
    long.close()  # and the running one goes too
    deadline = time.monotonic() + 30
    while True:
        after = metrics(server)
        done = after["edgesmith_generations_cancelled_total"] - before[
            "edgesmith_generations_cancelled_total"]
        if done >= 2 and not after["edgesmith_busy"] and not after["edgesmith_queue_depth"]:
            break
        assert time.monotonic() < deadline, (done, after["edgesmith_busy"])
        time.sleep(0.1)
    assert done == 2
    # the queued job generated nothing: only the streaming one's tokens were counted
    generated = after["edgesmith_completion_tokens_total"] - before[
        "edgesmith_completion_tokens_total"]
    assert generated < CAP / 2


def test_metrics_exposition(server: Server) -> None:
    m = metrics(server)
    for name in ("edgesmith_prompt_tokens_total", "edgesmith_completion_tokens_total",
                 "edgesmith_time_to_first_token_seconds_count",
                 "edgesmith_decode_tokens_per_second_count", "edgesmith_queue_depth",
                 "edgesmith_model_loaded"):
        assert name in m, name
    assert m["edgesmith_completion_tokens_total"] > 0 and m["edgesmith_model_loaded"] == 1
    assert m['edgesmith_time_to_first_token_seconds_bucket{le="+Inf"}'] == m[
        "edgesmith_time_to_first_token_seconds_count"] > 0
    assert requests_total(m, "unmatched", 404, "GET") >= 1


# --- the command line -----------------------------------------------------------------------

def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


def test_serve_help_has_an_example() -> None:
    p = cli("serve", "--help")
    assert p.returncode == 0 and "Example: edgesmith serve" in p.stdout
    for opt in ("--host", "--port", "--api-key-file", "--threads", "--ctx", "--queue-size",
                "--max-tokens", "--dev", "--max-connections", "--max-connections-per-client",
                "--request-timeout-s"):
        assert opt in p.stdout, opt


def test_serve_bad_inputs_fail_in_one_line(tmp_path: Path, model: Path, server: Server) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    cases = [
        (("serve", str(tmp_path / "missing.gguf")), "does not exist"),
        (("serve", str(notes)), "not a GGUF"),
        (("serve", str(model), "--api-key-file", str(tmp_path / "nokey")),
         "cannot read the API key"),
        (("serve", str(model), "--api-key-file", str(empty)), "is empty"),
        (("serve", str(model), "--port", str(server.port)), "already in use"),
    ]
    for args, message in cases:
        p = cli(*args)
        assert p.returncode == 2, (args, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_no_key_on_all_interfaces_warns_and_sigterm_stops(model: Path, tmp_path: Path) -> None:
    srv = start_server(model, tmp_path, "--host", "0.0.0.0", "--queue-size", "2")
    try:
        status, _, out = http_request(srv, "POST", "/generate", {"prompt": "Hi", "max_tokens": 2},
                                      key=None)
        assert status == 200, out
        status, _, _ = http_request(srv, "GET", "/metrics", key=None)  # no key, no auth
        assert status == 200
        # the remote benchmark endpoint does not exist on a server without a key
        status, _, out = http_request(srv, "POST", "/v1/edgesmith/bench", {"repeat": 1},
                                      key=None)
        assert status == 404 and out["error"]["type"] == "not_found_error", out
    finally:
        rc, log = srv.stop()
    assert "without an API key" in log and rc == 0 and "stopped" in log, log
