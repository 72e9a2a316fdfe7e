"""Atomic outputs, temp files that name their owner, and results that appear all at once.

Files and folders. Every output is written to a temp path beside its destination and renamed
over it (``atomic_path`` for a file, ``atomic_dir`` for a folder such as an ONNX layout or an
``.mlpackage``): on any error the destination holds its old content or nothing.

Temp names carry their owner: ``.NAME.edgesmith-PID-START-RAND.tmp``, START being the owning
process's start time (clock ticks since boot on Linux), so a pid reused by a later process is
not mistaken for the owner. A temp path whose owner is gone (or a zombie) is stale; a kill -9
leaves such files, and they are swept: by every atomic write, in its destination directory,
and by ``compress`` in the cache at start (``sweep_cache``). A temp path of a live process is
never touched, and nothing without the ``edgesmith-PID-START`` tag is removed outside the cache.

Result directories (``Publication``, used by ``compress -o``). A result is several files (the
artifacts, report.md) plus manifest.json, and must appear all at once although the directory
may be a user's own, holding other files. The manifest is the commit record, written last: it
lists every file of the result with its size and sha256, so a result is complete exactly when
its manifest verifies (``verify_result``). Before anything is published, a journal
(``.edgesmith-publish.json``) names the files the run will write; then an older manifest is
removed (with --force, the old result stops being a result before any of its files changes),
then the files are published one by one, the manifest last, and the journal removed. A run
killed anywhere in between leaves a directory without a valid manifest plus the journal: the
same command then resumes without --force (it may overwrite the journaled names: edgesmith
wrote them), while any other existing file still needs --force. A second publisher waits on a
lock of the directory and checks again, so concurrent runs never interleave their files.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from edgesmith.errors import OutputError

JOURNAL = ".edgesmith-publish.json"
MANIFEST = "manifest.json"
# A temp path written by edgesmith, with its owner; ".old" is a folder moved aside to be
# replaced (atomic_dir), deleted right after the swap.
_OWNED = re.compile(r"^\..*\.edgesmith-(?P<pid>\d+)-(?P<start>\d+)-[0-9a-f]+\.(?:tmp|old)$")
# tempfile.mkstemp's names, as edgesmith <= 0.1 used them: no owner, so only an old one in the
# cache is swept (a live writer keeps its file's mtime fresh).
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
LEGACY_AGE_S = 24 * 3600
_CHUNK = 1 << 22


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


# --- temp paths that name their owner -------------------------------------------------------

def _process_state(pid: int) -> tuple[bool, int | None]:
    """(running, start time) of ``pid``; running is False for a gone or zombie process, the
    start time None when it cannot be read (then only the pid is known)."""
    if pid <= 0:
        return False, None
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        import psutil

        return psutil.pid_exists(pid), None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, None
    except PermissionError:
        pass  # it exists, owned by another user
    except OSError:
        return True, None
    if sys.platform.startswith("linux"):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except FileNotFoundError:
            return True, None  # hidden (hidepid) or just gone: assume the owner lives
        except OSError:
            return True, None
        fields = stat[stat.rindex(b")") + 2:].split()  # the name in (...) may hold spaces
        return fields[0] not in (b"Z", b"X"), int(fields[19])  # state; starttime (field 22)
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False, None
        return True, round(proc.create_time() * 1000)
    except Exception:  # psutil missing, no permission, or gone meanwhile
        return True, None


_OWNER: dict[int, str] = {}


def _owner() -> str:
    """This process's tag, PID-START (START 0: unknown, then the pid alone identifies it)."""
    pid = os.getpid()  # looked up per call: a forked child has its own
    if pid not in _OWNER:
        _OWNER[pid] = f"{pid}-{_process_state(pid)[1] or 0}"
    return _OWNER[pid]


def owner_alive(pid: int, start: int) -> bool:
    """Whether the process that made a temp path tagged PID-START still runs."""
    running, actual = _process_state(pid)
    if not running:
        return False
    return start == 0 or actual is None or actual == start


