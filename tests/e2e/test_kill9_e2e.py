"""kill -9 of `compress` (its whole process group) the moment each of its files appears, in -o
and in the cache; the same command, run again without --force, must then leave a complete,
verified result and no temp file. Tiny random model, so a case takes seconds."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgesmith import compress_report
from edgesmith.fsutil import sha256_file

pytestmark = pytest.mark.e2e

RECIPE = """name: {name}
target: raspberry-pi-5
calibration: {{samples: 2, seq_len: 128}}
eval: {{ctx: 128, windows: 2}}
steps:
  - export: {{format: gguf, outtype: f16}}
  - gguf_quantize: {{type: Q4_K_M, imatrix: {imatrix}}}
gates:
  max_ppl_increase_pct: 1000
  max_kld: 10
"""
ART = "tiny-llama.Q4_K_M.gguf"
POLL_S = 0.002
KILL_WAIT_S = 1800  # only a safety net: the run either shows the file or ends by itself


@pytest.fixture(scope="module")
def warm(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory, watched) -> Path:  # type: ignore[no-untyped-def]
    """A private cache holding everything both recipes need, and an older result ("plain",
    without an importance matrix: another artifact under the same name) to --force over."""
    from edgesmith.export import llamacpp_src

    llamacpp_src.source_dir()  # the session cache's llama.cpp sources, linked into each cache
    d = tmp_path_factory.mktemp("kill9")
    (d / "new.yaml").write_text(RECIPE.format(name="tiny-q4km", imatrix="true"))
    (d / "old.yaml").write_text(RECIPE.format(name="tiny-q4km-plain", imatrix="false"))
    cache = _empty_cache(d / "cache")
    for recipe in ("old", "new"):
        p = watched(_cmd(tiny_llama, d / f"{recipe}.yaml", d / f"{recipe}-out"), env=_env(cache))
        assert p.returncode == 0, p.stderr
    return d


def _empty_cache(cache: Path) -> Path:
    cache.mkdir()
    (cache / "llama.cpp").symlink_to(Path(os.environ["EDGESMITH_CACHE"]) / "llama.cpp")
    return cache


def _cmd(model: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "edgesmith.cli", "compress", str(model), "--recipe",
            str(recipe), "-o", str(out), "--threads", "2", *extra]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "EDGESMITH_CACHE": str(cache), "COLUMNS": "200"}


def _files(root: Path) -> dict[Path, tuple[int, int]]:
    """Every path under root (links not followed) with its identity (inode, ctime)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            try:
                st = p.lstat()
            except FileNotFoundError:
                continue
            found[p] = (st.st_ino, st.st_ctime_ns)
    return found


def _appeared(root: Path, pattern: str, before: dict[Path, tuple[int, int]]) -> Path | None:
    for p in root.glob(pattern):
        try:
            st = p.lstat()
        except FileNotFoundError:
            continue
        if before.get(p) != (st.st_ino, st.st_ctime_ns):
            return p
    return None


