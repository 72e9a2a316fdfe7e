"""Compression passes, registered by name: a recipe step ``NAME: {config}`` looks them up here.

Torch-side passes (kind "torch") take and return an in-memory HF model; format-side passes
(kind "format") take and return an Artifact.
"""

from __future__ import annotations

from typing import Any

from edgesmith.compress.awq import AWQPass
from edgesmith.compress.coreml_compress import CoreMLCompressPass
from edgesmith.compress.distill import DistillPass
from edgesmith.compress.gguf_quantize import GGUFQuantizePass
from edgesmith.compress.gptq import GPTQPass
from edgesmith.compress.litert_quantize import LiteRTQuantizePass
from edgesmith.compress.merge_lora import MergeLoRAPass
from edgesmith.compress.onnx_quantize import OnnxQuantizePass
from edgesmith.compress.prune import PrunePass

PASSES: dict[str, Any] = {
    "merge_lora": MergeLoRAPass,
    "prune": PrunePass,
    "distill": DistillPass,
    "awq": AWQPass,
    "gptq": GPTQPass,
    "gguf_quantize": GGUFQuantizePass,
    "onnx_quantize": OnnxQuantizePass,
    "litert_quantize": LiteRTQuantizePass,
    "coreml_compress": CoreMLCompressPass,
}
