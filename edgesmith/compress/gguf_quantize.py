"""Format-side pass: quantize a GGUF with llama.cpp's quantizer, in process.

llama-cpp-python exposes ``llama_model_quantize`` (the code behind llama-quantize), including
its importance-matrix input, so quantization runs in the same library that serves the model.
What llama.cpp actually did is recorded: the type of every tensor is read back from the output
GGUF, and the fallbacks llama.cpp logs (for example q4_K -> q5_0 for a row of 576 values, not a
multiple of 256) are captured from its log.

Tensors a torch-side pass already wrote as exact llama.cpp blocks (GPTQ's Q4_0/Q4_1/Q8_0,
``artifact.meta["written"]``) are kept: a tensor-type override pins each to its own type, and
llama.cpp copies a tensor whose type equals its target, byte for byte; only the rest is
quantized.
"""

from __future__ import annotations

import ctypes
import re
import threading
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, field_validator, model_serializer

from edgesmith.compress.format_pass import FormatPass
from edgesmith.compress.imatrix import IMatrix
from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ToolError, require
from edgesmith.fsutil import atomic_path
from edgesmith.gguf_file import read_header

QuantType = Literal["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
                    "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]

_FALLBACK = re.compile(
    r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
    r".*?-> falling back to\s+(\S+)", re.S)
_PROGRESS = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)")
_log_lock = threading.Lock()
# ggml tensor types a per-tensor override may name (llama-quantize --tensor-type NAME=TYPE)
TensorType = Literal["F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K",
                     "Q4_1", "Q4_0", "Q3_K", "Q2_K"]


class GGUFQuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: QuantType = "Q4_K_M"
    imatrix: bool = False
    # per-tensor types: a regular expression searched in llama.cpp's tensor names (e.g.
    # "ffn_down" or "blk[.]0[.]attn_v") -> the type of the tensors it matches, as
    # llama-quantize's --tensor-type; llama.cpp still falls back where a row does not fit
    tensor_types: dict[str, TensorType] = {}

    @field_validator("tensor_types")
    @classmethod
    def _patterns_compile(cls, v: dict[str, str]) -> dict[str, str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"tensor_types: {pattern!r} is not a regular expression "
                                 f"({exc})") from exc
        return v

    @model_serializer(mode="wrap")
    def _without_empty_overrides(self, handler: Any) -> Any:
        """No ``tensor_types`` key when there are none: the pipeline's cache keys (the
        config's JSON) of recipes without overrides stay what they were."""
        data = handler(self)
        if isinstance(data, dict) and not data.get("tensor_types"):
            data.pop("tensor_types", None)
        return data


