"""Runners, registered by name; ``runner_for(path)`` picks one from the artifact's format."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
from edgesmith.bench.runners.torch import TorchRunner
from edgesmith.errors import ModelError

RUNNERS: dict[str, Any] = {
    "llama_cpp": LlamaCppRunner,
    "torch": TorchRunner,
}


def runner_for(path: Path) -> Any:
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return RUNNERS["llama_cpp"]()
    if path.is_dir() and (path / "config.json").exists():
        return RUNNERS["torch"]()
    raise ModelError(f"no runner for {path}", "pass a .gguf file or an HF model directory")
