"""Atomic outputs: never a half-written file, never an overwrite without --force."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from edgesmith.errors import OutputError
from edgesmith.fsutil import atomic_path, check_writable, write_text_atomic


def test_error_leaves_old_content_and_no_temp(tmp_path: Path) -> None:
    dest = tmp_path / "a.txt"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert dest.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_interrupt_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "b.txt"
    with pytest.raises(KeyboardInterrupt), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_refuses_overwrite_without_force(tmp_path: Path) -> None:
    dest = tmp_path / "c.txt"
    dest.write_text("mine")
    with pytest.raises(OutputError, match="already exists.*--force"):
        check_writable(dest, force=False)
    with pytest.raises(OutputError):
        write_text_atomic(dest, "new", force=False)
    write_text_atomic(dest, "new", force=True)
    assert dest.read_text() == "new"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_is_a_clear_error(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], check=True)
    try:
        with pytest.raises(OutputError, match="disk full") as exc:
            write_text_atomic(mnt / "big.txt", "x" * 1_000_000)
        assert "free space" in exc.value.one_line()
        assert os.listdir(mnt) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
