"""Crash safety of outputs: temp files that name their owner (a dead run's are swept, a live
run's never), and result directories that appear all at once (fsutil.Publication)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgesmith.errors import OutputError
from edgesmith.fsutil import write_text_atomic

# A second process that holds a temp file open in DIR (inside atomic_path) until told to go on.
_HOLDER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edgesmith.fsutil import atomic_path

    with atomic_path(Path(sys.argv[1])) as tmp:
        tmp.write_text("from the holder")
        print(tmp, flush=True)
        sys.stdin.readline()
    print("renamed", flush=True)
""")


def _temps(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".tmp"))


def _holder(dest: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(dest)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.parent == dest.parent and tmp.exists(), tmp
    return proc, tmp


def test_a_dead_runs_temp_file_is_swept_a_live_ones_never(tmp_path: Path) -> None:
    """Two processes: a live writer's temp file survives another process's atomic writes into
    the same directory (and the writer then finishes); a killed writer's temp file is removed
    by the next atomic write there. (Before: every kill -9 left its temp file forever.)"""
    live, live_tmp = _holder(tmp_path / "a.gguf")
    try:
        write_text_atomic(tmp_path / "other.txt", "x")  # sweeps tmp_path
        assert live_tmp.exists()
        assert live.stdin is not None and live.stdout is not None
        live.stdin.write("\n")
        live.stdin.flush()
        assert live.stdout.readline().strip() == "renamed"
        assert live.wait(timeout=60) == 0
        assert (tmp_path / "a.gguf").read_text() == "from the holder"
    finally:
        live.kill()
        live.wait()

    dead, dead_tmp = _holder(tmp_path / "b.gguf")
    dead.send_signal(signal.SIGKILL)
    dead.wait()
    assert dead_tmp.exists()  # kill -9: no cleanup ran
    write_text_atomic(tmp_path / "other.txt", "y")
    assert not dead_tmp.exists()
    assert _temps(tmp_path) == [] and sorted(os.listdir(tmp_path)) == ["a.gguf", "other.txt"]


def test_temp_name_carries_pid_and_start_time(tmp_path: Path) -> None:
    from edgesmith.fsutil import owner_alive, sweep_stale, temp_path

    tmp = temp_path(tmp_path / "m.gguf")
    pid, start = tmp.name.split(".edgesmith-")[1].split("-")[:2]
    assert int(pid) == os.getpid() and owner_alive(int(pid), int(start))
    # the same pid with another start time is an earlier process whose pid was reused
    reused = tmp_path / tmp.name.replace(f"-{pid}-{start}-", f"-{pid}-{int(start) + 1}-")
    assert not owner_alive(int(pid), int(start) + 1)
    tmp.write_text("live")
    reused.write_text("dead")
    assert sweep_stale(tmp_path) == [reused]
    assert tmp.exists()


def _dead_temp_name(dest: Path) -> Path:
    """A temp name of a process that has exited."""
    code = "import sys; from pathlib import Path; from edgesmith.fsutil import temp_path; " \
           "print(temp_path(Path(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(dest)], capture_output=True,
                         text=True, check=True, timeout=60).stdout
    return Path(out.strip())


def test_cache_sweep_at_start(tmp_path: Path) -> None:
    from edgesmith.fsutil import sweep_cache, temp_path

    root = tmp_path / "cache"
    run = root / "runs" / "abc"
    run.mkdir(parents=True)
    dead = _dead_temp_name(run / "Q4_K_M.x.gguf")
    dead.write_bytes(b"\0" * 1000)
    dead_dir = _dead_temp_name(root / "hf" / "fp")  # a folder output's temp
    (dead_dir / "sub").mkdir(parents=True)
    (dead_dir / "sub" / "model.safetensors").write_bytes(b"\0")
    live = temp_path(run / "F16.gguf")
    live.write_bytes(b"live")
    old_legacy, young_legacy = run / ".F16.gguf.k2j4h1_a.tmp", run / ".q.gguf.abcdefgh.tmp"
    old_legacy.write_bytes(b"old")
    young_legacy.write_bytes(b"young")
    os.utime(old_legacy, (time.time() - 3 * 86400,) * 2)
    elsewhere = tmp_path / "elsewhere"  # a symlinked folder is not followed
    elsewhere.mkdir()
    linked = _dead_temp_name(elsewhere / "x")
    linked.write_bytes(b"not ours to sweep through a link")
    (root / "runs" / "link").symlink_to(elsewhere)
    keep = run / "quality.json"
    keep.write_text("{}")

    assert sorted(sweep_cache(root)) == sorted([dead, dead_dir, old_legacy])
    assert live.exists() and young_legacy.exists() and linked.exists() and keep.exists()
    assert not dead.exists() and not dead_dir.exists() and not old_legacy.exists()


