"""The device server's HTTP layer: waitress, with OpenAI-style JSON errors and connection limits.

waitress runs one asyncore-style loop (one thread) that accepts connections and reads requests;
a connection only reaches a worker thread once its whole request has arrived. Its own limits
are coarse: at ``connection_limit`` (100) open connections the loop stops accepting, so every
new connection, ``/health`` included, waits in the listen backlog; and a connection is closed
only after ``channel_timeout`` (120 s) without a byte. 120 connections that each send half a
request line and stop kept a default server out of reach for as long as they stayed open.
Here (``Limits``, from `serve`'s options):

- **Per client address** at most ``per_client`` connections, and ``total`` over all clients.
  A new connection over a cap takes the place of the longest-waiting connection (of that client,
  or of anyone for the global cap) that has no request in service and has waited at least
  ``EVICT_AFTER_S`` for one: a half-sent request, an idle keep-alive connection. Without such a
  connection to close, the new one is answered 503 (``too_many_connections``) and closed at once.
  The loop never stops accepting, so a health check gets in while such connections are open.
- **A deadline per request**: its line, headers and body must have arrived within
  ``request_timeout_s`` of the connection becoming ready for it (accepted, or done with its
  previous response), or the connection is closed (with a 408 when part of a request came).
  A connection with no request and no activity is closed after the same time.
- Every answer of the HTTP layer itself (413, a malformed request's 400, 408, 503) has the
  OpenAI JSON error form, like the app's.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("edgesmith.server")

EVICT_AFTER_S = 1.0  # a connection waiting this long for its request may give way to a new one
_KINDS = {401: "authentication_error", 404: "not_found_error", 408: "invalid_request_error",
          413: "invalid_request_error", 503: "overloaded_error"}


@dataclass(frozen=True)
class Limits:
    """Connection limits of the HTTP layer (see the module docstring)."""

    total: int = 512
    per_client: int = 64
    request_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        if self.total < 1 or self.per_client < 1 or self.request_timeout_s <= 0:
            raise ValueError("connection limits must be positive")


def error_body(status: int, message: str, code: str | None = None) -> bytes:
    kind = _KINDS.get(status, "invalid_request_error" if status < 500 else "server_error")
    return json.dumps({"error": {"message": message, "type": kind, "param": None,
                                 "code": code}}).encode()


def _raw_response(status: str, body: bytes, extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode() + body


class _RateLimitedLog:
    """One warning per reason per minute (an attack must not flood the journal)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def warn(self, reason: str, message: str) -> None:
        now = time.monotonic()
        self._count[reason] = self._count.get(reason, 0) + 1
        if now - self._last.get(reason, -1e9) >= 60:
            n, self._count[reason] = self._count[reason], 0
            self._last[reason] = now
            log.warning("%s (%d in the last minute)", message, n)


