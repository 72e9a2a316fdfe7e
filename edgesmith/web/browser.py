"""Drive Debian's chromium with playwright: the model in onnxruntime-web, from Python.

The browser is the system chromium (``EDGESMITH_CHROMIUM``, else ``chromium`` on PATH),
headless, with ``--enable-unsafe-webgpu``: without a GPU that gives SwiftShader's WebGPU
adapter (``--disable-software-rasterizer`` would remove it, so it is never passed).
playwright's own browser download (``playwright install``) is never used.

``Harness`` opens the harness page on a local server (see static_server) and calls its
``window.edgesmith`` functions: load, logits, generate. Any page error or console message
saying "validation error" (a WebGPU shader that did not compile) fails the call.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import DependencyError, EdgesmithError, ModelError, ToolError
from edgesmith.web import npm
from edgesmith.web.static_server import StaticServer, page_server

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_HINT = "apt-get install -y chromium (or make sysdeps), or set EDGESMITH_CHROMIUM"
CHROMIUM_ARGS = ("--enable-unsafe-webgpu",)
BACKENDS = ("webgpu", "wasm")
# what chromium logs when WebGPU rejects a shader or an object (as a console error or warning)
_VALIDATION = re.compile(r"validation error|error while parsing wgsl|"
                         r"invalid due to a previous error", re.IGNORECASE)


class ChromiumMissing(EdgesmithError):
    """No chromium to run the browser pages in."""


def find_chromium() -> str:
    """The chromium executable, or ChromiumMissing naming the fix."""
    env = os.environ.get("EDGESMITH_CHROMIUM")
    if env:
        found = shutil.which(env)
        if not found:
            raise ChromiumMissing(f"EDGESMITH_CHROMIUM={env} is not an executable",
                                  CHROMIUM_HINT)
        return found
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumMissing("chromium is not installed: the browser runtime runs the model in "
                          "a real headless chromium", CHROMIUM_HINT)


def sync_playwright() -> Any:
    try:
        from playwright.sync_api import sync_playwright as start
    except ImportError as exc:
        raise DependencyError(f"the optional dependency 'playwright' is not installed ({exc})",
                              "pip install 'edgesmith[browser]' (it uses the system chromium: "
                              "no `playwright install`)") from exc
    return start()


_SHARED: dict[str, Any] = {}  # one playwright driver per process: the sync API allows one


@contextlib.contextmanager
def playwright_session() -> Iterator[Any]:
    """The process's playwright (started on first use, stopped when the last user leaves)."""
    if not _SHARED:
        _SHARED.update(pw=sync_playwright().start(), users=0)
    _SHARED["users"] += 1
    try:
        yield _SHARED["pw"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            pw = _SHARED.pop("pw")
            _SHARED.clear()
            with contextlib.suppress(Exception):
                pw.stop()


def launch(playwright: Any, webgpu: bool = True) -> Any:
    """A headless system chromium (WebGPU enabled unless ``webgpu`` is False)."""
    exe = find_chromium()
    args = list(CHROMIUM_ARGS) if webgpu else []
    try:
        return playwright.chromium.launch(executable_path=exe, headless=True, args=args)
    except Exception as exc:  # playwright's Error: the browser did not start
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
        raise ChromiumMissing(f"{exe} did not start: {first}", CHROMIUM_HINT) from exc


def external_data(model_file: Path) -> list[str]:
    """Names of the external-data files beside ``model_file`` (model_q4.onnx_data, ...)."""
    return sorted(f.name for f in model_file.parent.iterdir()
                  if f.is_file() and f.name.startswith(model_file.name)
                  and f.name != model_file.name)


def model_info(folder: Path, model_file: Path) -> dict[str, Any]:
    """What the pages need to load the model (served as /edgesmith.json)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{folder / 'config.json'} is missing or not JSON: {exc}",
                         "pass a folder written by `edgesmith export --format onnx`") from exc
    text = config.get("text_config", config)
    layers = int(text.get("num_hidden_layers", 0))
    heads = int(text.get("num_attention_heads", 1))
    head_dim = int(text.get("head_dim") or int(text.get("hidden_size", 0)) // max(heads, 1))
    gen: dict[str, Any] = {}
    if (folder / "generation_config.json").exists():
        gen = json.loads((folder / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    return {
        "name": folder.resolve().name,
        "model_file": model_file.relative_to(folder).as_posix(),
        "external_data": external_data(model_file),
        "size_bytes": model_file.stat().st_size + sum(
            (model_file.parent / n).stat().st_size for n in external_data(model_file)),
        "present_names": [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")],
        "kv_heads": int(text.get("num_key_value_heads", heads)),
        "head_dim": head_dim,
        "kv_type": "float16" if "f16" in model_file.name else "float32",
        "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
        "has_chat_template": _has_chat_template(folder),
    }


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text())
                    .get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


def page_error(text: str) -> str:
    """The useful line of a playwright evaluate error ("Error: ...")."""
    lines = [re.sub(r"^(Page\.evaluate: )?(Error: )?", "", ln.strip())
             for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else text)[:500]


class Harness:
    """The harness page in chromium, with the model folder served; use as a context manager."""

    def __init__(self, folder: Path, model_file: Path, webgpu: bool = True) -> None:
        self.folder, self.model_file, self.webgpu = Path(folder), Path(model_file), webgpu
        self.info = model_info(self.folder, self.model_file)
        self.console: list[str] = []
        self.errors: list[str] = []
        self.server: StaticServer | None = None
        self._pw: Any = None
        self.browser: Any = None
        self.page: Any = None
        self.backend: str | None = None

    def __enter__(self) -> Harness:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        modules = npm.ensure_modules()
        find_chromium()  # the one-line error before playwright starts its driver
        self.server = page_server(self.folder, modules, self.info).start()
        self._pw = playwright_session()
        self.browser = launch(self._pw.__enter__(), webgpu=self.webgpu)
        self.page = self.browser.new_page()
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(self.server.url + "/pages/harness.html")
        self.page.wait_for_function("window.edgesmithReady === true", timeout=60_000)

    def close(self) -> None:
        for step in (lambda: self.browser.close(), lambda: self._pw.__exit__(None, None, None),
                     lambda: self.server.stop()):
            with contextlib.suppress(Exception):  # already gone, or never started
                step()
        self.browser = self._pw = self.server = self.page = None

    def call(self, expr: str, arg: Any = None) -> Any:
        """Evaluate ``expr`` (a function of one argument) in the page; errors in the page,
        and console validation errors seen meanwhile, raise ModelError."""
        from playwright.sync_api import Error as PlaywrightError

        seen, seen_errors = len(self.console), len(self.errors)
        try:
            result = self.page.evaluate(expr, arg)
            # one more round trip: console messages of the call arrive after its result
            self.page.evaluate("() => new Promise((r) => setTimeout(r, 0))")
        except PlaywrightError as exc:
            raise ModelError(f"in chromium ({self.backend_label()}): {page_error(str(exc))}",
                             self._hint(str(exc))) from exc
        bad = [c for c in self.console[seen:] if _VALIDATION.search(c)]
        bad += self.errors[seen_errors:]
        if bad:
            raise ModelError(f"in chromium ({self.backend_label()}): {bad[0][:400]}",
                             self._hint(bad[0]))
        return result

    def backend_label(self) -> str:
        return self.backend or "harness"

    def _hint(self, text: str) -> str:
        if "f16" in text or "zero" in text or _VALIDATION.search(text):
            return "use the q4 model (fp32 activations) on a GPU without shader-f16"
        return "check that the folder was written by `edgesmith export --format onnx`"

    def probe(self) -> dict[str, Any]:
        return dict(self.call("() => edgesmith.probe()"))

    def load(self, backend: str, threads: int = 0, unchecked: bool = False,
             build: str | None = None) -> dict[str, Any]:
        """Load the model with ``backend``. For tests only: ``unchecked`` skips the page's
        shader-f16 check and ``build="jsep"`` picks onnxruntime-web's older JavaScript WebGPU
        backend, to show that the output check catches an f16 model on such an adapter."""
        if backend not in BACKENDS:
            raise EdgesmithError(f"unknown browser backend {backend!r}", "use webgpu or wasm")
        self.backend = backend
        if backend == "webgpu" and not self.probe()["gpu"]["available"]:
            raise ToolError("chromium offers no WebGPU adapter",
                            "use --browser-backend wasm, or a chromium with WebGPU")
        return dict(self.call("([b, t, u, j]) => edgesmith.load(b, t, u, j)",
                              [backend, threads, unchecked, build]))

    def logits(self, ids: list[int]) -> np.ndarray:
        """Logits [len(ids), vocab] (float32) of one forward pass from an empty cache."""
        r = self.call("(ids) => edgesmith.logits(ids)", [int(i) for i in ids])
        flat = np.frombuffer(base64.b64decode(r["b64"]), dtype=np.float32)
        return flat.reshape(-1, int(r["vocab"]))

    def generate(self, ids: list[int], n: int) -> dict[str, Any]:
        """Greedy ``n`` tokens: tokens, prefillMs, ttftMs, decodeMs (timed in the page)."""
        return dict(self.call("([ids, n]) => edgesmith.generate(ids, n)",
                              [[int(i) for i in ids], int(n)]))
