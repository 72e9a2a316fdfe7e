"""The browser pages' JavaScript: onnxruntime-web and @huggingface/transformers from npm.

The versions are pinned by the package.json and package-lock.json shipped beside this file.
They are installed once, with ``npm ci --ignore-scripts`` (no package's install script runs:
onnxruntime-node's would download a binary from outside the registry), into the cache folder
``npm/<hash of the two files>/``. The install runs in an owner-tagged temp folder that is
renamed into place only when npm succeeded, under a lock, so a killed install never looks
finished and two processes never install into the same folder.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError, ToolError
from edgesmith.fsutil import atomic_dir, cache_root, sweep_stale

SPEC_DIR = Path(__file__).parent / "npm"
SPEC_FILES = ("package.json", "package-lock.json")
DONE = ".edgesmith-npm-complete"
NPM_HINT = "install Node.js and npm (Debian: apt-get install -y npm) or set EDGESMITH_NPM"


class NpmMissing(EdgesmithError):
    """npm is needed to install the browser pages' JavaScript and is not on PATH."""


def lock_hash() -> str:
    """Hash of the shipped package.json and lockfile: the cache folder's name."""
    h = hashlib.sha256()
    for name in SPEC_FILES:
        h.update(name.encode() + b"\0" + (SPEC_DIR / name).read_bytes() + b"\0")
    return h.hexdigest()[:16]


def npm_executable() -> str:
    """The npm to run (EDGESMITH_NPM, else npm on PATH), or NpmMissing naming the fix."""
    env = os.environ.get("EDGESMITH_NPM")
    found = shutil.which(env) if env else shutil.which("npm")
    if not found:
        where = f"EDGESMITH_NPM={env} is not an executable" if env else "npm is not on PATH"
        raise NpmMissing(f"{where}: the browser pages need onnxruntime-web from npm", NPM_HINT)
    return found


def modules_dir(root: Path | None = None) -> Path:
    """Where the installed node_modules live (whether installed or not)."""
    return (root or cache_root() / "npm") / lock_hash() / "node_modules"


def installed(root: Path | None = None) -> bool:
    return (modules_dir(root) / DONE).is_file()


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_modules(root: Path | None = None, progress: Any = None) -> Path:
    """The node_modules folder of the pinned packages, installed first if needed."""
    root = root or cache_root() / "npm"
    if installed(root):
        return modules_dir(root)
    npm = npm_executable()
    with _locked(root):
        if installed(root):  # another process installed it while this one waited
            return modules_dir(root)
        sweep_stale(root)
        dest = root / lock_hash()
        task = progress.add_task("npm ci (onnxruntime-web, transformers.js)", total=None) \
            if progress is not None else None
        t0 = time.monotonic()
        with atomic_dir(dest) as tmp:
            for name in SPEC_FILES:
                shutil.copy(SPEC_DIR / name, tmp / name)
            _npm_ci(npm, tmp)
            (tmp / "node_modules" / DONE).write_text(f"{time.monotonic() - t0:.1f} s\n")
        if task is not None:
            progress.update(task, total=1, completed=1)
    return modules_dir(root)


def _npm_ci(npm: str, folder: Path) -> None:
    cmd = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    env = {**os.environ, "npm_config_update_notifier": "false"}
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, env=env,
                              timeout=1800)
    except subprocess.TimeoutExpired as exc:
        raise ToolError("npm ci did not finish in 30 minutes",
                        "check that the npm registry is reachable") from exc
    except OSError as exc:
        raise NpmMissing(f"cannot run {npm}: {exc}", NPM_HINT) from exc
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        why = " ".join(lines[-3:])[:400] if lines else f"exit code {proc.returncode}"
        raise ToolError(f"npm ci of the browser pages' packages failed: {why}",
                        "check that the npm registry is reachable (npm ping), then retry")
    if not (folder / "node_modules" / "onnxruntime-web" / "dist").is_dir():
        raise ToolError("npm ci finished without installing onnxruntime-web",
                        f"check the package files in {SPEC_DIR}")


def package_version(name: str) -> str:
    """The pinned version of ``name`` in the shipped lockfile ("unknown" if absent)."""
    lock = json.loads((SPEC_DIR / "package-lock.json").read_text())
    entry = lock.get("packages", {}).get(f"node_modules/{name}", {})
    return str(entry.get("version", "unknown"))
