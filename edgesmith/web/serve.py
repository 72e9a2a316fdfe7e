"""`edgesmith serve-web`: a static chat page for an ONNX model folder, served on 127.0.0.1.

One HTML file (pages/chat.html), no build step, nothing from a CDN: the page loads
onnxruntime-web and transformers.js (for the tokenizer and chat template) from the npm
packages edgesmith installs, and the model from the folder. It picks WebGPU when the browser
offers an adapter, else wasm, and shows which.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

from edgesmith.errors import EdgesmithError, ModelError

CHAT_PAGE = "/pages/chat.html"


def chat_server(folder: Path, dtype: str | None = None, port: int = 0,
                host: str = "127.0.0.1", progress: Any = None) -> Any:
    """A (not yet started) page server for ``folder`` whose ``/`` is the chat page."""
    from edgesmith.bench.runners.onnxruntime import model_file, model_folder
    from edgesmith.web import npm
    from edgesmith.web.browser import model_info
    from edgesmith.web.static_server import page_server

    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(f"{folder} is not a folder",
                         "pass the folder written by `edgesmith export --format onnx`")
    path = model_file(folder, dtype)
    root = model_folder(folder)
    if not (root / "tokenizer.json").exists():
        raise ModelError(f"{root} has no tokenizer.json", "re-export the model folder")
    info = model_info(root, path)
    modules = npm.ensure_modules(progress=progress)
    try:
        return page_server(root, modules, info, port=port, host=host, index=CHAT_PAGE)
    except OSError as exc:
        raise EdgesmithError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                             "choose another --port") from exc


def serve_web(
    folder: Path = typer.Argument(..., help="ONNX model folder (edgesmith export --format onnx)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port (0: any free one)."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on. WebGPU and threaded wasm need a secure "
                                  "context: from another machine use an SSH tunnel to "
                                  "localhost rather than a LAN address."),
    dtype: str = typer.Option(None, "--dtype",
                              help="Which onnx/model_{dtype}.onnx to serve (default: q4 first)."),
) -> None:
    """Serve a chat page for the model: type a prompt and watch tokens stream, in the browser.

    Backend chosen by the page: WebGPU if the browser has an adapter, else wasm (shown in the
    header; ?backend=wasm forces it). Stop with Ctrl-C.

    Example: edgesmith serve-web out/web/ --port 8000   (then open http://127.0.0.1:8000/)
    """
    from edgesmith.context import make_progress

    with make_progress() as progress:
        server = chat_server(folder, dtype, port, host, progress)
    sys.stderr.write(f"serving {folder} at {server.url}/ (Ctrl-C to stop)\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.server_close()


def register(app: typer.Typer) -> None:
    """Add the `serve-web` command to ``app``."""
    app.command("serve-web")(serve_web)
