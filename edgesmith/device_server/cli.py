"""`edgesmith serve` (registered into the main CLI by ``register``).

The app is served by waitress: pure Python (installs on a Pi's arm64 without compiling), a
fixed pool of threads in one process, so exactly one llama.cpp context serves every request
(gunicorn's workers are processes: each would load its own copy of the model). See README.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import signal
import socket
import stat
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.console import Console

from edgesmith.device_server.http_server import Limits
from edgesmith.errors import EdgesmithError, ModelError

err = Console(stderr=True)
log = logging.getLogger("edgesmith.server")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class ServeError(EdgesmithError):
    """The server cannot start (port in use, bad key file...)."""


def read_api_key(path: Path) -> str:
    """The key in ``path`` (surrounding whitespace stripped); one-line errors otherwise."""
    try:
        key = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ServeError(f"cannot read the API key file {path}: {reason}",
                         "pass a readable file holding the key on one line") from exc
    if not key:
        raise ServeError(f"the API key file {path} is empty", "write the key into it")
    if any(c.isspace() for c in key) or not key.isprintable():
        raise ServeError(f"the API key in {path} has spaces or control characters",
                         "use one line of printable characters, e.g. `openssl rand -hex 32`")
    try:
        if Path(path).stat().st_mode & stat.S_IROTH:
            err.print(f"warning: the API key file {path} is readable by every user "
                      f"(chmod 600 {path})", markup=False, highlight=False, soft_wrap=True)
    except OSError:
        pass
    return key


def resolve_model(spec: str) -> Path:
    """A GGUF path (or builtin:NAME) checked to be a complete GGUF file."""
    from edgesmith import models

    ref = models.resolve(spec)
    if ref.kind != "gguf":
        raise ModelError(f"{spec} is a Hugging Face directory; the server runs GGUF files",
                         "compress or export it first: edgesmith compress MODEL --target ...")
    return Path(ref.path)


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket now, so a port in use fails before the model loads."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ServeError(f"cannot resolve --host {host}: {exc.strerror}",
                         "use an IP address such as 127.0.0.1 or 0.0.0.0") from exc
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(f"port {port} on {host} is already in use",
                             "stop the other server or pick another --port") from exc
        if exc.errno == errno.EACCES:
            raise ServeError(f"no permission to listen on port {port}",
                             "use a port above 1023 or run as a privileged user") from exc
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror}",
                         "check --host and --port") from exc
    return sock


def _stop_on_sigterm() -> None:
    def handler(_sig: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def serve(model: str, host: str = "127.0.0.1", port: int = 8080,
          api_key_file: Path | None = None, threads: int = 0, ctx: int = 2048,
          queue_size: int = 8, max_tokens: int = 512, max_body_bytes: int = 1 << 20,
          model_id: str | None = None, dev: bool = False, max_connections: int = 512,
          max_connections_per_client: int = 64, request_timeout_s: float = 20.0,
          template_timeout_s: float = 1.0) -> None:
    """Load ``model`` and serve it until SIGINT/SIGTERM (the Python API of `edgesmith serve`)."""
    from edgesmith.device_server.app import ServerConfig, create_app

    if max_connections_per_client > max_connections:
        raise ServeError(f"--max-connections-per-client ({max_connections_per_client}) is "
                         f"above --max-connections ({max_connections})",
                         "give one client at most the server's whole limit")
    limits = Limits(total=max_connections, per_client=max_connections_per_client,
                    request_timeout_s=request_timeout_s)

    path = resolve_model(model)
    api_key = read_api_key(api_key_file) if api_key_file is not None else None
    if host in WILDCARD_HOSTS and not api_key:
        err.print(f"warning: listening on {host or 'all interfaces'} without an API key: anyone "
                  "on the network can use this server (pass --api-key-file)",
                  markup=False, highlight=False, soft_wrap=True)
    config = ServerConfig(model=path, n_ctx=ctx, threads=threads, queue_size=queue_size,
                          max_tokens=max_tokens, max_body_bytes=max_body_bytes,
                          api_key=api_key, model_id=model_id,
                          template_deadline_s=template_timeout_s)
    sock = bind(host, port)
    try:
        err.print(f"loading {path} (ctx {ctx}, threads {config.threads})...",
                  markup=False, highlight=False, soft_wrap=True)
        app = create_app(config)
        shown = f"[{host}]" if ":" in host else host
        err.print(f"serving {config.model_id} on http://{shown}:{port} "
                  f"({'dev server' if dev else 'waitress'}, queue {queue_size}, "
                  f"API key {'required' if api_key else 'off'}); Ctrl-C stops",
                  markup=False, highlight=False, soft_wrap=True)
        _stop_on_sigterm()
        if dev:
            sock.close()
            with contextlib.suppress(KeyboardInterrupt):
                app.run(host=host, port=port, threaded=True, use_reloader=False)
        else:
            _waitress(app, sock, config, limits)
    finally:
        sock.close()
    err.print("stopped", markup=False, soft_wrap=True)


def _waitress(app: Any, sock: socket.socket, config: Any, limits: Limits) -> None:
    from edgesmith.device_server.http_server import make_server

    metrics = app.extensions["edgesmith_engine"].metrics
    server = make_server(app, sock, threads=config.queue_size + 4,
                         max_body_bytes=config.max_body_bytes, limits=limits,
                         on_close=metrics.count_connection_closed)
    metrics.add_gauge("open_connections", "HTTP connections open now.",
                      lambda: len(server.active_channels))
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def register(app: typer.Typer) -> None:
    """Add the `serve` command to ``app``."""

    @app.command("serve")
    def serve_command(
        model: str = typer.Argument(..., help="The .gguf file to serve (or builtin:NAME)."),
        host: str = typer.Option("127.0.0.1", "--host",
                                 help="Address to listen on; 0.0.0.0 for every interface."),
        port: int = typer.Option(8080, "--port", min=1, max=65535, help="TCP port."),
        api_key_file: Path = typer.Option(
            None, "--api-key-file", help="File holding the API key; clients then must send "
            "'Authorization: Bearer KEY'."),
        threads: int = typer.Option(0, "--threads", min=0,
                                    help="llama.cpp threads (default: physical cores)."),
        ctx: int = typer.Option(2048, "--ctx", min=16, help="Context length in tokens."),
        queue_size: int = typer.Option(8, "--queue-size", min=1,
                                       help="Requests that may wait; beyond that: 503."),
        max_tokens: int = typer.Option(512, "--max-tokens", min=1,
                                       help="Largest max_tokens a request may ask for."),
        max_body_kb: int = typer.Option(1024, "--max-body-kb", min=1,
                                        help="Largest request body, in KiB (else 413)."),
        model_id: str = typer.Option(None, "--model-id",
                                     help="Model name in /v1/models (default: file stem)."),
        max_connections: int = typer.Option(
            512, "--max-connections", min=1,
            help="Open connections in all; beyond that a new one replaces one waiting for "
                 "its request, or is answered 503."),
        max_connections_per_client: int = typer.Option(
            64, "--max-connections-per-client", min=1,
            help="Open connections from one client address (the same rule)."),
        request_timeout_s: float = typer.Option(
            20.0, "--request-timeout-s", min=0.5,
            help="Seconds a request's line, headers and body may take to arrive (else 408); "
                 "idle connections close after as long."),
        template_timeout: float = typer.Option(
            1.0, "--template-timeout", min=0.01,
            help="Seconds one chat template render may take (else the request fails with "
                 "the template's error)."),
        dev: bool = typer.Option(False, "--dev",
                                 help="Flask's development server (debugging only; none of "
                                      "the connection limits)."),
    ) -> None:
        """Serve a GGUF model over an OpenAI-compatible HTTP API (waitress, one llama.cpp
        context, a bounded queue).

        Endpoints: /v1/models, /v1/completions, /v1/chat/completions (stream: true for
        server-sent events), /generate, /health, /metrics.

        Example: edgesmith serve out/model.Q4_K_M.gguf --port 8080 --api-key-file key.txt
        """
        serve(model, host=host, port=port, api_key_file=api_key_file, threads=threads,
              ctx=ctx, queue_size=queue_size, max_tokens=max_tokens,
              max_body_bytes=max_body_kb * 1024, model_id=model_id, dev=dev,
              max_connections=max_connections,
              max_connections_per_client=max_connections_per_client,
              request_timeout_s=request_timeout_s, template_timeout_s=template_timeout)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run `edgesmith serve --help`")