def temp_path(dest: Path, suffix: str = "tmp") -> Path:
    """A fresh owner-tagged name beside ``dest`` (nothing is created)."""
    dest = Path(dest)
    return dest.parent / (f".{dest.name[:120]}.edgesmith-{_owner()}-{secrets.token_hex(4)}"
                          f".{suffix}")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is an edgesmith temp path (owner-tagged or, in the cache, legacy)."""
    return bool(_OWNED.match(name) or _LEGACY.match(name))


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        return False
    return not (path.exists() or path.is_symlink())


def sweep_stale(directory: Path, depth: int = 0,
                legacy_age_s: float | None = None) -> list[Path]:
    """Remove the temp paths of dead owners in ``directory`` (and ``depth`` levels of real
    subdirectories below it); legacy untagged ones too when older than ``legacy_age_s``.
    Returns what was removed. Never follows a symlink; errors are ignored (best effort)."""
    removed: list[Path] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        path = Path(entry.path)
        owned = _OWNED.match(entry.name)
        try:
            if owned:
                if not owner_alive(int(owned["pid"]), int(owned["start"])) and _remove(path):
                    removed.append(path)
            elif legacy_age_s is not None and _LEGACY.match(entry.name):
                st = entry.stat(follow_symlinks=False)
                if now - st.st_mtime > legacy_age_s and _remove(path):
                    removed.append(path)
            elif depth > 0 and entry.is_dir(follow_symlinks=False):
                removed += sweep_stale(path, depth - 1, legacy_age_s)
        except OSError:
            continue
    return removed


def sweep_cache(root: Path | None = None) -> list[Path]:
    """Sweep the cache's stale temp files: its root and two levels below (runs/FP, hf/FP, ...),
    not the extracted llama.cpp sources deeper down."""
    return sweep_stale(root or cache_root(), depth=2, legacy_age_s=LEGACY_AGE_S)


def _new_temp(dest: Path, directory: bool) -> Path:
    for _ in range(100):
        tmp = temp_path(dest)
        try:
            if directory:
                tmp.mkdir(mode=0o700)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temp name", str(dest))


# --- atomic files and folders ---------------------------------------------------------------

def _begin(dest: Path, directory: bool) -> Path:
    """The owned temp file or folder beside ``dest`` (its directory made, dead runs' temp
    files swept first); an OSError is the user's OutputError."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(dest.parent)
        return _new_temp(dest, directory=directory)
    except OSError as exc:
        raise _translate_os_error(exc, dest) from exc


