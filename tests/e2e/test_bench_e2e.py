"""End to end: bench the real SmolLM2-135M through the CLI, locally and through a running device
server on loopback, then render the report in a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgesmith.models import builtin_path

pytestmark = pytest.mark.e2e

SMALL = ("--threads", "1", "--prompt-tokens", "32", "--gen-tokens", "16", "--repeat", "3")


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def model() -> Path:
    return builtin_path("smollm2-135m")


@pytest.fixture(scope="module")
def local_result(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "local.json"
    # by its builtin name: bench resolves it to the packaged GGUF
    p = cli("bench", "builtin:smollm2-135m", *SMALL, "--device", "laptop", "-o", str(out),
            "--json")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == json.loads(out.read_text())
    return out


def test_local_bench_figures_are_plausible(local_result: Path, model: Path) -> None:
    r = json.loads(local_result.read_text())
    m, roof = r["metrics"], r["roofline"]
    assert r["schema"] == "edgesmith.bench" and r["settings"]["repeat"] == 3
    assert len(m["decode_tps"]["samples"]) == 3
    assert 0 < m["load_s"]["median"] < 30 and 0 < m["ttft_s"]["median"] < 30
    assert m["prefill_tps"]["median"] > 0 and m["decode_tps"]["min"] > 0
    # the roofline is an upper bound: decode cannot read the weights faster than memory allows
    assert roof["bound_decode_tps"] > m["decode_tps"]["max"]
    assert 0 < roof["fraction"] < 1
    assert r["artifact"]["size_bytes"] == model.stat().st_size
    assert r["artifact"]["path"] == str(model)
    assert m["peak_rss_mb"]["median"] > model.stat().st_size / 1e6 * 0.5
    assert r["environment"]["mem_bandwidth_gbs"] > 0.1 and r["environment"]["threads"] == 1


def test_bench_refuses_to_overwrite(local_result: Path, model: Path) -> None:
    before = local_result.read_text()
    p = cli("bench", str(model), *SMALL, "-o", str(local_result))
    assert p.returncode == 2 and "already exists" in p.stderr and "--force" in p.stderr
    assert local_result.read_text() == before


def test_bad_inputs_fail_in_one_line(tmp_path: Path, local_result: Path) -> None:
    p = cli("bench", str(tmp_path / "missing.gguf"))
    assert p.returncode == 2 and "does not exist" in p.stderr
    fake = tmp_path / "notes.gguf"
    fake.write_text("not a model")
    p = cli("bench", str(fake))
    assert p.returncode == 2 and "not a GGUF" in p.stderr
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(local_result.read_text()[:200])
    p = cli("report", str(corrupt), "-o", str(tmp_path / "r.html"))
    assert p.returncode == 2 and "not valid JSON" in p.stderr
    future = tmp_path / "future.json"
    future.write_text(json.dumps(json.loads(local_result.read_text()) | {"schema_version": 7}))
    p = cli("report", str(future), "--format", "md")
    assert p.returncode == 2 and "schema version 7" in p.stderr
    for p in (cli("report", str(corrupt)), cli("bench", str(fake))):
        assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


# 0.05 s after llama.cpp's libraries appear the first model load is under way (Ctrl-C there
# lands in llama-cpp-python's log callback, where ctypes discards it); at 1.5 s a generation runs
@pytest.mark.parametrize("delay", [0.05, 1.5])
def test_ctrl_c_leaves_no_partial_results(model: Path, tmp_path: Path, delay: float) -> None:
    out = tmp_path / "long.json"
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith.cli", "bench", str(model),
                             "--threads", "1", "--repeat", "100", "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # a shell without job control starts background jobs with SIGINT
                            # ignored; give the child Python its default Ctrl-C handling
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # wait for the first model load (llama.cpp is imported then), however slow start-up is
    maps, deadline = Path(f"/proc/{proc.pid}/maps"), time.monotonic() + 300
    while "libggml-cpu" not in maps.read_text():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "bench never loaded the model"
        time.sleep(0.02)
    time.sleep(delay)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert list(tmp_path.iterdir()) == []  # neither the file nor a temp file


def test_quality_bench(model: Path, tmp_path_factory: pytest.TempPathFactory,
                       smollm2_hf_dir: Path) -> None:
    out = tmp_path_factory.getbasetemp() / "quality.json"
    p = cli("bench", str(model), *SMALL, "--device", "laptop", "--quality", "--reference",
            "builtin:smollm2-135m", "-o", str(out), "--force")
    assert p.returncode == 0, p.stderr
    q = json.loads(out.read_text())["quality"]
    # the Q4_1 file against its own dequantized fp32 weights: close, but not identical
    assert 0 < q["kld_mean"] < 0.05 and q["top1_agreement"] > 0.9 and q["tokens_scored"] > 1000


# --- remote bench through the real device server on loopback ---------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(model: Path) -> Iterator[str]:
    from waitress.server import create_server

    from edgesmith.device_server.app import ServerConfig, create_app

    cfg = ServerConfig(model=str(model), api_key="s3cret-key", threads=1, n_ctx=512)
    srv = create_server(create_app(cfg), host="127.0.0.1", port=_free_port(), threads=4)
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.effective_port}"
    srv.close()


def test_remote_bench_through_server(server: str, model: Path, tmp_path: Path,
                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret-key\n")
    out = tmp_path_factory.getbasetemp() / "remote.json"
    p = cli("bench", str(model), *SMALL, "--device", "pi-5", "--remote", server,
            "--api-key-file", str(key), "-o", str(out), "--force")
    assert p.returncode == 0, p.stderr
    r = json.loads(out.read_text())
    assert r["source"] == server and r["device"] == "pi-5"
    assert r["settings"]["reload_each_repeat"] is False and r["settings"]["threads"] == 1
    assert r["metrics"]["decode_tps"]["median"] > 0
    assert r["roofline"]["bound_decode_tps"] > r["metrics"]["decode_tps"]["max"]
    key.write_text("wrong")
    p = cli("bench", str(model), *SMALL, "--remote", server, "--api-key-file", str(key))
    assert p.returncode == 2 and "HTTP 401" in p.stderr


def test_bench_endpoint_refuses_bad_requests(server: str) -> None:
    import urllib.error
    import urllib.request

    def post(body: bytes, key: str = "s3cret-key") -> tuple[int, dict[str, object]]:
        req = urllib.request.Request(server + "/v1/edgesmith/bench", data=body, method="POST",
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    for body, field in [(b'{"repeat": 0}', "repeat"), (b'{"gen_tokens": "many"}', "gen_tokens"),
                        (b'{"unknown": 1}', "unknown")]:
        status, out = post(body)
        assert status == 400 and out["error"]["message"].startswith(field), out
    status, out = post(b"{}", key="wrong")
    assert status == 401 and out["error"]["type"] == "authentication_error"


# --- the report in a real browser -------------------------------------------------------------

def _png_pixels(path: Path) -> tuple[int, bytes]:
    """Decode an 8-bit RGB/RGBA PNG (enough for Chromium's screenshots): bytes per pixel and
    the pixels, row after row."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, w = 8, b"", 0
    while pos < len(data):
        n, typ = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        pos += 12 + n
        if typ == b"IHDR":
            w, h, depth, ctype = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and ctype in (2, 6)
            bpp = 3 if ctype == 2 else 4
        elif typ == b"IDAT":
            idat += body
    raw, stride = zlib.decompress(idat), w * bpp
    out, prev = bytearray(), bytearray(stride)
    for y in range(h):
        row = raw[y * (stride + 1) : (y + 1) * (stride + 1)]
        f, line = row[0], bytearray(row[1:])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        out += line
        prev = line
    return bpp, bytes(out)


def _chromium(page: Path, shot: Path, tmp: Path) -> str:
    """Screenshot ``page`` headless; returns Chromium's log (console messages included)."""
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed: apt-get install chromium"
    p = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
                        f"--screenshot={shot}", "--window-size=1200,1400", page.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and shot.exists(), p.stderr[-2000:]
    return p.stderr


def _console_errors(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]


def test_chromium_sees_console_errors(tmp_path: Path) -> None:
    """The check below can fail: a page with a script error is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body>x<script>undefinedFunction();</script></body></html>")
    assert any("undefinedFunction" in ln for ln in
               _console_errors(_chromium(bad, tmp_path / "bad.png", tmp_path)))


def test_report_renders_in_chromium(local_result: Path, tmp_path: Path, model: Path) -> None:
    from edgesmith.bench import results

    base = results.read(local_result)
    quality = results.Quality(reference="builtin:smollm2-135m", tokens_scored=2048, ppl=12.0,
                              ppl_ref=11.5, ppl_increase_pct=4.3, kld_mean=0.05, kld_p99=0.4,
                              top1_agreement=0.88)
    base = base.model_copy(update={"quality": quality})
    pi = base.model_copy(update={"device": "pi-5 <b>", "quality": None})
    other = base.model_copy(update={
        "artifact": base.artifact.model_copy(
            update={"name": "variant.Q8_0.gguf", "quant": "Q8_0", "size_bytes": 150_000_000}),
        "quality": quality.model_copy(update={"kld_mean": 0.004, "ppl_increase_pct": 0.3})})
    files = []
    for i, r in enumerate((base, pi, other)):
        results.write(r, tmp_path / f"r{i}.json")
        files.append(str(tmp_path / f"r{i}.json"))
    page = tmp_path / "report.html"
    p = cli("report", *files, "-o", str(page))
    assert p.returncode == 0, p.stderr
    html = page.read_text()
    offline = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in offline and "https://" not in offline  # nothing fetched
    # size vs speed, size vs quality (the two results with quality), speed per device
    assert html.count("<svg") == 3 and "pi-5 &lt;b&gt;" in html
    assert "Size vs quality" in html and "Size vs decode speed" in html
    log = _chromium(page, tmp_path / "shot.png", tmp_path)
    assert _console_errors(log) == []
    bpp, px = _png_pixels(tmp_path / "shot.png")
    pixels = [px[i : i + 3] for i in range(0, len(px), bpp * 7)]  # a sample of the pixels
    colours = set(pixels)
    non_white = sum(1 for c in pixels if c != b"\xff\xff\xff")
    assert len(colours) > 50 and non_white > 0.02 * len(pixels), (len(colours), non_white)
    # the chart colours (first two series) are on screen, so the SVG charts rendered
    assert b"\x1f\x77\xb4" in colours and b"\xd6\x27\x28" in colours
    md = cli("report", *files, "--format", "md")
    assert md.returncode == 0 and md.stdout.count("\n| ") == 4 and "Pareto" in md.stdout

