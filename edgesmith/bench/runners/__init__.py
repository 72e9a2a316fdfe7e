"""Runners, registered by name; ``runner_for(path)`` picks one from the artifact on disk and
``for_format(fmt)`` from an artifact's format (what ``compress`` verifies with)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgesmith.bench.runners.coreml import CoreMLRunner
from edgesmith.bench.runners.litert import LiteRTRunner
from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
from edgesmith.bench.runners.onnxruntime import OnnxRuntimeRunner
from edgesmith.bench.runners.torch import TorchRunner
from edgesmith.errors import ModelError

RUNNERS: dict[str, Any] = {
    "llama_cpp": LlamaCppRunner,
    "onnxruntime": OnnxRuntimeRunner,
    "torch": TorchRunner,
    "litert": LiteRTRunner,
    "coreml": CoreMLRunner,
}
FORMAT_RUNNERS = {"gguf": "llama_cpp", "onnx": "onnxruntime", "hf": "torch", "litert": "litert",
                  "coreml": "coreml"}


def for_format(fmt: str) -> Any:
    if fmt not in FORMAT_RUNNERS:
        raise ModelError(f"no runner for the {fmt} format", "this is a bug: please report it")
    return RUNNERS[FORMAT_RUNNERS[fmt]]()


def runner_for(path: Path) -> Any:
    path = Path(path)
    if (path.is_file() and path.suffix in (".tflite", ".litertlm")) or \
            (path.is_dir() and (path / "model.tflite").is_file()):
        return RUNNERS["litert"]()
    if path.is_dir() and (path.suffix == ".mlpackage" or (path / "model.mlpackage").is_dir()):
        return RUNNERS["coreml"]()
    if path.is_file() and path.suffix == ".gguf":
        return RUNNERS["llama_cpp"]()
    if (path.is_file() and path.suffix == ".onnx") or (path.is_dir() and (path / "onnx").is_dir()):
        return RUNNERS["onnxruntime"]()
    if path.is_dir() and (path / "config.json").exists():
        return RUNNERS["torch"]()
    raise ModelError(f"no runner for {path}",
                     "pass a .gguf file, an ONNX model folder, a LiteRT .tflite (or its folder) "
                     "or an HF model directory")
