"""Usage errors (a bad option value, a missing argument) are click's message and exit 2 with
any Typer, including those that vendor click as ``typer._click`` (not click's classes)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize(("args", "says"), [
    (["serve", "x.gguf", "--port", "0"], "Invalid value for '--port'"),
    (["doctor", "x", "--ctx", "0"], "Invalid value for '--ctx'"),
    (["compress"], "Missing argument"),
])
def test_usage_error_is_exit_2_not_an_internal_error(args: list[str], says: str) -> None:
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                       text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert p.returncode == 2, p.stderr
    assert says in p.stderr and "internal error" not in p.stderr
