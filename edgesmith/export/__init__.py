"""Exporters, registered by name: a recipe step ``export: NAME`` looks them up here."""

from __future__ import annotations

from typing import Any

from edgesmith.export.coreml import CoreMLExporter
from edgesmith.export.gguf import GGUFExporter
from edgesmith.export.hf_gptq import HFGPTQExporter
from edgesmith.export.litert import LiteRTExporter
from edgesmith.export.onnx import OnnxExporter

EXPORTERS: dict[str, Any] = {
    "gguf": GGUFExporter,
    "onnx": OnnxExporter,
    "hf-gptq": HFGPTQExporter,
    "litert": LiteRTExporter,
    "coreml": CoreMLExporter,
}
