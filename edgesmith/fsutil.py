"""Atomic outputs: write to a temp file in the destination directory, then rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgesmith.errors import OutputError


def cache_root() -> Path:
    """The cache directory (EDGESMITH_CACHE, else ~/.cache/edgesmith)."""
    env = os.environ.get("EDGESMITH_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "edgesmith"
    root.mkdir(parents=True, exist_ok=True)
    return root


def check_writable(dest: Path, force: bool) -> None:
    """Refuse to overwrite a user's file unless --force."""
    if dest.exists() and not force:
        raise OutputError(f"output {dest} already exists", "pass --force to overwrite it")


def disk_full_error(dest: Path) -> OutputError:
    return OutputError(f"disk full while writing {dest}",
                       "free space on that disk or choose another -o")


def _translate_os_error(exc: OSError, dest: Path) -> OutputError:
    if exc.errno == errno.ENOSPC:
        return disk_full_error(dest)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {dest}: {exc.strerror}", "choose a writable -o")
    return OutputError(f"cannot write {dest}: {exc}", "check the output path")


@contextlib.contextmanager
def atomic_path(dest: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it over ``dest`` only if the block succeeds.

    On any error (including KeyboardInterrupt) the temp file is removed and ``dest`` holds
    either its old content or nothing.
    """
    dest = Path(dest)
    if not force:
        check_writable(dest, force)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
    except OSError as exc:
        raise _translate_os_error(exc, dest) from exc
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _translate_os_error(exc, dest) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text_atomic(dest: Path, text: str, force: bool = True) -> None:
    with atomic_path(dest, force) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: Path, data: Any, force: bool = True) -> None:
    write_text_atomic(dest, json.dumps(data, indent=2, sort_keys=False) + "\n", force)


def copy_atomic(src: Path, dest: Path) -> None:
    """Copy ``src`` to ``dest`` through a temp file beside ``dest`` and a rename."""
    import shutil

    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def sha256_file(path: Path, chunk: int = 1 << 22, progress: Any = None,
                label: str | None = None) -> str:
    """sha256 of a file; with a rich ``progress``, a bar over its megabytes (big models take
    seconds to hash)."""
    h = hashlib.sha256()
    task = progress.add_task(f"sha256 {label or Path(path).name} (MB)",
                             total=round(Path(path).stat().st_size / 1e6)) \
        if progress is not None else None
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if task is not None:
                progress.advance(task, len(block) / 1e6)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
