"""What every pass, exporter and runner gets: the run context and the Artifact type."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

log = logging.getLogger("edgesmith")


@dataclass
class Artifact:
    """A file produced by an exporter or a format-side pass, with its metadata."""

    path: Path
    format: str  # "gguf", "onnx", ...
    meta: dict[str, Any] = field(default_factory=dict)


def make_progress(quiet: bool = False) -> Progress:
    """Rich progress bars on stderr (stdout is for --json)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=quiet,
        transient=False,
    )


@dataclass
class RunContext:
    """Carries output and cache dirs, calibration data, threads, progress and a logger."""

    out_dir: Path
    cache_dir: Path
    progress: Progress
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    force: bool = False
    calibration_text: str = ""
    logger: logging.Logger = log
    extras: dict[str, Any] = field(default_factory=dict)

    def task(self, description: str, total: float | None = None) -> Any:
        return self.progress.add_task(description, total=total)
