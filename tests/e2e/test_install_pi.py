"""install-pi.sh on this Debian machine: into a temp prefix without systemd, twice (the second
run changes nothing), then the installed server answers; --dry-run and --uninstall."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from edgesmith.models import builtin_path

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "edgesmith/device_server/install/install-pi.sh"
KEY = "install-test-key-42"
STEPS = ("apt", "directories", "venv", "llama-cpp-python", "requirements", "edgesmith",
         "model", "api-key", "settings", "launcher", "service")
PI5_FEATURES = ("fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
                "lrcpc dcpop asimddp")
PI4_FEATURES = "fp asimd evtstrm crc32 cpuid"


def install(*args: str, env: dict[str, str] | None = None,
            timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def step_states(out: str) -> dict[str, str]:
    """{step: "changed" | "unchanged" | "would change"} from the script's report lines."""
    states = {}
    for line in out.splitlines():
        parts = line.split(None, 1)
        if len(parts) == 2 and parts[0] in STEPS:
            states[parts[0]] = parts[1].split(":", 1)[0].strip()
    return states


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under root with its size, mtime and mode: any change shows."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, method: str, path: str, body: dict[str, Any] | None = None,
        key: str | None = None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        conn.request(method, path, body=json.dumps(body) if body else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_script_is_shellcheck_clean() -> None:
    exe = shutil.which("shellcheck")
    assert exe, "Debian's shellcheck is needed: apt-get install shellcheck"
    p = subprocess.run([exe, "-x", "--severity=style", str(SCRIPT)], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stdout
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert install("--help").stdout.count("--") > 15


@pytest.mark.parametrize(("arch", "features", "expected"), [
    ("aarch64", PI5_FEATURES, "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"),
    ("aarch64", PI4_FEATURES, "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8-a"),
    ("x86_64", "", "-DGGML_NATIVE=ON '-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
                   "'-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'"),
])
def test_cmake_args_follow_the_cpu(tmp_path: Path, arch: str, features: str,
                                   expected: str) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: {features}\n"
                       "CPU implementer\t: 0x41\n")
    p = install("--print-cmake-args", env={"EDGESMITH_ARCH": arch,
                                           "EDGESMITH_CPUINFO": str(cpuinfo)})
    assert p.returncode == 0 and p.stdout.strip() == expected, p.stderr
    p = install("--print-cmake-args", env={"EDGESMITH_ARCH": "armv7l"})
    assert p.returncode == 2 and "64-bit" in p.stderr


def test_unit_is_hardened_and_valid(tmp_path: Path) -> None:
    prefix = tmp_path / "opt"
    p = install("--prefix", str(prefix), "--print-unit")
    assert p.returncode == 0, p.stderr
    unit = p.stdout
    assert "@" not in unit.replace("@system-service", "").replace("~@privileged", "")
    for line in (f"ExecStart={prefix}/bin/edgesmith-server", "Restart=on-failure",
                 "User=edgesmith", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", f"ReadOnlyPaths={prefix}",
                 "CapabilityBoundingSet=", "WantedBy=multi-user.target"):
        assert line in unit.splitlines(), line
    analyze = shutil.which("systemd-analyze")
    assert analyze, "Debian's systemd is needed (make sysdeps installs it)"
    (prefix / "bin").mkdir(parents=True)
    (prefix / "bin/edgesmith-server").write_text("#!/bin/sh\n")
    (prefix / "bin/edgesmith-server").chmod(0o755)
    path = tmp_path / "edgesmith.service"
    path.write_text(unit)
    v = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
    assert v.returncode == 0 and "edgesmith.service" not in v.stderr, v.stderr
    # systemd's own exposure score, 0 (locked down) .. 100; 30 or less is "OK"
    s = subprocess.run([analyze, "security", "--offline=yes", "--threshold=30", str(path)],
                       capture_output=True, text=True)
    assert s.returncode == 0, s.stdout[-2000:]


def test_dry_run_on_a_fresh_prefix_changes_nothing(tmp_path: Path) -> None:
    prefix = tmp_path / "fresh"
    p = install("--prefix", str(prefix), "--no-systemd", "--skip-apt", "--dry-run", "--model",
                str(builtin_path("smollm2-135m")))
    assert p.returncode == 0, p.stderr
    states = step_states(p.stdout)
    assert states["venv"] == "would change" and states["model"] == "would change"
    assert "nothing was changed" in p.stdout and not prefix.exists()


def test_dry_run_without_root_reports_missing_apt_packages() -> None:
    """--dry-run needs no root: missing apt packages (here a dpkg-query that finds none) are
    reported as 'would change' instead of failing."""
    import tempfile

    shim = Path(tempfile.mkdtemp(prefix="es-shim-"))  # reachable by the unprivileged user
    try:
        shim.chmod(0o755)
        (shim / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
        (shim / "dpkg-query").chmod(0o755)
        path = f"{shim}:{os.environ['PATH']}"
        cmd = ["env", f"PATH={path}", "bash", str(SCRIPT), "--prefix", str(shim / "p"),
               "--no-systemd", "--dry-run", "--model", str(builtin_path("smollm2-135m"))]
        if os.geteuid() == 0:  # run it as an unprivileged user
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        assert step_states(p.stdout)["apt"] == "would change", p.stdout
        assert not (shim / "p").exists()
        # without --dry-run, a non-root run stops at once, naming the fix
        p = subprocess.run([c for c in cmd if c != "--dry-run"], capture_output=True,
                           text=True, timeout=300)
        assert p.returncode != 0 and "run as root or pass --skip-apt" in p.stderr, p.stderr
    finally:
        shutil.rmtree(shim, ignore_errors=True)


def test_bad_options_fail_in_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.gguf"
    notes.write_text("not a model")
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    for args, message in [
        (("--bogus",), "unknown option"),
        (("--prefix", str(tmp_path / "p"), "--no-systemd", "--skip-apt"), "pass --model"),
        (("--prefix", str(tmp_path / "p"), "--no-systemd", "--model", str(notes)),
         "not a GGUF"),
        (("--prefix", str(tmp_path / "p"), "--no-systemd", "--port", "99999", "--model",
          str(builtin_path("smollm2-135m"))), "--port"),
        (("--prefix", "/usr", "--uninstall", "--no-systemd"), "refusing --prefix"),
        (("--prefix", str(other), "--uninstall", "--no-systemd"), "not made by this script"),
    ]:
        p = install(*args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert (other / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "p").exists()


def test_install_twice_serve_uninstall(tmp_path: Path) -> None:
    prefix = tmp_path / "edgesmith"
    model = builtin_path("smollm2-135m")
    key = tmp_path / "key.txt"
    key.write_text(KEY + "\n")
    port = free_port()

    def opts(port: int, with_key: bool = True) -> list[str]:
        out = ["--prefix", str(prefix), "--no-systemd", "--skip-apt", "--model", str(model),
               "--port", str(port), "--threads", "1", "--ctx", "512"]
        if os.environ.get("EDGESMITH_WHEELS"):  # make's llama-cpp-python wheel, same CMAKE_ARGS
            out += ["--pip-args", f"--find-links {os.environ['EDGESMITH_WHEELS']}"]
        return [*out, "--api-key-file", str(key)] if with_key else out

    args = opts(port)
    first = install(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    states = step_states(first.stdout)
    assert set(states) == set(STEPS), first.stdout
    for s in ("directories", "venv", "edgesmith", "model", "api-key", "settings", "launcher"):
        assert states[s] == "changed", (s, first.stdout)
    installed = prefix / "models" / model.name
    assert installed.read_bytes() == model.read_bytes()
    assert (prefix / "etc/api-key").stat().st_mode & 0o777 == 0o600
    # a device server does not need the compress side
    no_torch = subprocess.run([str(prefix / "venv/bin/python"), "-c", "import torch"],
                              capture_output=True)
    assert no_torch.returncode != 0

    before = snapshot(prefix)
    second = install(*args, timeout=300)
    assert second.returncode == 0, second.stderr
    assert set(step_states(second.stdout).values()) == {"unchanged"}, second.stdout
    assert second.stdout.strip().endswith("nothing changed")
    assert snapshot(prefix) == before

    dry = install(*args, "--dry-run", timeout=300)
    assert dry.returncode == 0 and set(step_states(dry.stdout).values()) == {"unchanged"}
    assert snapshot(prefix) == before

    # one setting changed: only the settings file changes
    port = free_port()
    third = install(*opts(port), timeout=300)
    assert third.returncode == 0, third.stderr
    assert {s for s, v in step_states(third.stdout).items() if v != "unchanged"} == {
        "settings"}, third.stdout

    # a damaged model is noticed (its sha256) and copied again
    with open(installed, "r+b") as f:
        f.seek(5000)
        byte = f.read(1)
        f.seek(5000)
        f.write(bytes([byte[0] ^ 0xFF]))
    fourth = install(*opts(port, with_key=False), timeout=300)  # the installed key is kept
    assert step_states(fourth.stdout)["model"] == "changed", fourth.stdout
    assert step_states(fourth.stdout)["api-key"] == "unchanged"
    assert installed.read_bytes() == model.read_bytes()

    # the installed server, started the way systemd starts it, answers
    log = tmp_path / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([str(prefix / "bin/edgesmith-server")], stdout=f,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                status, health = get(port, "GET", "/health")
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.3)
        assert status == 200 and health["model_loaded"] and health["threads"] == 1
        assert health["n_ctx"] == 512
        assert get(port, "POST", "/generate", {"prompt": "Hi", "max_tokens": 2})[0] == 401
        status, out = get(port, "POST", "/generate", {"prompt": "Hi", "max_tokens": 2}, KEY)
        assert status == 200 and out["usage"]["completion_tokens"] <= 2
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()

    # with a key the server listened on every interface; removing the key takes it back to
    # loopback (a keyless server on 0.0.0.0 only when --host says so)
    env_file = prefix / "etc/edgesmith.env"
    assert "EDGESMITH_HOST=0.0.0.0" in env_file.read_text()
    fifth = install(*opts(port, with_key=False), "--no-api-key", timeout=300)
    assert fifth.returncode == 0, fifth.stdout + fifth.stderr
    settings = env_file.read_text()
    assert "EDGESMITH_HOST=127.0.0.1" in settings and not (prefix / "etc/api-key").exists()
    sixth = install(*opts(port, with_key=False), "--no-api-key", "--host", "0.0.0.0",
                    timeout=300)
    assert sixth.returncode == 0 and "EDGESMITH_HOST=0.0.0.0" in env_file.read_text()

    p = install("--prefix", str(prefix), "--no-systemd", "--uninstall", "--dry-run")
    assert p.returncode == 0 and prefix.exists() and "would change" in p.stdout
    p = install("--prefix", str(prefix), "--no-systemd", "--uninstall")
    assert p.returncode == 0 and not prefix.exists(), p.stdout + p.stderr
    p = install("--prefix", str(prefix), "--no-systemd", "--uninstall")
    assert p.returncode == 0 and p.stdout.strip().endswith("nothing changed")
