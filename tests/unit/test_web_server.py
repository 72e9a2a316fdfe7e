"""The browser target's plumbing without a browser: the page server and the npm install."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from edgesmith.web import npm
from edgesmith.web.static_server import ISOLATION, StaticServer, resolve_under


@pytest.fixture()
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    (model / "onnx").mkdir(parents=True)
    (model / "config.json").write_text('{"a": 1}')
    (model / "onnx" / "model_q4.onnx").write_bytes(b"\x08\x09onnx")
    mods = tmp_path / "mods"
    (mods / "onnxruntime-web" / "dist").mkdir(parents=True)
    (mods / "onnxruntime-web" / "dist" / "ort.wasm").write_bytes(b"\0asm")
    (mods / "onnxruntime-web" / "dist" / "ort.mjs").write_text("export {}")
    (tmp_path / "secret.txt").write_text("outside")
    os.symlink(tmp_path / "secret.txt", model / "link.txt")
    with StaticServer({"/model/": model, "/npm/": mods}, {"/edgesmith.json": {"x": 2}},
                      index="/model/config.json") as srv:
        yield srv


def _get(url: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_files_are_served_cross_origin_isolated_with_their_types(served: StaticServer) -> None:
    assert served.url.startswith("http://127.0.0.1:")
    status, headers, body = _get(served.url + "/npm/onnxruntime-web/dist/ort.wasm")
    assert (status, body) == (200, b"\0asm")
    assert headers["Content-Type"] == "application/wasm"
    for key, value in ISOLATION.items():
        assert headers[key] == value
    assert _get(served.url + "/npm/onnxruntime-web/dist/ort.mjs")[1]["Content-Type"] \
        == "text/javascript"
    assert json.loads(_get(served.url + "/edgesmith.json")[2]) == {"x": 2}
    assert json.loads(_get(served.url + "/")[2]) == {"a": 1}  # the index
    status, headers, body = _get(served.url + "/model/onnx/model_q4.onnx", "HEAD")
    assert status == 200 and body == b"" and headers["Content-Length"] == "6"


@pytest.mark.parametrize("path", ["/model/../secret.txt", "/model/%2e%2e/secret.txt",
                                  "/model/link.txt", "/model/onnx/../../secret.txt",
                                  "/other/config.json", "/model/missing.json"])
def test_nothing_outside_the_mounted_folders_is_served(served: StaticServer, path: str) -> None:
    status, _, body = _get(served.url + path)
    assert status == 404 and b"outside" not in body


def test_resolve_under_refuses_escapes(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("x")
    assert resolve_under(tmp_path / "a", "f") == (tmp_path / "a" / "f").resolve()
    for rel in ("../a/f", "f/..", "..\\f", "f\0"):
        assert resolve_under(tmp_path / "a", rel) is None


def test_the_shipped_lockfile_pins_the_packages() -> None:
    lock = json.loads((npm.SPEC_DIR / "package-lock.json").read_text())
    spec = json.loads((npm.SPEC_DIR / "package.json").read_text())
    assert lock["packages"][""]["dependencies"] == spec["dependencies"]
    for name, version in spec["dependencies"].items():
        assert version[0].isdigit(), f"{name} is not pinned to one version"
        assert npm.package_version(name) == version
    assert len(npm.lock_hash()) == 16


FAKE_NPM = """#!/bin/sh
# stands in for npm ci: writes a partial install, then finishes or hangs
mkdir -p node_modules/onnxruntime-web/dist
echo partial > node_modules/onnxruntime-web/dist/ort.mjs
[ -n "$FAKE_NPM_HANG" ] && { touch "$FAKE_NPM_HANG"; sleep 60; }
[ -n "$FAKE_NPM_FAIL" ] && { echo "npm ERR! 404 Not Found - GET onnxruntime-web" >&2; exit 1; }
exit 0
"""


def _fake_npm(tmp_path: Path) -> Path:
    exe = tmp_path / "npm"
    exe.write_text(FAKE_NPM)
    exe.chmod(0o755)
    return exe


def test_a_killed_install_does_not_look_finished(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root, started = tmp_path / "npm-cache", tmp_path / "started"
    env = {**os.environ, "EDGESMITH_NPM": str(_fake_npm(tmp_path)),
           "FAKE_NPM_HANG": str(started)}
    code = f"from edgesmith.web import npm; from pathlib import Path; " \
           f"npm.ensure_modules(Path({str(root)!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, start_new_session=True)
    try:
        for _ in range(300):
            if started.exists():
                break
            time.sleep(0.1)
        assert started.exists(), "the install never started"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert not npm.installed(root)
    assert not (root / npm.lock_hash()).exists()  # only an owner-tagged temp folder is left
    monkeypatch.setenv("EDGESMITH_NPM", str(_fake_npm(tmp_path)))
    mods = npm.ensure_modules(root)  # the next run installs (and sweeps the dead temp folder)
    assert npm.installed(root) and mods == root / npm.lock_hash() / "node_modules"
    assert (mods / "onnxruntime-web" / "dist" / "ort.mjs").read_text() == "partial\n"
    assert sorted(p.name for p in root.iterdir()) == [".lock", npm.lock_hash()]


def test_a_failed_install_names_npm_and_leaves_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesmith.errors import ToolError

    monkeypatch.setenv("EDGESMITH_NPM", str(_fake_npm(tmp_path)))
    monkeypatch.setenv("FAKE_NPM_FAIL", "1")
    with pytest.raises(ToolError, match="npm ci .* failed: npm ERR! 404"):
        npm.ensure_modules(tmp_path / "c")
    assert not npm.installed(tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == [".lock"]


def test_missing_npm_and_chromium_are_one_line_errors_naming_the_fix(tmp_path: Path,
                                                                      watched) -> None:
    folder = tmp_path / "web"
    (folder / "onnx").mkdir(parents=True)
    (folder / "config.json").write_text('{"num_hidden_layers": 1}')
    (folder / "tokenizer.json").write_text("{}")
    (folder / "onnx" / "model_q4.onnx").write_bytes(b"\x08\x09")
    exe = str(Path(sys.executable).parent / "edgesmith")
    env = {**os.environ, "EDGESMITH_CACHE": str(tmp_path / "cache"),
           "EDGESMITH_NPM": str(tmp_path / "no-npm")}
    r = watched([exe, "serve-web", str(folder), "--port", "0"], env=env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "npm" in lines[0] and "apt-get install -y npm" in lines[0]
    env = {**os.environ, "EDGESMITH_CHROMIUM": str(tmp_path / "no-chromium")}
    r = watched([exe, "bench", str(folder), "--runtime", "browser", "--repeat", "1"], env=env)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "apt-get install -y chromium" in lines[0], lines