def make_server(app: Any, sock: socket.socket, *, threads: int, max_body_bytes: int,
                limits: Limits, on_close: Callable[[str], None] | None = None) -> Any:
    """A waitress server on the bound socket ``sock``, with ``limits``; ``on_close(reason)``
    is told of every connection the limits close ("refused", "evicted", "timed_out")."""
    from waitress.adjustments import Adjustments
    from waitress.channel import HTTPChannel
    from waitress.server import TcpWSGIServer
    from waitress.task import ErrorTask, ThreadedTaskDispatcher

    noted = on_close or (lambda _reason: None)
    warnings = _RateLimitedLog()

    class JSONErrorTask(ErrorTask):
        def execute(self) -> None:
            e = self.request.error
            message = str(e.body).strip() or e.reason
            if e.code == 413:  # the same words as the app's own 413
                message = f"the request body is larger than this server's limit of " \
                          f"{max_body_bytes} bytes"
            body = error_body(e.code, message)
            self.status = f"{e.code} {e.reason}"
            self.response_headers.append(("Content-Type", "application/json"))
            self.set_close_on_finish()
            self.content_length = len(body)
            self.write(body)

    class Channel(HTTPChannel):
        error_task_class = JSONErrorTask

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.waiting_since = self.creation_time  # ready for a request since
            self.serving = False

        def service(self) -> None:  # on a worker thread
            self.serving = True
            try:
                super().service()
            finally:
                self.waiting_since = time.time()
                self.serving = False

        def waiting(self) -> bool:
            """No request in service and no answer left to send: waiting for a request."""
            return not (self.requests or self.serving or self.total_outbufs_len
                        or self.will_close or self.close_when_flushed)

        def answer_and_close(self, data: bytes) -> None:
            """Queue a last answer (the loop thread, no request in service) and close."""
            with self.outbuf_lock:
                self.outbufs[-1].append(data)
                self.total_outbufs_len += len(data)
            self.close_when_flushed = True

    class Server(TcpWSGIServer):
        def handle_accept(self) -> None:
            try:
                accepted = self.accept()
                if accepted is None:
                    return
                conn, addr = accepted
                self.set_socket_options(conn)
            except OSError:  # the client is gone already
                return
            addr = self.fix_addr(addr)
            full = self._make_room(str(addr[0]))
            if full is not None:
                self._refuse(conn, str(addr[0]), full)
                return
            self.channel_class(self, conn, addr, self.adj, map=self._map)

        def _make_room(self, host: str) -> str | None:
            """Close a waiting connection where a cap is reached; the cap that could not
            make room ("per_client" or "total"), or None."""
            now = time.time()
            for cap, name in ((limits.per_client, "per_client"), (limits.total, "total")):
                group = [c for c in self.active_channels.values()
                         if name == "total" or (c.addr and str(c.addr[0]) == host)]
                if len(group) < cap:
                    continue
                idle = [c for c in group if c.waiting() and now - c.waiting_since >= EVICT_AFTER_S]
                if not idle:
                    return name
                oldest = min(idle, key=lambda c: c.waiting_since)
                oldest.handle_close()
                noted("evicted")
            return None

        def _refuse(self, conn: socket.socket, host: str, full: str) -> None:
            if full == "per_client":
                message = (f"too many connections from {host}: at most {limits.per_client} "
                           "per client address are open at once; retry later")
            else:
                message = (f"too many connections: this server holds at most {limits.total} "
                           "at once; retry later")
            warnings.warn(full, f"refused a connection from {host}: {message}")
            noted("refused")
            try:
                conn.setblocking(False)
                with contextlib.suppress(OSError):  # what came already: closing with unread
                    conn.recv(65536)  # data would reset the connection before the answer
                conn.send(_raw_response("503 Service Unavailable",
                                        error_body(503, message, "too_many_connections"),
                                        "Retry-After: 1\r\n"))
            except OSError:
                pass
            finally:
                conn.close()

        def maintenance(self, now: float) -> None:
            cutoff = now - limits.request_timeout_s
            for channel in list(self.active_channels.values()):
                if not (isinstance(channel, Channel) and channel.waiting()
                        and channel.waiting_since < cutoff):
                    continue
                noted("timed_out")
                if channel.request is None:  # nothing came: an idle connection
                    channel.will_close = True
                    continue
                host = channel.addr[0] if channel.addr else "?"
                warnings.warn("timed_out", f"closed a connection from {host}: its request "
                                           f"did not arrive within {limits.request_timeout_s:g} s")
                channel.answer_and_close(_raw_response("408 Request Timeout", error_body(
                    408, f"the request line, headers and body must arrive within "
                         f"{limits.request_timeout_s:g} s", "request_timeout")))
            super().maintenance(now)  # waitress: no byte for channel_timeout (a stalled reader)

    adj = Adjustments(
        sockets=[sock],
        # one thread per request in flight: the running one, the queued ones, and a few for
        # /health, /metrics and requests answered 503 at once, so none waits for a thread
        threads=threads,
        # read ahead on each connection, so waitress notices a client that went away
        # (waitress.client_disconnected) while its request waits in the queue
        channel_request_lookahead=1,
        # a larger body is refused from its Content-Length, before it is read or spooled
        max_request_body_size=max_body_bytes + 1,  # waitress refuses >= its limit
        ident="edgesmith", clear_untrusted_proxy_headers=True,
        # the caps above keep the count below this (the map also holds the listening socket
        # and waitress's trigger); poll() has no FD_SETSIZE limit, unlike select()
        connection_limit=limits.total + 8, asyncore_use_poll=True,
        # maintenance (the deadline) runs every second; a stalled reader is closed as late
        channel_timeout=max(1, int(limits.request_timeout_s + 0.999)), cleanup_interval=1,
    )
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    server = Server(app, {}, True, sock, dispatcher=dispatcher, adj=adj, bind_socket=False,
                    sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname()))
    server.channel_class = Channel
    return server
