"""The manifest written next to compress outputs (schema ``edgesmith.manifest``, versioned).

It records what was run (command line, tool versions, the recipe as run, the input model's
hash) and what came out (each artifact's sha256, size, per-tensor types, llama.cpp's
fallbacks, quality against the reference, gate results).
"""

from __future__ import annotations

import json
import platform
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from edgesmith import __version__
from edgesmith.errors import ResultsError

SCHEMA = "edgesmith.manifest"
SCHEMA_VERSION = 1
_TOOLS = ("llama-cpp-python", "gguf", "torch", "transformers", "numpy")


def tool_versions() -> dict[str, str]:
    versions = {"edgesmith": __version__, "python": platform.python_version()}
    for dist in _TOOLS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def new(command: list[str] | None = None) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else sys.argv,
        "tool_versions": tool_versions(),
    }


def read(path: Path) -> dict[str, Any]:
    """Read a manifest; reject a corrupt file or an unknown schema version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ResultsError(f"cannot read manifest {path}: {exc}", "re-run compress") from exc
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{path} is not an edgesmith manifest", "pass a manifest.json")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultsError(
            f"{path} has manifest schema version {data.get('schema_version')}, this edgesmith "
            f"reads version {SCHEMA_VERSION}", "use the edgesmith version that wrote it")
    return data
