"""compress through the CLI on a tiny model: outputs, manifest, gates, --force, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.fsutil import sha256_file

RECIPE = """name: tiny-q4km
target: raspberry-pi-5
calibration: {{samples: 2, seq_len: 128}}
eval: {{ctx: 128, windows: 2}}
steps:
  - export: {{format: gguf, outtype: f16}}
  - gguf_quantize: {{type: Q4_K_M, imatrix: true}}
gates:
  max_ppl_increase_pct: 1000
  max_kld: {max_kld}
  max_size_mb: {max_size}
"""


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)


def error_line(p: subprocess.CompletedProcess[str]) -> str:
    """The one error line (progress bars may precede it on stderr); no traceback."""
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    return errors[0]


@pytest.fixture(scope="module")
def compressed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("compress")
    (d / "r.yaml").write_text(RECIPE.format(max_kld=10, max_size=100))
    p = run("compress", str(tiny_llama), "--recipe", str(d / "r.yaml"), "-o", str(d / "out"),
            "--threads", "2")
    assert p.returncode == 0, p.stderr
    return d


def test_outputs_and_manifest(compressed: Path, tiny_llama: Path) -> None:
    out = compressed / "out"
    assert sorted(os.listdir(out)) == ["manifest.json", "report.md", "tiny-llama.Q4_K_M.gguf"]
    man = json.loads((out / "manifest.json").read_text())
    assert man["schema"] == "edgesmith.manifest" and man["schema_version"] == 1
    art = man["artifacts"][0]
    assert art["sha256"] == sha256_file(out / art["path"])
    assert art["size_bytes"] == (out / art["path"]).stat().st_size
    # the manifest, written last, is the commit record: every other file with its sha256
    assert {f["path"]: (f["sha256"], f["size_bytes"]) for f in man["files"]} == {
        n: (sha256_file(out / n), (out / n).stat().st_size) for n in (art["path"], "report.md")}
    assert art["imatrix"] is True and art["fallbacks"] == []
    assert {t["type"] for t in art["tensors"]} >= {"Q4_K", "Q6_K"}
    assert man["input"]["sha256"] == sha256_file(tiny_llama / "model.safetensors")
    assert man["recipe"]["as_run"]["steps"][1] == {"gguf_quantize": {"type": "Q4_K_M",
                                                                     "imatrix": True}}
    q, base = art["quality"], man["baseline"]["quality"]
    assert q["tokens_scored"] == 2 * 63
    assert base["kld_mean"] < 1e-3 < q["kld_mean"]  # F16 matches, Q4 measurably does not
    assert man["gates"]["passed"] is True
    assert "llama-cpp-python" in man["tool_versions"]
    report = (out / "report.md").read_text()
    assert "| **tiny-llama.Q4_K_M.gguf** (imatrix) |" in report and "PASSED" in report


def test_existing_output_needs_force(compressed: Path, tiny_llama: Path) -> None:
    out = compressed / "out"
    before = (out / "manifest.json").read_text()
    p = run("compress", str(tiny_llama), "--recipe", str(compressed / "r.yaml"), "-o", str(out))
    assert p.returncode == 2
    assert "already exists" in error_line(p) and "--force" in error_line(p)
    assert (out / "manifest.json").read_text() == before


def test_rerun_resumes_from_cache(compressed: Path, tiny_llama: Path) -> None:
    from edgesmith.models import resolve

    run_dir = Path(os.environ["EDGESMITH_CACHE"]) / "runs" / resolve(str(tiny_llama)).fingerprint()
    f16 = next(run_dir.glob("tiny-llama.*.F16.*.gguf"))
    refs = list(f16.parent.glob("ref-*.npy"))
    quantized = list(f16.parent.glob("Q4_K_M.*.gguf"))
    assert refs and len(quantized) == 1
    stamps = {p: p.stat().st_mtime_ns for p in [f16, *refs, *quantized]}
    p = run("compress", str(tiny_llama), "--recipe", str(compressed / "r.yaml"), "-o",
            str(compressed / "out"), "--force", "--json")
    assert p.returncode == 0, p.stderr
    man = json.loads(p.stdout)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    assert man["timings_s"]["convert"] < 1.0 and man["timings_s"]["quantize"] < 1.0
    # progress bars on stderr (stdout holds the JSON): hashing the output is still done, the
    # cached steps (conversion, quantization, quality) show no bar: they did not run
    assert "sha256 tiny-llama.Q4_K_M.gguf" in p.stderr, p.stderr
    assert "quality:" not in p.stderr and "convert to" not in p.stderr, p.stderr
    # what out/ holds is the verified file from the cache
    art = compressed / "out" / man["artifacts"][0]["path"]
    assert art.read_bytes() == quantized[0].read_bytes()
    assert man["artifacts"][0]["sha256"] == sha256_file(art)


def test_quality_gate_failure_exits_2(compressed: Path, tiny_llama: Path) -> None:
    (compressed / "strict.yaml").write_text(RECIPE.format(max_kld=0.0, max_size=0.001))
    out = compressed / "strict-out"
    p = run("compress", str(tiny_llama), "--recipe", str(compressed / "strict.yaml"), "-o",
            str(out))
    assert p.returncode == 2
    line = error_line(p)
    assert "missed the quality gate" in line and "mean KLD" in line and "size" in line
    man = json.loads((out / "manifest.json").read_text())
    assert man["gates"]["passed"] is False and len(man["gates"]["failures"]) == 2
    # --json still prints the manifest (marked failed) on stdout, and exits 2
    p = run("compress", str(tiny_llama), "--recipe", str(compressed / "strict.yaml"), "-o",
            str(out), "--force", "--json")
    assert p.returncode == 2 and "missed the quality gate" in error_line(p)
    assert json.loads(p.stdout) == json.loads((out / "manifest.json").read_text())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["compress", "/nonexistent/model", "--target", "raspberry-pi-5"], "does not exist"),
        (["compress", "builtin:smollm2-135m", "--target", "pi-9"], "unknown target 'pi-9'"),
        (["compress", "builtin:smollm2-135m", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["compress", "builtin:minilm-l6", "--target", "raspberry-pi-5"],
         "not a causal language model"),
        (["compress", "builtin:smollm2-135m"], "exactly one of --target or --recipe"),
        (["targets", "show", "pi-9"], "unknown target"),
        (["recipes", "validate", "/nonexistent.yaml"], "does not exist"),
        (["export", "builtin:smollm2-135m", "--outtype", "q1"], "invalid --outtype"),
    ],
)
def test_bad_input_one_line_exit_2(args: list[str], message: str) -> None:
    p = run(*args)
    assert p.returncode == 2, p.stderr
    assert message in error_line(p)


def _bad_model(kind: str, tiny: Path, tmp: Path) -> Path:
    """A damaged copy of the tiny model (or of the packaged GGUF), one per kind of bad input."""
    import shutil

    from edgesmith.models import builtin_path

    if kind.endswith("gguf"):
        data = builtin_path("smollm2-135m").read_bytes()
        f = tmp / "model.gguf"
        f.write_bytes(b"GGUF" + b"\xff" * 60 if kind == "corrupt gguf" else data[:5_000_000])
        return f
    d = tmp / "model"
    shutil.copytree(tiny, d)
    st = d / "model.safetensors"
    if kind == "no config.json":
        (d / "config.json").unlink()
    elif kind == "unsupported architecture":
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = ["WhisperForConditionalGeneration"]
        (d / "config.json").write_text(json.dumps(cfg))
    elif kind == "truncated safetensors":
        st.write_bytes(st.read_bytes()[:100_000])
    elif kind == "corrupt safetensors":
        st.write_bytes(b"\xff" * 64)
    elif kind == "pickle only":
        st.rename(d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize(("kind", "message"), [
    ("no config.json", "no config.json"),
    ("unsupported architecture", "unsupported architecture 'WhisperForConditionalGeneration'"),
    ("truncated safetensors", "corrupt safetensors"),
    ("corrupt safetensors", "corrupt safetensors"),
    ("pickle only", "--allow-pickle"),
    ("corrupt gguf", "GGUF"),
    ("truncated gguf", "corrupt or truncated GGUF"),
])
def test_bad_model_one_line_exit_2(kind: str, message: str, tiny_llama: Path,
                                   tmp_path: Path) -> None:
    bad = _bad_model(kind, tiny_llama, tmp_path)
    p = run("compress", str(bad), "--target", "raspberry-pi-5", "-o", str(tmp_path / "out"))
    assert p.returncode == 2, p.stderr
    assert message in error_line(p)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_full_cache_disk_one_line_exit_2(tmp_path: Path) -> None:
    """The dequantized model is written by transformers/safetensors into the cache: a full disk
    there is one line and exit 2 too, and no half-written directory is left."""
    mnt = tmp_path / "cache"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True)
    try:
        p = subprocess.run([sys.executable, "-m", "edgesmith.cli", "compress",
                            "builtin:smollm2-135m", "--target", "raspberry-pi-5", "-o",
                            str(tmp_path / "out")], capture_output=True, text=True, timeout=600,
                           env={**os.environ, "EDGESMITH_CACHE": str(mnt), "COLUMNS": "200"})
        assert p.returncode == 2, p.stderr
        assert "disk full" in error_line(p) and "EDGESMITH_CACHE" in error_line(p)
        assert not list(mnt.glob("hf/*")) and not (tmp_path / "out").exists()
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_recipes_json(tmp_path: Path) -> None:
    good = tmp_path / "r.yaml"
    good.write_text(RECIPE.format(max_kld=0.1, max_size=50))
    p = run("recipes", "validate", str(good), "--json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["valid"] is True and out["name"] == "tiny-q4km" and out["gates"]["max_kld"] == 0.1
    assert out["steps"][1] == {"gguf_quantize": {"type": "Q4_K_M", "imatrix": True}}
    p = run("recipes", "show", "raspberry-pi-5-q8", "--json")
    assert p.returncode == 0 and json.loads(p.stdout)["target"] == "raspberry-pi-5"


def test_invalid_recipe_one_line_exit_2(tiny_llama: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(RECIPE.format(max_kld=1, max_size=1).replace("Q4_K_M", "Q4_K_X"))
    p = run("compress", str(tiny_llama), "--recipe", str(bad), "-o", str(tmp_path / "out"))
    assert p.returncode == 2
    line = error_line(p)
    assert f"{bad}:7" in line and "Q4_K_M" in line  # file:line and the allowed values


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_one_line_exit_2(tiny_llama: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        p = run("export", str(tiny_llama), "--format", "gguf", "-o", str(mnt))
        assert p.returncode == 2, p.stderr
        assert "disk full" in error_line(p)
        assert os.listdir(mnt) == []  # no half-written GGUF
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_debug_shows_traceback() -> None:
    p = run("--debug", "targets", "show", "pi-9")
    assert p.returncode != 0 and "Traceback" in p.stderr


@pytest.mark.parametrize("cmd", [["compress"], ["export"], ["targets", "fit"],
                                 ["recipes", "validate"], ["targets", "list"]])
def test_every_command_has_help_with_example(cmd: list[str]) -> None:
    p = run(*cmd, "--help")
    assert p.returncode == 0 and "Example" in p.stdout


def test_export_writes_f16_and_refuses_overwrite(tiny_llama: Path, tmp_path: Path) -> None:
    p = run("export", str(tiny_llama), "--format", "gguf", "--outtype", "f16", "-o",
            str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert Path(res["path"]).name == "tiny-llama.F16.gguf"
    assert res["sha256"] == sha256_file(Path(res["path"]))
    # the converter's peak memory, sampled while it ran
    assert res["converter_peak_rss_bytes"] >= res["converter_peak_anon_bytes"] > 0
    p = run("export", str(tiny_llama), "-o", str(tmp_path))
    assert p.returncode == 2 and "already exists" in error_line(p)


def test_killed_run_leaves_no_partial_output_and_resumes(tiny_llama: Path, tmp_path: Path) -> None:
    import signal
    import time

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "llama.cpp").symlink_to(Path(os.environ["EDGESMITH_CACHE"]) / "llama.cpp")
    (tmp_path / "r.yaml").write_text(RECIPE.format(max_kld=10, max_size=100))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "edgesmith.cli", "compress", str(tiny_llama), "--recipe",
           str(tmp_path / "r.yaml"), "-o", str(out)]
    env = {**os.environ, "EDGESMITH_CACHE": str(cache)}

    def kill_when(pattern: str) -> None:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if list(cache.glob(pattern)):
                break
            time.sleep(0.02)
        assert proc.poll() is None, "compress finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        # out/ is untouched: the artifact is copied there only once it is verified
        assert not out.exists() or list(out.iterdir()) == []

    kill_when("runs/*/*.F16.*.gguf")  # during the reference / imatrix / quantization
    f16 = next(cache.glob("runs/*/*.F16.*.gguf"))
    kill_when("runs/*/Q4_K_M.*.gguf.json")  # quantized, now in the quality check
    quantized = next(cache.glob("runs/*/Q4_K_M.*.gguf"))
    stamps = {f16: f16.stat().st_mtime_ns, quantized: quantized.stat().st_mtime_ns}
    p = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    # neither the F16 GGUF nor the quantized one was recomputed
    assert {f: f.stat().st_mtime_ns for f in stamps} == stamps
    timings = json.loads(p.stdout)["timings_s"]
    assert timings["convert"] < 1.0 and timings["quantize"] < 1.0
    assert (out / "tiny-llama.Q4_K_M.gguf").read_bytes() == quantized.read_bytes()
