"""End to end: `edgesmith serve`'s connection limits against slowloris (issue 10, item 3).

Real waitress in a subprocess on the packaged SmolLM2-135M, over loopback only: idle half-sent
connections (a request line cut in the middle, then nothing) beyond the per-client limit must
not make `/health` unreachable, and the server must close them after its request deadline.
All counts and waits are bounded; a "client on another host" is a 127.0.0.x source address.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

MODEL = "builtin:smollm2-135m"  # the packaged GGUF: no conversion needed
KEY = "limits-key-0123456789"
HALF_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"


@dataclass
class Server:
    proc: subprocess.Popen[str]
    port: int
    log: Path

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.log.read_text()


def health(port: int, source: str = "127.0.0.1", timeout: float = 2.0) -> int:
    """GET /health on a fresh connection from ``source``; raises if no answer in ``timeout``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                      source_address=(source, 0))
    try:
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.fixture()
def start(tmp_path: Path) -> Iterator[object]:
    servers: list[Server] = []

    def _start(*args: str) -> Server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        key = tmp_path / "key"
        key.write_text(KEY + "\n")
        key.chmod(0o600)
        log = tmp_path / f"server-{port}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "edgesmith.cli", "serve", MODEL, "--port", str(port),
                 "--threads", "1", "--ctx", "256", "--api-key-file", str(key), *args],
                stdout=f, stderr=subprocess.STDOUT, text=True,
                env={**os.environ, "COLUMNS": "200"})
        server = Server(proc, port, log)
        servers.append(server)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                if health(port) == 200:
                    return server
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the server did not start: {log.read_text()}")

    yield _start
    for server in servers:
        log = server.stop()
        assert "Traceback" not in log, log


def half_sent(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                     source_address=(source, 0))
        s.sendall(HALF_REQUEST)
        socks.append(s)
    return socks


def state(sock: socket.socket) -> str:
    """"open" (nothing came back), "eof", or the status and error code the server answered."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536)
    except BlockingIOError:
        return "open"
    except ConnectionResetError:
        return "eof"
    finally:
        sock.setblocking(True)
    if not data:
        return "eof"
    head, _, body = data.partition(b"\r\n\r\n")
    status = head.split(b" ", 2)[1].decode()
    assert b"Content-Type: application/json" in head, head
    return f"{status} {json.loads(body)['error']['code']}"


def wait_states(socks: list[socket.socket], done: set[str], timeout: float) -> Counter[str]:
    """Poll until every socket's state is in ``done`` (or the time is up)."""
    states = ["open"] * len(socks)
    deadline = time.monotonic() + timeout
    while True:
        for i, s in enumerate(socks):
            if states[i] == "open":
                states[i] = state(s)
        if all(st in done for st in states) or time.monotonic() > deadline:
            return Counter(states)
        time.sleep(0.1)


def test_slowloris_beyond_the_limit_leaves_health_answering(start: object) -> None:
    """The issue's attack against the default settings: 120 idle half-sent connections."""
    server = start()  # type: ignore[operator]
    socks = half_sent(server.port, 120)
    try:
        time.sleep(1.5)  # they are idle now, the way an attacker leaves them
        # /health answers within 2 s from the same address (a waiting connection gives way)
        # and from another host's address
        assert health(server.port, timeout=2.0) == 200
        assert health(server.port, "127.0.0.2", timeout=2.0) == 200
        # the default per-client limit holds 64 (one gave way to /health); the others were
        # answered 503 at once (or reset, when their request arrived after the close)
        states = Counter(state(s) for s in socks)
        assert 60 <= states["open"] <= 63 and states["503 too_many_connections"] >= 1, states
        assert states["open"] + states["503 too_many_connections"] + states["eof"] == 120
    finally:
        for s in socks:
            s.close()
    time.sleep(0.5)
    assert health(server.port) == 200  # and after they close


def test_request_deadline_and_per_client_cap(start: object) -> None:
    server = start("--max-connections-per-client", "8", "--request-timeout-s", "2")  # type: ignore[operator]
    socks = half_sent(server.port, 20)
    # one client that keeps sending, a byte every 0.3 s, from another address
    trickle = socket.create_connection(("127.0.0.1", server.port), timeout=10,
                                       source_address=("127.0.0.2", 0))
    try:
        refused = wait_states(socks[8:], {"503 too_many_connections", "eof"}, 5)
        assert refused["503 too_many_connections"] >= 1 and refused["open"] == 0, refused
        assert Counter(state(s) for s in socks[:8]) == {"open": 8}
        assert health(server.port, "127.0.0.3", timeout=2.0) == 200
        t0 = time.monotonic()
        trickled = b""
        for byte in HALF_REQUEST[:25]:  # 7.5 s of sending, far past the 2 s deadline
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break
            trickled += bytes([byte])
            time.sleep(0.3)
            if state(trickle) != "open":
                break
        else:
            raise AssertionError("a request trickling in for 7.5 s was not cut off")
        # the deadline counts from the connection, whatever arrives meanwhile
        assert time.monotonic() - t0 < 2 + 2.5 and len(trickled) < 25
        # the 8 idle ones were answered 408 after the deadline and closed
        late = wait_states(socks[:8], {"408 request_timeout", "eof"}, 5)
        assert late["408 request_timeout"] == 8, late
        assert all(state(s) in ("eof", "open") for s in socks[:8])
        assert health(server.port, timeout=2.0) == 200  # the same address gets in again
        # an idle keep-alive connection is closed after the same time, silently
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        conn.request("GET", "/health")
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and not resp.will_close
        t0 = time.monotonic()
        sock = conn.sock
        assert sock is not None
        sock.settimeout(6)
        assert sock.recv(100) == b""  # the server closed it
        assert 1.0 < time.monotonic() - t0 < 2 + 2.5
        conn.close()
        # every close is counted
        metrics = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        metrics.request("GET", "/metrics", headers={"Authorization": f"Bearer {KEY}"})
        text = metrics.getresponse().read().decode()
        counts = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'edgesmith_connections_closed_total\{reason="(\w+)"\} (\S+)', text)}
        assert counts.get("refused", 0) >= 12 and counts.get("timed_out", 0) >= 10, counts
        assert "edgesmith_open_connections" in text
    finally:
        for s in [*socks, trickle]:
            s.close()
