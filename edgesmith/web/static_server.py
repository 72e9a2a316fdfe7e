"""A static file server on 127.0.0.1 for the browser pages, with COOP/COEP headers.

``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy: require-corp``
make the page cross-origin isolated, which is what lets onnxruntime-web's wasm backend use
SharedArrayBuffer and run threaded. Every file a page loads comes from here: the pages
(``/pages/``), the npm packages (``/npm/``), the model folder (``/model/``), and a small
``/edgesmith.json`` describing the model for the page. Nothing is served from outside the
mounted folders (no ``..``, no symlink out of them).
"""

from __future__ import annotations

import json
import mimetypes
import shutil
import threading
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

PAGES_DIR = Path(__file__).parent / "pages"
TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
         ".json": "application/json", ".html": "text/html; charset=utf-8",
         ".onnx": "application/octet-stream", ".map": "application/json"}
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin",
             "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}


def content_type(path: Path) -> str:
    return TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] \
        or "application/octet-stream"


def resolve_under(root: Path, rel: str) -> Path | None:
    """``root/rel`` if it is a file inside ``root`` (symlinks resolved), else None."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if any(p == ".." or "\\" in p or "\0" in p for p in parts):
        return None
    base = root.resolve()
    path = base.joinpath(*parts).resolve() if parts else base
    if path != base and base not in path.parents:
        return None
    if path.is_dir():
        path = path / "index.html"
    return path if path.is_file() else None


class _Handler(BaseHTTPRequestHandler):
    server: StaticServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log is not None:
            self.server.log.append(format % args)

    def _headers(self, status: int, ctype: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        for key, value in ISOLATION.items():
            self.send_header(key, value)
        self.end_headers()

    def _send_bytes(self, status: int, body: bytes, ctype: str, head: bool) -> None:
        self._headers(status, ctype, len(body))
        if not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        path = unquote(urlsplit(self.path).path)
        if path in self.server.documents:
            body = json.dumps(self.server.documents[path]).encode()
            return self._send_bytes(HTTPStatus.OK, body, "application/json", head)
        if path == "/":
            path = self.server.index
        for prefix, root in self.server.mounts.items():
            if path.startswith(prefix):
                found = resolve_under(root, path[len(prefix):])
                if found is not None:
                    return self._send_file(found, head)
                break
        self._send_bytes(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain", head)

    def _send_file(self, path: Path, head: bool) -> None:
        size = path.stat().st_size
        self._headers(HTTPStatus.OK, content_type(path), size)
        if head:
            return
        try:
            with open(path, "rb") as fh:
                shutil.copyfileobj(fh, self.wfile, 1 << 20)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away mid-download

    def do_GET(self) -> None:
        self._serve(head=False)

    def do_HEAD(self) -> None:
        self._serve(head=True)


class StaticServer(ThreadingHTTPServer):
    """Serve ``mounts`` (URL prefix ending in / -> folder) and JSON ``documents`` (URL ->
    data) on 127.0.0.1; ``/`` redirects nowhere: it serves ``index`` (a mounted URL)."""

    daemon_threads = True

    def __init__(self, mounts: Mapping[str, Path], documents: Mapping[str, Any] | None = None,
                 port: int = 0, host: str = "127.0.0.1", index: str = "/pages/index.html",
                 log: list[str] | None = None) -> None:
        self.mounts = {k if k.endswith("/") else k + "/": Path(v) for k, v in mounts.items()}
        self.documents = dict(documents or {})
        self.index = index
        self.log = log
        super().__init__((host, port), _Handler)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> StaticServer:
        self._thread = threading.Thread(target=self.serve_forever, name="edgesmith-static",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self.server_close()

    def __enter__(self) -> StaticServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def page_server(model_dir: Path, modules: Path, info: Mapping[str, Any], port: int = 0,
                host: str = "127.0.0.1", index: str = "/pages/index.html") -> StaticServer:
    """The server every page uses: pages, npm modules, the model folder and its description."""
    return StaticServer({"/pages/": PAGES_DIR, "/npm/": modules, "/model/": model_dir},
                        {"/edgesmith.json": dict(info)}, port=port, host=host, index=index)
