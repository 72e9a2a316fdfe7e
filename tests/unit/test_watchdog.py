"""The test suite's subprocess watchdog (conftest.run_watched): a slow but healthy run passes
however long it takes, a hung one fails after its idle window, with its process group killed."""

from __future__ import annotations

import re
import sys
import time

import psutil
import pytest

# Busy for twice the idle window without printing anything: slow, silent, healthy.
_BUSY = "import time\nt = time.monotonic()\nwhile time.monotonic() - t < {s}:\n    sum(range(1000))"
# Prints now and then, using almost no CPU: a run waiting on something that does report.
_CHATTY = "import time\nfor i in range({n}):\n    print(i, flush=True)\n    time.sleep(1)"
# Hung: a child in its process group, then blocked forever.
_HUNG = ("import subprocess, sys, time\n"
         "c = subprocess.Popen(['sleep', '1000'])\n"
         "print('child', c.pid, file=sys.stderr, flush=True)\n"
         "time.sleep(1000)")


def test_a_slow_silent_busy_run_passes(watched) -> None:  # type: ignore[no-untyped-def]
    p = watched([sys.executable, "-c", _BUSY.format(s=16)], idle_s=8)
    assert p.returncode == 0, p.stderr


def test_a_slow_run_that_prints_passes(watched) -> None:  # type: ignore[no-untyped-def]
    p = watched([sys.executable, "-c", _CHATTY.format(n=8)], idle_s=3)
    assert p.returncode == 0 and p.stdout.split() == [str(i) for i in range(8)]


def test_a_hang_fails_and_its_process_group_is_killed(watched) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="a hang") as exc:
        watched([sys.executable, "-c", _HUNG], idle_s=3)
    assert time.monotonic() - t0 < 120  # detected after its idle window, not at a ceiling
    found = re.search(r"child (\d+)", str(exc.value))
    assert found, str(exc.value)
    pid = int(found[1])
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid) and time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    assert not alive, "the hung run's child survived"
