"""The doctor's checks for the ONNX (browser) format, from headers only.

Can the exporter take the architecture, is there a fast tokenizer (the page loads
tokenizer.json), and does the int4 model fit the browser: its external-data file is fetched
into one ArrayBuffer and its largest weight into one WebGPU buffer.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from edgesmith import models
from edgesmith.doctor import Check

# bytes per parameter of the q4 export: int4 codes + fp32 scales and packed zeros per block of
# 32 (4 + 32/32 + 4/32 bits) in the Linears, int8 codes + scale + zero for the embedding
Q4_BYTES_PER_PARAM = (4 + 1 + 0.125) / 8
EMB_BYTES_PER_PARAM = (8 + 1 + 0.25) / 8
GGUF_TO_HF = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM",
              "phi3": "Phi3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3": "Gemma3ForCausalLM"}


def checks(ref: models.ModelRef, target: Any, shapes: dict[str, list[int]] | None) -> list[Check]:
    from edgesmith.export.onnx import EXPORTABLE

    out = []
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime")
               if importlib.util.find_spec(m) is None]
    out.append(Check("onnx", "runtime", "fail", f"{', '.join(missing)} not installed",
                     "pip install 'edgesmith[onnx]'") if missing else
               Check("onnx", "runtime", "ok", "onnxruntime, onnx and onnxscript installed"))
    arch = ref.architecture()
    if ref.kind == "gguf":  # the GGUF is dequantized into this HF class first
        arch = GGUF_TO_HF.get(arch, arch)
    out.append(Check("onnx", "exporter", "ok", f"{arch}: torch.onnx (dynamo) with a KV cache")
               if arch in EXPORTABLE else
               Check("onnx", "exporter", "fail", f"the ONNX exporter does not cover {arch}",
                     f"it exports: {', '.join(EXPORTABLE)}; or pick a GGUF target"))
    if ref.kind == "hf" and not (ref.path / "tokenizer.json").exists():
        out.append(Check("onnx", "tokenizer", "fail", "no tokenizer.json (a fast tokenizer)",
                         "save the model's fast tokenizer (tokenizer.save_pretrained) beside it"))
    if target is None or target.browser is None:
        return out
    fit = browser_fit(ref, target, shapes)
    gb = lambda x: f"{x / 1e9:.2f} GB"  # noqa: E731
    if not fit["fits_array_buffer"]:
        out.append(Check("onnx", "browser fit", "fail",
                         f"the q4 weights ({gb(fit['q4_bytes'])}) exceed one ArrayBuffer "
                         f"({gb(fit['max_array_buffer_bytes'])}) in {target.name}",
                         "use a smaller model, or prune it first (a prune step)"))
    elif not fit["fits_gpu_buffer"]:
        out.append(Check("onnx", "browser fit", "fail",
                         f"the largest weight ({gb(fit['largest_tensor_bytes'])}) exceeds the "
                         f"WebGPU buffer limit ({gb(fit['max_buffer_bytes'])})",
                         "use a smaller model"))
    else:
        out.append(Check("onnx", "browser fit", "ok",
                         f"q4 weights about {gb(fit['q4_bytes'])} (limit "
                         f"{gb(fit['max_array_buffer_bytes'])}), largest tensor "
                         f"{gb(fit['largest_tensor_bytes'])} (WebGPU buffer limit "
                         f"{gb(fit['max_buffer_bytes'])})"))
    return out


def browser_fit(ref: models.ModelRef, target: Any,
                shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """The q4 export's size against the browser's limits: the external-data file must fit in
    one ArrayBuffer, the largest weight in one WebGPU buffer (headers only)."""
    if shapes is None and ref.kind == "gguf":
        from edgesmith.gguf_file import read_header

        shapes = {("embed_tokens.weight" if t.name == "token_embd.weight" else t.name):
                  [int(d) for d in t.shape] for t in read_header(ref.path).tensors}
    elif shapes is None:
        from edgesmith.doctor import _safetensors_shapes

        shapes = _safetensors_shapes(ref.path)
    shapes = shapes or {}
    emb = max((n for n in shapes if n.endswith("embed_tokens.weight")),
              key=lambda n: _prod(shapes[n]), default=None)
    n_emb = _prod(shapes[emb]) if emb else 0
    n_rest = sum(_prod(s) for n, s in shapes.items() if n != emb and len(s) == 2)
    total = n_emb * EMB_BYTES_PER_PARAM + n_rest * Q4_BYTES_PER_PARAM
    largest = max([n_emb * EMB_BYTES_PER_PARAM,
                   *(_prod(s) * Q4_BYTES_PER_PARAM for n, s in shapes.items() if n != emb)],
                  default=0)
    b = target.browser
    return {"q4_bytes": int(total), "largest_tensor_bytes": int(largest),
            "max_array_buffer_bytes": b.max_array_buffer_bytes,
            "max_buffer_bytes": b.max_buffer_bytes,
            "fits_array_buffer": total <= b.max_array_buffer_bytes,
            "fits_gpu_buffer": largest <= b.max_buffer_bytes, "shader_f16": b.shader_f16}


def _prod(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