@contextlib.contextmanager
def atomic_path(dest: Path, force: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``dest``; rename it over ``dest`` only if the block succeeds.

    On any error (including KeyboardInterrupt) the temp file is removed and ``dest`` holds
    either its old content or nothing; a kill -9 leaves the temp file, which the next atomic
    write into that directory removes (its owner is dead).
    """
    dest = Path(dest)
    if not force:
        check_writable(dest, force)
    tmp = _begin(dest, directory=False)
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


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temp directory beside ``dest``; it replaces ``dest`` if the block succeeds.

    A folder cannot be renamed over a non-empty one: the old folder is moved aside (an owned
    ``.old`` name), the new one renamed in, the old one deleted. A kill between the two renames
    leaves ``dest`` absent and the ``.old`` folder to the next sweep.
    """
    dest = Path(dest)
    tmp = _begin(dest, directory=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _replace(tmp, dest)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _translate_os_error(exc, dest) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(src: Path, dest: Path) -> None:
    if not (dest.is_dir() and not dest.is_symlink()):
        if src.is_dir() and (dest.exists() or dest.is_symlink()):
            dest.unlink()
        os.replace(src, dest)
        return
    aside = temp_path(dest, "old")
    os.rename(dest, aside)
    os.rename(src, dest)
    shutil.rmtree(aside, ignore_errors=True)


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
    """Copy a file or folder ``src`` to ``dest`` through a temp path beside it and a rename."""
    if Path(src).is_dir():
        with atomic_dir(dest) as tmp:
            _copy_tree_hashed(Path(src), tmp, tmp.name, None)
    else:
        with atomic_path(dest) as tmp:
            _copy_hashed(Path(src), tmp, None)


def _fsync(path: Path, directory: bool = False) -> None:
    """Flush a file (or a directory's entries) to disk, so that after a power cut the commit
    record never outlives the files it names."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if directory:
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:  # some filesystems cannot fsync a directory
            raise
    finally:
        os.close(fd)


def _copy_hashed(src: Path, dst: Path, task: Any) -> str:
    """Copy ``src`` into ``dst`` and return the sha256 of the bytes written (one read)."""
    h = hashlib.sha256()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        while block := fi.read(_CHUNK):
            h.update(block)
            fo.write(block)
            if task is not None:
                task(len(block))
        fo.flush()
        os.fsync(fo.fileno())
    return h.hexdigest()


def _tree_files(root: Path) -> list[Path]:
    """Every file of a folder output, sorted; a link or special file is refused."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            if p.is_symlink() or not (p.is_dir() or p.is_file()):
                raise OutputError(f"{p} is a link or special file", "an output folder may "
                                  "hold only regular files and folders")
        files += [Path(dirpath, n) for n in sorted(filenames)]
    return files


def _copy_tree_hashed(src: Path, dst: Path, prefix: str, task: Any) -> list[dict[str, Any]]:
    entries = []
    for f in _tree_files(src):
        rel = f.relative_to(src)
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        digest = _copy_hashed(f, dst / rel, task)
        entries.append({"path": str(PurePosixPath(prefix, *rel.parts)),
                        "size_bytes": f.stat().st_size, "sha256": digest})
    return entries


def tree_sha256(entries: list[dict[str, Any]], prefix: str) -> str:
    """The sha256 of a folder output: over its files' relative paths and sha256s, sorted."""
    lines = sorted(f"{PurePosixPath(e['path']).relative_to(prefix)}\0{e['sha256']}\n"
                   for e in entries)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def sha256_file(path: Path, chunk: int = _CHUNK, progress: Any = None,
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


# --- result directories: the manifest is the commit record ----------------------------------

def _journal_names(out_dir: Path) -> set[str]:
    """The names an unfinished publication (of a run that died) claimed, else nothing."""
    try:
        data = json.loads((Path(out_dir) / JOURNAL).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict) or data.get("schema") != "edgesmith.publish" \
            or not isinstance(data.get("files"), list):
        return set()
    return {n for n in data["files"] if isinstance(n, str)}


def check_result_writable(out_dir: Path, names: Iterable[str], force: bool) -> None:
    """Refuse, unless --force, an existing file among ``names`` in ``out_dir`` that is not
    part of an unfinished edgesmith result (one its journal names)."""
    if force:
        return
    claimed = _journal_names(out_dir)
    for name in names:
        p = Path(out_dir) / name
        if (p.exists() or p.is_symlink()) and name not in claimed:
            raise OutputError(f"output {p} already exists", "pass --force to overwrite it")


def _lock_dir(path: Path) -> int | None:
    """An exclusive lock on a directory (released when the fd closes or the process dies)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # a filesystem without flock
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Publication:
    """Publish a result into ``out_dir`` so that it appears all at once.

    ``with Publication(out, names, force) as pub:`` journals ``names`` (+ the manifest) and
    removes an older manifest; ``pub.copy`` and ``pub.write_text`` publish the files (each
    atomically, recording size and sha256); ``pub.commit(manifest)`` adds the file list to
    the manifest and writes it last. Leaving the block without a commit leaves the directory
    unfinished, and the same command resumes it.
    """

    def __init__(self, out_dir: Path, names: Iterable[str], force: bool,
                 manifest: str = MANIFEST) -> None:
        self.out_dir = Path(out_dir)
        self.manifest = manifest
        self.names = list(dict.fromkeys([*names, manifest]))
        self.force = force
        self.files: list[dict[str, Any]] = []
        self.committed = False
        self._lock: int | None = None

    def __enter__(self) -> Publication:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _translate_os_error(exc, self.out_dir) from exc
        self._lock = _lock_dir(self.out_dir)
        try:
            # again, under the lock: another run may have published here since the first check
            check_result_writable(self.out_dir, self.names, self.force)
            claimed = sorted(_journal_names(self.out_dir) | set(self.names))
            self._write(JOURNAL, json.dumps({"schema": "edgesmith.publish", "owner": _owner(),
                                             "files": claimed}, indent=2) + "\n")
            try:
                (self.out_dir / self.manifest).unlink(missing_ok=True)
            except OSError as exc:
                raise _translate_os_error(exc, self.out_dir / self.manifest) from exc
            _fsync(self.out_dir, directory=True)
        except BaseException:
            self._unlock()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _check(self, name: str) -> Path:
        assert name in self.names and name != self.manifest, f"{name} was not journaled"
        return self.out_dir / name

    def _write(self, name: str, text: str) -> str:
        data = text.encode("utf-8")
        with atomic_path(self.out_dir / name) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return hashlib.sha256(data).hexdigest()

    def write_text(self, name: str, text: str) -> str:
        """Publish a text file; returns its sha256."""
        self._check(name)
        digest = self._write(name, text)
        self.files.append({"path": name, "size_bytes": len(text.encode("utf-8")),
                           "sha256": digest})
        return digest

    def copy(self, src: Path, name: str, progress: Any = None) -> str:
        """Publish a copy of ``src`` (a file or a folder) as ``name``, hashing while copying;
        returns its sha256 (a folder's: ``tree_sha256`` of its files)."""
        dest, src = self._check(name), Path(src)
        task = None
        if progress is not None:
            total = sum(f.stat().st_size for f in _tree_files(src)) if src.is_dir() \
                else src.stat().st_size
            tid = progress.add_task(f"copy + sha256 {name} (MB)", total=round(total / 1e6))
            task = lambda n: progress.advance(tid, n / 1e6)  # noqa: E731
        if src.is_dir():
            with atomic_dir(dest) as tmp:
                entries = _copy_tree_hashed(src, tmp, name, task)
            self.files += entries
            return tree_sha256(entries, name)
        with atomic_path(dest) as tmp:
            digest = _copy_hashed(src, tmp, task)
        self.files.append({"path": name, "size_bytes": src.stat().st_size, "sha256": digest})
        return digest

    def commit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write ``manifest`` (with ``files``: every published file's path, size and sha256)
        as the last file: from now on the directory is a complete result."""
        manifest["files"] = sorted(self.files, key=lambda e: e["path"])
        self._write(self.manifest, json.dumps(manifest, indent=2, sort_keys=False) + "\n")
        _fsync(self.out_dir, directory=True)
        (self.out_dir / JOURNAL).unlink(missing_ok=True)
        self.committed = True
        return manifest


def verify_result(out_dir: Path, manifest: str = MANIFEST) -> list[str]:
    """What keeps ``out_dir`` from being a complete result; [] when its manifest lists files
    that all exist with the listed size and sha256."""
    out_dir = Path(out_dir)
    try:
        man = json.loads((out_dir / manifest).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"no {manifest}: unfinished (re-run the same command to finish it)"]
    except (OSError, ValueError) as exc:
        return [f"{manifest} is unreadable: {exc}"]
    files = man.get("files") if isinstance(man, dict) else None
    if not isinstance(files, list) or not files:
        return [f"{manifest} lists no files"]
    problems = []
    for e in files:
        rel = PurePosixPath(str(e.get("path", ""))) if isinstance(e, dict) else PurePosixPath()
        if not rel.parts or rel.is_absolute() or ".." in rel.parts:
            problems.append(f"bad file entry {e!r}")
            continue
        p = out_dir.joinpath(*rel.parts)
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel} is missing")
        elif p.stat().st_size != e.get("size_bytes") or sha256_file(p) != e.get("sha256"):
            problems.append(f"{rel} does not match its sha256 in {manifest}")
    return problems