def tensor_types(path: Path) -> list[dict[str, Any]]:
    """Name, type and shape of every tensor in a GGUF, as llama.cpp will read them."""
    return [{"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.n_bytes}
            for t in read_header(path).tensors]


def _imatrix_array(imx: IMatrix, keep: list[Any]) -> Any:
    import llama_cpp

    n = len(imx.data)
    arr = (llama_cpp.llama_model_imatrix_data * (n + 1))()
    for i, (name, values) in enumerate(sorted(imx.data.items())):
        v = np.ascontiguousarray(values, dtype=np.float32)
        b = name.encode()
        keep.extend([v, b])
        arr[i].name = b
        arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = v.size
    arr[n].name = None  # terminator
    return arr


def expand_tensor_types(src: Path, overrides: dict[str, str],
                        skip: set[str] | None = None) -> list[tuple[str, str]]:
    """Per-tensor overrides as exact-name patterns for the tensors of ``src`` each pattern
    matches (the last matching pattern wins, as in llama-quantize), ``skip`` left out; so
    they never overlap the overrides that keep a pass's exact blocks."""
    pats = [(re.compile(p), t) for p, t in overrides.items()]
    out = []
    for t in read_header(src).tensors:
        if t.name in (skip or set()) or len(t.shape) < 2:
            continue
        hit = [ttype for rx, ttype in pats if rx.search(t.name)]
        if hit:
            out.append((f"^{t.name.replace('.', '[.]')}$", hit[-1]))
    return out


def _overrides_array(written: list[dict[str, Any]], keep: list[Any],
                     extra: list[tuple[str, str]] | None = None) -> Any:
    """llama.cpp tensor-type overrides that keep each ``written`` tensor's own type (and
    the ``extra`` per-tensor types)."""
    import llama_cpp

    from edgesmith.export import gguf_blocks

    ov = [*(extra or []), *gguf_blocks.keep_overrides(written)]
    arr = (llama_cpp.llama_model_tensor_override * (len(ov) + 1))()
    for i, (pattern, ttype) in enumerate(ov):
        b = pattern.encode()
        keep.append(b)
        arr[i].pattern = b
        arr[i].type = getattr(llama_cpp, f"GGML_TYPE_{ttype}")
    arr[len(ov)].pattern = None  # terminator
    keep.append(arr)
    return arr


def quantize(src: Path, dest: Path, qtype: str, imx: IMatrix | None, ctx: RunContext,
             keep_tensors: list[dict[str, Any]] | None = None,
             type_overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """Quantize ``src`` into ``dest`` (atomically); return per-tensor types and fallbacks.
    ``keep_tensors`` (``[{tensor, type}]``) are copied unchanged, not re-quantized;
    ``type_overrides`` (pattern -> type) sets the type of the tensors each pattern matches."""
    llama_cpp = require("llama_cpp", "gguf")
    from llama_cpp import _logger

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}", None)
    if ftype is None:
        raise ToolError(f"this llama.cpp has no quantization type {qtype}",
                        "pick another type in the recipe")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = ctx.threads
    keep: list[Any] = []
    if imx is not None:
        params.imatrix = ctypes.cast(_imatrix_array(imx, keep),
                                     ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    extra = expand_tensor_types(src, type_overrides,
                                {k["tensor"] for k in keep_tensors or []}) if type_overrides else []
    if type_overrides and not extra:
        raise ToolError(f"no tensor of {src.name} matches the tensor_types patterns "
                        f"{', '.join(type_overrides)}", "use llama.cpp tensor names, e.g. "
                        "ffn_down, attn_v, output, token_embd")
    if keep_tensors or extra:
        params.tt_overrides = ctypes.cast(_overrides_array(keep_tensors or [], keep, extra),
                                          ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    label = f"quantize {qtype}" + (" + imatrix" if imx else "") + " (llama.cpp)"
    task = ctx.task(label, total=None)
    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        s = text.decode("utf-8", errors="replace")
        chunks.append(s)
        m = _PROGRESS.search(s)
        if m:
            ctx.progress.update(task, completed=int(m.group(1)) - 1, total=int(m.group(2)))

    with _log_lock, atomic_path(dest) as tmp:
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        try:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(),
                                                ctypes.byref(params))
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
        if rc != 0:
            errors = [c.strip() for c in chunks if "error" in c.lower() or "failed" in c.lower()]
            raise ToolError(f"llama.cpp quantization to {qtype} failed: "
                            f"{errors[-1] if errors else f'code {rc}'}", "see the log with --debug")
    ctx.progress.update(task, completed=1, total=1)
    log_text = "".join(chunks)
    fallbacks = [
        {"tensor": m.group(1), "ncols": int(m.group(2)), "block": int(m.group(3)),
         "wanted": m.group(4), "got": m.group(5)}
        for m in _FALLBACK.finditer(log_text)
    ]
    tensors = tensor_types(dest)
    out: dict[str, Any] = {"tensors": tensors, "fallbacks": fallbacks,
                           "imatrix_entries": len(imx.data) if imx else 0}
    if extra:
        out["overrides"] = [{"pattern": p, "type": t} for p, t in extra]
    if keep_tensors:
        types = {t["name"]: t["type"] for t in tensors}
        changed = [k["tensor"] for k in keep_tensors if types.get(k["tensor"]) != k["type"]]
        if changed:  # the override did not hold: the pass's exact blocks were lost
            raise ToolError(f"llama.cpp re-quantized tensors written as exact blocks: "
                            f"{', '.join(changed[:6])}", "report this with --debug output")
        out["copied"] = [k["tensor"] for k in keep_tensors]
    return out


class GGUFQuantizePass(FormatPass):
    """Format-side Pass plug point: ``run(artifact, ctx) -> Artifact``."""

    name = "gguf_quantize"
    Config = GGUFQuantizeConfig
    formats = ("gguf",)
    type_field = "type"

    def cache_name(self, key: str) -> str:
        return f"{self.config.type}.{key}.gguf"

    def run(self, artifact: Artifact, ctx: RunContext) -> Artifact:
        qtype = self.config.type
        imx = ctx.extras.get("imatrix") if self.config.imatrix else None
        dest = self.dest(artifact, ctx, f"model.{qtype}.gguf")
        info = quantize(artifact.path, dest, qtype, imx, ctx,
                        keep_tensors=artifact.meta.get("written") or None,
                        type_overrides=dict(self.config.tensor_types) or None)
        return Artifact(Path(dest), "gguf", {"type": qtype, "imatrix": imx is not None, **info})