def _kill_when(cmd: list[str], env: dict[str, str], root: Path, pattern: str) -> Path:
    """Run cmd in its own process group; SIGKILL the group the moment a file matching
    pattern under root is new (a new name, or a name replaced by a new file)."""
    before = _files(root) if root.exists() else {}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline, seen = time.monotonic() + KILL_WAIT_S, None
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen = _appeared(root, pattern, before)
            if seen is not None:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(POLL_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
    assert seen is not None and proc.returncode == -signal.SIGKILL, \
        f"{pattern} never appeared while compress ran (rc {proc.returncode}): {stderr[-3000:]!r}"
    return seen


def _consistent(out: Path) -> list[str]:
    """What is wrong with the result in out, checked independently of edgesmith's own
    verification: each listed file's sha256, the artifact, and the report rendered from this
    very manifest."""
    man = json.loads((out / "manifest.json").read_text())
    bad = [f["path"] for f in man.get("files", [])
           if sha256_file(out / f["path"]) != f["sha256"]]
    art = man["artifacts"][0]
    if not (out / art["path"]).is_file() or sha256_file(out / art["path"]) != art["sha256"]:
        bad.append(f"artifact {art['path']}")
    if (out / "report.md").read_text() != compress_report.render(man):
        bad.append("report.md is not this manifest's")
    return bad


def _temps(root: Path) -> list[str]:
    return sorted(str(p) for p in _files(root) if p.name.endswith((".tmp", ".old"))
                  or ".edgesmith-" in p.name or p.name.endswith(".partial"))


def _prepare(warm: Path, tmp_path: Path, cache_state: str, old_result: bool) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    if cache_state == "empty":
        _empty_cache(cache)
    else:
        shutil.copytree(warm / "cache", cache, symlinks=True)
    if cache_state == "requantize":  # the quantized GGUF (and its quality) must be made again
        for p in [*cache.glob("runs/*/Q4_K_M.*.gguf*"), *cache.glob("runs/*/quality.json")]:
            p.unlink()
    out = tmp_path / "out"
    if old_result:
        shutil.copytree(warm / "old-out", out)
    else:
        out.mkdir()
    (out / "notes.txt").write_text("the user's own file")  # -o may be a user's folder
    return cache, out


CASES = [
    # (where, what appears, state of the cache before the run, an older result in -o)
    ("out", f".{ART}.*tmp", "warm", False),  # the artifact's temp file
    ("out", ART, "warm", False),
    ("out", "report.md", "warm", False),
    ("out", "manifest.json", "warm", False),
    ("cache", "runs/*/.*.F16.*tmp", "empty", False),  # the converter's output, a temp file
    ("cache", "runs/*/.Q4_K_M.*tmp", "requantize", False),  # the quantizer's temp file
    ("cache", "runs/*/Q4_K_M.*.gguf", "requantize", False),  # a cache entry
    ("out", ART, "warm", True),  # --force over an older result
    ("out", "report.md", "warm", True),
    ("out", "manifest.json", "warm", True),
]


@pytest.mark.parametrize(("where", "pattern", "cache_state", "old_result"), CASES,
                         ids=[f"{w}:{p}{' --force over old' if o else ''}"
                              for w, p, _, o in CASES])
def test_kill9_when_a_file_appears_then_the_same_command_finishes(
        where: str, pattern: str, cache_state: str, old_result: bool, warm: Path,
        tiny_llama: Path, tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    cache, out = _prepare(warm, tmp_path, cache_state, old_result)
    old_manifest = json.loads((out / "manifest.json").read_text()) if old_result else None
    cmd = _cmd(tiny_llama, warm / "new.yaml", out)
    _kill_when([*cmd, "--force"] if old_result else cmd, _env(cache),
               out if where == "out" else cache, pattern)
    # at the kill: the old result, or no result (no manifest), never a mix of the two
    complete = (out / "manifest.json").exists()
    if complete:
        assert _consistent(out) == [], "a manifest that does not describe the files beside it"
    assert (out / "notes.txt").read_text() == "the user's own file"

    p = watched(cmd, env=_env(cache))  # the same command, without --force
    if p.returncode == 2 and complete and old_manifest != json.loads(
            (out / "manifest.json").read_text()):
        # killed only once the new result was complete: that one is kept, as any complete result
        assert "already exists" in p.stderr and "--force" in p.stderr, p.stderr
    else:
        assert p.returncode == 0, p.stderr
    assert _temps(out) == [] and _temps(cache) == []  # no temp file, no journal left
    man = json.loads((out / "manifest.json").read_text())
    assert man["recipe"]["name"] == "tiny-q4km" and _consistent(out) == []
    assert sorted(os.listdir(out)) == sorted([ART, "manifest.json", "notes.txt", "report.md"])
    # the artifact is this recipe's quantized GGUF from the cache, not the older result's
    quantized = {sha256_file(q) for q in cache.glob("runs/*/Q4_K_M.*.gguf")}
    old_sha = json.loads((warm / "old-out" / "manifest.json").read_text())["artifacts"][0]["sha256"]
    assert man["artifacts"][0]["sha256"] in quantized - {old_sha}
    assert {f["path"] for f in man.get("files", [])} == {ART, "report.md"}  # all listed