def test_atomic_dir_replaces_a_folder(tmp_path: Path) -> None:
    from edgesmith.fsutil import atomic_dir

    dest = tmp_path / "m.mlpackage"
    with atomic_dir(dest) as tmp:
        (tmp / "Data").mkdir()
        (tmp / "Data" / "w.bin").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(dest) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("boom")
    assert (dest / "Data" / "w.bin").read_text() == "old" and os.listdir(tmp_path) == [dest.name]
    with atomic_dir(dest) as tmp:
        (tmp / "Manifest.json").write_text("new")
    assert os.listdir(dest) == ["Manifest.json"] and os.listdir(tmp_path) == [dest.name]


# A run that publishes a folder artifact and a report into OUT, killing itself (SIGKILL) at
# STAGE: the same protocol compress uses, for a folder output (an .mlpackage, an ONNX layout).
_PUBLISH = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from edgesmith.fsutil import Publication

    out, src, stage, force = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
    def point(name):
        if stage == name:
            os.kill(os.getpid(), signal.SIGKILL)
    with Publication(out, ["m.mlpackage", "report.md"], force == "force") as pub:
        point("journaled")
        sha = pub.copy(src, "m.mlpackage")
        point("artifact")
        pub.write_text("report.md", "report of " + src.name)
        point("report")
        pub.commit({"schema": "test", "artifacts": [{"path": "m.mlpackage", "sha256": sha}]})
""")


def _publish(out: Path, src: Path, stage: str = "none", force: bool = False) -> int:
    return subprocess.run([sys.executable, "-c", _PUBLISH, str(out), str(src), stage,
                           "force" if force else "-"], timeout=120).returncode


def _folder(tmp_path: Path, name: str) -> Path:
    src = tmp_path / name
    (src / "Data" / "weights").mkdir(parents=True)
    (src / "Manifest.json").write_text(json.dumps({"v": name}))
    (src / "Data" / "weights" / "weight.bin").write_bytes(name.encode() * 1000)
    return src


def _result_state(out: Path) -> str:
    """'complete:<src name>' when the manifest verifies, else 'unfinished'."""
    from edgesmith.fsutil import verify_result

    if verify_result(out):
        return "unfinished"
    return "complete:" + (out / "report.md").read_text().removeprefix("report of ")


@pytest.mark.parametrize("stage", ["journaled", "artifact", "report"])
def test_killed_publication_of_a_folder_is_resumed_without_force(tmp_path: Path,
                                                                  stage: str) -> None:
    from edgesmith.fsutil import JOURNAL, check_result_writable, verify_result

    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")  # -o may be a user's own folder
    (out / ".notes.abcdefgh.tmp").write_text("the user's too, whatever it looks like")
    src = _folder(tmp_path, "v1")
    assert _publish(out, src, stage) == -signal.SIGKILL
    assert _result_state(out) == "unfinished" and (out / JOURNAL).exists()
    names = ["m.mlpackage", "report.md", "manifest.json"]
    check_result_writable(out, names, force=False)  # resumable: no --force needed
    assert _publish(out, src) == 0
    assert verify_result(out) == [] and _result_state(out) == "complete:v1"
    man = json.loads((out / "manifest.json").read_text())
    assert [f["path"] for f in man["files"]] == [
        "m.mlpackage/Data/weights/weight.bin", "m.mlpackage/Manifest.json", "report.md"]
    assert sorted(os.listdir(out)) == [".notes.abcdefgh.tmp", "m.mlpackage", "manifest.json",
                                       "notes.txt", "report.md"]
    assert (out / "notes.txt").read_text() == "the user's"
    # a complete result is not overwritten without --force
    with pytest.raises(OutputError, match="already exists"):
        check_result_writable(out, names, force=False)
    # and a changed file no longer verifies
    (out / "m.mlpackage" / "Manifest.json").write_text("{}")
    assert verify_result(out) == ["m.mlpackage/Manifest.json does not match its sha256 in "
                                  "manifest.json"]


@pytest.mark.parametrize("stage", ["journaled", "artifact", "report"])
def test_force_over_an_old_result_never_mixes_them(tmp_path: Path, stage: str) -> None:
    out = tmp_path / "out"
    assert _publish(out, _folder(tmp_path, "old")) == 0
    assert _result_state(out) == "complete:old"
    assert _publish(out, _folder(tmp_path, "new"), stage, force=True) == -signal.SIGKILL
    # the old result stopped being one before any of its files changed
    assert _result_state(out) == "unfinished"
    assert _publish(out, tmp_path / "new") == 0  # resumed, even without --force
    assert _result_state(out) == "complete:new"
    assert not [n for n in os.listdir(out) if n.startswith(".")]  # no temp file, no journal


def test_a_second_publisher_checks_again_under_the_lock(tmp_path: Path) -> None:
    """Both runs passed the early check on an empty -o; the second to publish must not
    overwrite the first one's result without --force."""
    from edgesmith.fsutil import Publication, check_result_writable

    out = tmp_path / "out"
    check_result_writable(out, ["a.gguf", "manifest.json"], force=False)
    with Publication(out, ["a.gguf"], force=False) as pub:
        pub.write_text("a.gguf", "first")
        pub.commit({})
    with pytest.raises(OutputError, match="already exists"), \
            Publication(out, ["a.gguf"], force=False):
        pass
    assert (out / "a.gguf").read_text() == "first"
