"""Quantized weights: one representation that every quantizing pass writes and every exporter reads.

A ``QuantizedLinear`` holds what a quantizer chose for one ``nn.Linear`` weight ``[out, in]``:

- ``codes``  uint8 ``[out, in]``, integers in ``[0, 2**bits - 1]``, in the ORIGINAL column order;
- ``scales`` float32 ``[out, n_groups]``, every value exactly representable in fp16 (GGUF and GPTQ
  checkpoints store fp16 scales, so rounding them here means nothing changes on export);
- ``zeros``  uint8 ``[out, n_groups]``, integers;
- ``g_idx``  int32 ``[in]`` or None: the group of each input column. None means the ordinal
  ``i // group_size`` (act-order with static groups keeps it ordinal: the groups are those of the
  original column order, the permutation only changes the order GPTQ visits the columns).

The weight it stands for is ``(codes - zeros[:, g_idx]) * scales[:, g_idx]`` in fp32.

Grids (chosen so a group-32 weight is EXACTLY a llama.cpp block):
- symmetric, 2/3/4 bits: zero ``2**(bits-1)``, scale = (the group's value of largest magnitude,
  with its sign) / ``-2**(bits-1)``, as llama.cpp's Q4_0 (``d = max / -8``): that value maps to
  code 0, all 16 levels are used, nothing is clipped. The scale can be negative.
  4-bit group 32 is Q4_0 (d = scale; the block's quants are the codes).
- symmetric, 8 bits: zero 128, scale = absmax / 127 as llama.cpp's Q8_0; group 32 is Q8_0 (the
  block's int8 quants are codes - 128).
- asymmetric: GPTQ's min/max grid over a range that includes 0, scale = (max - min) / maxq,
  integer zero = round(-min / scale) kept >= 1 (the v1 GPTQ checkpoint stores zero - 1, so zero 0
  cannot be written). 4-bit group 32 is Q4_1 with d = scale, m = fp16(-scale * zero).

Functions for other passes (AWQ, RTN baselines): ``group_params`` (scale and zero of slabs of
columns), ``quantize_codes`` / ``fake_quantize`` with given params, ``quantize_rtn`` (a whole
weight, round to nearest) and ``weighted_error`` (the Hessian-weighted error GPTQ minimizes).
An AWQ clipping search clamps a group's weights first and then calls ``group_params``.

On disk: a standard GPTQ checkpoint (``quant_method: gptq``, ``checkpoint_format: gptq``, the
AutoGPTQ/gptqmodel v1 layout): ``<linear>.qweight`` int32 ``[in * bits / 32, out]`` (a
little-endian bit stream along ``in``, which for 2/4/8 bits is 32/bits values per int32 and for 3
bits AutoGPTQ's 32-values-in-3-words packing), ``<linear>.qzeros`` int32
``[n_groups, out * bits / 32]`` holding zero - 1, ``<linear>.scales`` fp16 ``[n_groups, out]``,
``<linear>.g_idx`` int32 ``[in]``; every other tensor as it was. ``CheckpointWriter`` writes one
shard at a time (memory stays one layer); ``GPTQCheckpoint`` reads it back lazily.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesmith.errors import ModelError

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128)
QUANTIZED_ATTR = "_edgesmith_quantized"  # on an in-memory HF model: {linear name: QuantizedLinear}
QCONFIG_ATTR = "_edgesmith_quantization_config"  # ... and the pass's quantization_config


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize: bits, group size (columns per scale), symmetric or not."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise ModelError(f"{self.bits}-bit quantization is not supported",
                             f"use bits in {list(BITS)}")
        if self.group_size <= 0:
            raise ModelError(f"group size {self.group_size} is not positive",
                             f"use one of {list(GROUP_SIZES)}")

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def check(self, name: str, in_features: int) -> None:
        """Raise a ModelError naming the layer when its width is not a multiple of the group."""
        if in_features % self.group_size:
            ok = [g for g in GROUP_SIZES if in_features % g == 0]
            raise ModelError(
                f"layer {name} has {in_features} input features, not a multiple of the group "
                f"size {self.group_size}",
                f"use group_size in {ok}" if ok else
                f"no group size in {list(GROUP_SIZES)} divides {in_features}; leave this layer out")


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).to(torch.float32)


def group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of each row of ``w`` (``[..., cols]``: one group per row).

    Returns float32 tensors of shape ``w.shape[:-1]``; scales are fp16-exact, zeros integral.
    """
    w = w.float()
    if sym:
        zero = torch.full(w.shape[:-1], float(1 << (bits - 1)), device=w.device)
        if bits == 8:
            scale = w.abs().amax(-1) / 127.0
        else:
            idx = w.abs().argmax(-1, keepdim=True)
            scale = w.gather(-1, idx).squeeze(-1) / -float(1 << (bits - 1))
        return _fp16(scale), zero
    maxq = (1 << bits) - 1
    xmin = w.amin(-1).clamp(max=0.0)
    xmax = w.amax(-1).clamp(min=0.0)
    scale = _fp16((xmax - xmin) / maxq)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    zero = torch.round(-xmin / safe)
    # zero 0 is not writable in the v1 GPTQ format (it stores zero - 1): a group with no
    # negative value gets zero 1 and a scale that still reaches its max with maxq - 1 steps.
    low = (zero < 1) & (scale != 0)
    if bool(low.any()):
        scale = torch.where(low, _fp16(xmax / (maxq - 1)), scale)
        zero = torch.where(low, torch.ones_like(zero), zero)
    zero = torch.where(scale == 0, torch.ones_like(zero), zero.clamp(1, maxq))
    return scale, zero


def code_range(bits: int, sym: bool) -> tuple[int, int]:
    """Smallest and largest code. Symmetric 8-bit stops at 1 (int8 -127, as Q8_0's quantizer:
    llama.cpp's int8 kernels never see -128)."""
    return (1 if sym and bits == 8 else 0), (1 << bits) - 1


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                   sym: bool = False) -> torch.Tensor:
    """Codes (float, integral) of ``w`` on the grid ``(scale, zero)``, broadcast over ``w``."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = torch.round(w / safe) + zero
    q = torch.where(scale == 0, zero.expand_as(q), q)
    lo, hi = code_range(bits, sym)
    return q.clamp(lo, hi)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  sym: bool = False) -> torch.Tensor:
    """``w`` rounded onto the grid and dequantized again (fp32)."""
    return (quantize_codes(w, scale, zero, bits, sym) - zero) * scale


def weighted_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """``trace(delta H delta^T)``: the output error GPTQ minimizes, ``H = 2 X X^T / n``.

    ``delta`` is ``W - Q`` (``[out, in]``), ``hessian`` the undamped ``[in, in]`` Hessian.
    """
    d = delta.float()
    return float(((d @ hessian.float()) * d).sum())


@dataclass
class QuantizedLinear:
    """Integer codes, fp16-exact scales, integer zeros of one Linear weight (see module doc)."""

    codes: torch.Tensor  # uint8 [out, in]
    scales: torch.Tensor  # float32 [out, n_groups], fp16-exact
    zeros: torch.Tensor  # uint8 [out, n_groups]
    bits: int
    group_size: int
    sym: bool
    g_idx: torch.Tensor | None = None  # int32 [in]; None = ordinal i // group_size

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.codes.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.scales.shape[1])

    def group_index(self) -> torch.Tensor:
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.in_features, device=self.codes.device) // self.group_size

    @property
    def ordinal(self) -> bool:
        """True when column i belongs to group i // group_size (what GGUF blocks need)."""
        if self.g_idx is None:
            return True
        ref = torch.arange(self.in_features, device=self.g_idx.device) // self.group_size
        return bool(torch.equal(self.g_idx.long(), ref))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight ``(codes - zero) * scale`` that this stands for."""
        g = self.group_index()
        return (self.codes.float() - self.zeros.float()[:, g]) * self.scales[:, g]

    def gguf_type(self) -> str | None:
        """The llama.cpp block type that holds this weight exactly, or None."""
        if self.group_size != 32 or not self.ordinal:
            return None
        if self.bits == 4:
            if not self.sym:
                return "Q4_1"
            return "Q4_0" if bool((self.zeros == 8).all()) else None
        if self.bits == 8 and self.sym and bool((self.zeros == 128).all()):
            return "Q8_0"
        return None

    def to(self, device: str | torch.device) -> QuantizedLinear:
        return QuantizedLinear(self.codes.to(device), self.scales.to(device),
                               self.zeros.to(device), self.bits, self.group_size, self.sym,
                               None if self.g_idx is None else self.g_idx.to(device))

    # --- the GPTQ checkpoint layout --------------------------------------------------------
    def to_gptq(self, v2: bool = False) -> dict[str, torch.Tensor]:
        """``qweight``, ``qzeros``, ``scales``, ``g_idx`` as a GPTQ checkpoint stores them (v1
        stores zero - 1, ``gptq_v2`` the zero itself)."""
        mask = (1 << self.bits) - 1
        stored = (self.zeros.cpu().numpy().astype(np.int64) - (0 if v2 else 1)) & mask
        return {
            "qweight": torch.from_numpy(pack(self.codes.cpu().numpy().T, self.bits)),
            "qzeros": torch.from_numpy(np.ascontiguousarray(pack(stored, self.bits).T)),
            "scales": self.scales.cpu().T.contiguous().to(torch.float16),
            "g_idx": self.group_index().cpu().to(torch.int32),
        }

    @classmethod
    def from_gptq(cls, tensors: dict[str, torch.Tensor], bits: int, group_size: int,
                  sym: bool, v2: bool = False) -> QuantizedLinear:
        """Inverse of ``to_gptq``, for any v1 GPTQ tensor set (group_size -1: one group)."""
        qweight = tensors["qweight"].cpu().numpy()
        scales = tensors["scales"].float().T.contiguous()  # [out, n_groups]
        out = int(scales.shape[0])
        n_in = qweight.shape[0] * 32 // bits
        codes = unpack(qweight, bits, n_in).T  # [out, in]
        stored = unpack(tensors["qzeros"].cpu().numpy().T, bits, out)  # [out, n_groups]
        zeros = (stored.astype(np.int64) + (0 if v2 else 1)) & ((1 << bits) - 1)
        g_idx = tensors.get("g_idx")
        q = cls(torch.from_numpy(np.ascontiguousarray(codes)), scales,
                torch.from_numpy(zeros.astype(np.uint8)), bits,
                n_in if group_size == -1 else group_size, sym,
                None if g_idx is None else g_idx.to(torch.int32))
        if q.g_idx is not None and q.ordinal:
            q.g_idx = None
        return q


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedLinear:
    """Round-to-nearest quantization of a ``[out, in]`` weight with per-group params."""
    out, n_in = weight.shape
    spec.check(name, n_in)
    w = weight.detach().float().reshape(out, n_in // spec.group_size, spec.group_size)
    scale, zero = group_params(w, spec.bits, spec.sym)
    codes = quantize_codes(w, scale[..., None], zero[..., None], spec.bits, spec.sym)
    return QuantizedLinear(codes.reshape(out, n_in).to(torch.uint8), scale,
                           zero.to(torch.uint8), spec.bits, spec.group_size, spec.sym)


# --- bit packing: a little-endian bit stream along axis 0, in 32-bit words -------------------
def _chunk(bits: int) -> tuple[int, int]:
    span = bits * 32 // math.gcd(bits, 32)  # lcm(bits, 32): bits in one whole chunk
    return span // bits, span // 32  # values, words per chunk


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """int32 ``[n * bits / 32, cols]`` from integer ``values`` ``[n, cols]`` (axis 0 packed)."""
    n, cols = values.shape
    nv, nw = _chunk(bits)
    if n % nv:
        raise ModelError(f"cannot pack {n} rows of {bits}-bit values into int32 words",
                         f"the packed dimension must be a multiple of {nv}")
    v = values.astype(np.uint32).reshape(n // nv, nv, cols)
    out = np.zeros((n // nv, nw, cols), dtype=np.uint32)
    for j in range(nv):
        word, shift = divmod(j * bits, 32)
        out[:, word] |= v[:, j] << np.uint32(shift)
        if shift + bits > 32:
            out[:, word + 1] |= v[:, j] >> np.uint32(32 - shift)
    return out.reshape(n // nv * nw, cols).view(np.int32)


def unpack(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of ``pack``: uint8 ``[n, cols]``."""
    nv, nw = _chunk(bits)
    cols = packed.shape[1]
    p = np.ascontiguousarray(packed).view(np.uint32).reshape(n // nv, nw, cols)
    mask = np.uint32((1 << bits) - 1)
    out = np.zeros((n // nv, nv, cols), dtype=np.uint32)
    for j in range(nv):
        word, shift = divmod(j * bits, 32)
        v = p[:, word] >> np.uint32(shift)
        if shift + bits > 32:
            v = v | (p[:, word + 1] << np.uint32(32 - shift))
        out[:, j] = v & mask
    return out.reshape(n, cols).astype(np.uint8)


# --- in-memory models -----------------------------------------------------------------------
def attach(model: Any, name: str, q: QuantizedLinear) -> None:
    """Record that Linear ``name`` of ``model`` holds ``q`` (its weight is set to q's dequant)."""
    quantized = getattr(model, QUANTIZED_ATTR, None)
    if quantized is None:
        quantized = {}
        setattr(model, QUANTIZED_ATTR, quantized)
    quantized[name] = q.to("cpu")
    module = model.get_submodule(name)
    with torch.no_grad():
        module.weight.copy_(q.dequantize().to(module.weight.device, module.weight.dtype))


def attached(model: Any) -> dict[str, QuantizedLinear]:
    """The quantized Linears recorded on ``model`` (empty when none)."""
    return dict(getattr(model, QUANTIZED_ATTR, None) or {})


def set_quantization_config(model: Any, qconfig: dict[str, Any]) -> None:
    """Record the ``quantization_config`` that ``save_model`` writes for ``model``."""
    setattr(model, QCONFIG_ATTR, qconfig)


# --- the GPTQ checkpoint on disk ------------------------------------------------------------
def quantization_config(spec: QuantSpec, *, desc_act: bool, damp: float | None = None,
                        true_sequential: bool = True, modules: list[list[str]] | None = None,
                        block_name: str = "model.layers", meta: dict[str, Any] | None = None,
                        checkpoint_format: str = "gptq") -> dict[str, Any]:
    """``quantization_config`` of config.json, as transformers/optimum/gptqmodel/vLLM read it.

    ``checkpoint_format`` "gptq" (v1, what every loader reads) or "gptq_v2" (zeros stored as
    they are: gptqmodel loads an asymmetric checkpoint only in v2 unless it made it itself)."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ModelError(f"unknown GPTQ checkpoint_format {checkpoint_format!r}",
                         "use gptq or gptq_v2")
    from edgesmith import __version__

    cfg: dict[str, Any] = {
        "quant_method": "gptq", "bits": spec.bits, "group_size": spec.group_size,
        "desc_act": desc_act, "static_groups": desc_act, "sym": spec.sym,
        "true_sequential": true_sequential, "checkpoint_format": checkpoint_format,
        "pack_dtype": "int32",
        "lm_head": False, "block_name_to_quantize": block_name,
        "meta": {"quantizer": [f"edgesmith:{__version__}"], **(meta or {})},
    }
    if damp is not None:
        cfg["damp_percent"] = damp
    if modules:
        cfg["modules_in_block_to_quantize"] = modules
    return cfg


class CheckpointWriter:
    """Writes a GPTQ checkpoint directory one shard at a time, then renames it into place.

    ``add(tensors)`` writes one ``model-NNNNN.safetensors`` shard; ``add_quantized(name, q)``
    adds one quantized Linear's packed tensors to the next shard; ``close(config, qconfig)``
    writes the index, config.json (with ``quantization_config``) and quantize_config.json.
    """

    def __init__(self, dest: Path, checkpoint_format: str = "gptq") -> None:
        self.dest = Path(dest)
        self.v2 = checkpoint_format == "gptq_v2"
        self.tmp = self.dest.with_name(self.dest.name + ".partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._pending: dict[str, torch.Tensor] = {}

    def add_quantized(self, name: str, q: QuantizedLinear) -> None:
        for k, v in q.to_gptq(self.v2).items():
            self._pending[f"{name}.{k}"] = v

    def add(self, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the pending quantized tensors and ``tensors`` as one shard."""
        from safetensors.torch import save_file

        items = {**self._pending, **(tensors or {})}
        self._pending = {}
        if not items:
            return
        fname = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        items = {k: v.detach().cpu().contiguous() for k, v in items.items()}
        save_file(items, str(self.tmp / fname), metadata={"format": "pt"})
        for k, v in items.items():
            self.weight_map[k] = fname
            self.total += v.numel() * v.element_size()

    def close(self, config: dict[str, Any], qconfig: dict[str, Any],
              extra_files: Iterable[Path] = ()) -> Path:
        self.add()
        index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
        (self.tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (self.tmp / "config.json").write_text(
            json.dumps({**config, "quantization_config": qconfig}, indent=2))
        (self.tmp / "quantize_config.json").write_text(json.dumps(qconfig, indent=2))
        for f in extra_files:
            shutil.copy(f, self.tmp / Path(f).name)
        shutil.rmtree(self.dest, ignore_errors=True)
        os.replace(self.tmp, self.dest)
        return self.dest

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def save_model(model: Any, dest: Path, qconfig: dict[str, Any] | None = None,
               tokenizer: Any = None) -> Path:
    """Save an in-memory HF model whose Linears carry ``attach``ed codes as a GPTQ checkpoint
    (``qconfig``: default the one ``set_quantization_config`` recorded)."""
    quantized = attached(model)
    qconfig = qconfig or getattr(model, QCONFIG_ATTR, None)
    if not quantized or qconfig is None:
        raise ModelError("the model carries no quantized weights",
                         "run a quantizing pass (gptq) before saving a GPTQ checkpoint")
    writer = CheckpointWriter(dest, qconfig.get("checkpoint_format", "gptq"))
    try:
        for name, q in quantized.items():
            writer.add_quantized(name, q)
        writer.add()
        skip = {f"{name}.weight" for name in quantized}
        seen: set[tuple[int, tuple[int, ...]]] = set()
        rest = {}
        for k, v in model.state_dict().items():
            ident = (v.data_ptr(), tuple(v.shape))
            if k in skip or ident in seen:  # a tied weight (lm_head = embed_tokens): once
                continue
            seen.add(ident)
            rest[k] = v
        writer.add(rest)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        return writer.close(model.config.to_dict(), qconfig)
    except BaseException:
        writer.abort()
        raise


class GPTQCheckpoint:
    """A GPTQ checkpoint directory, read lazily (safetensors shards, memory-mapped)."""

    PACKED = ("qweight", "qzeros", "scales", "g_idx")

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        cfg_file = self.path / "config.json"
        if not cfg_file.exists():
            raise ModelError(f"{self.path} has no config.json", "point to a model directory")
        self.config: dict[str, Any] = json.loads(cfg_file.read_text())
        qc = self.config.get("quantization_config") or {}
        if qc.get("quant_method") != "gptq":
            raise ModelError(f"{self.path} is not a GPTQ checkpoint (quant_method "
                             f"{qc.get('quant_method')!r})", "quantize it with the gptq pass")
        if qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise ModelError(f"{self.path} uses checkpoint_format {qc['checkpoint_format']!r}",
                             "only the 'gptq' (v1) and 'gptq_v2' layouts are read")
        self.v2 = qc.get("checkpoint_format") == "gptq_v2"
        self.qconfig = qc
        self.bits = int(qc["bits"])
        self.group_size = int(qc.get("group_size", 128))
        self.sym = bool(qc.get("sym", True))
        index = self.path / "model.safetensors.index.json"
        self.weight_map: dict[str, str] = {}
        if index.exists():
            self.weight_map = json.loads(index.read_text())["weight_map"]
        else:
            from safetensors import safe_open

            for shard in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(shard), framework="pt") as f:
                    self.weight_map.update({k: shard.name for k in f.keys()})  # noqa: SIM118

    def quantized_names(self) -> list[str]:
        return sorted(k[: -len(".qweight")] for k in self.weight_map if k.endswith(".qweight"))

    def tensor(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path / self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key)

    def quantized(self, name: str) -> QuantizedLinear:
        parts = {k: self.tensor(f"{name}.{k}") for k in self.PACKED
                 if f"{name}.{k}" in self.weight_map}
        return QuantizedLinear.from_gptq(parts, self.bits, self.group_size, self.sym, self.v2)

    def shards(self) -> dict[str, list[str]]:
        """Shard file -> the plain-model tensor names it holds (quantized ones as ``.weight``)."""
        qnames = set(self.quantized_names())
        out: dict[str, list[str]] = {}
        for key, shard in self.weight_map.items():
            base, _, leaf = key.rpartition(".")
            if base in qnames and leaf in self.PACKED:
                if leaf == "qweight":
                    out.setdefault(shard, []).append(f"{base}.weight")
                continue
            out.setdefault(shard, []).append(key)
        return out

    def plain_tensor(self, key: str) -> torch.Tensor:
        """A tensor of the plain model: a quantized Linear's weight comes dequantized (fp32)."""
        if key in self.weight_map:
            return self.tensor(key)
        return self.quantized(key[: -len(".weight")]).dequantize()

    def state_dict(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the plain model, one at a time (see ``plain_tensor``)."""
        for keys in self.shards().values():
            for key in keys:
                yield key, self.plain_tensor(key)


def dequantize_checkpoint(src: Path, dest: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A plain HF safetensors directory with the checkpoint's weights dequantized, for tools
    (llama.cpp's converter) that read only plain weights; memory stays one shard."""
    from safetensors.torch import save_file

    ckpt = GPTQCheckpoint(src)
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weight_map: dict[str, str] = {}
        for shard, keys in ckpt.shards().items():
            tensors = {}
            for key in keys:
                t = ckpt.plain_tensor(key)
                tensors[key] = t.to(dtype) if t.is_floating_point() else t
                weight_map[key] = shard
            save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in ckpt.path.iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config",
                                  "chat_template")) or f.suffix == ".model":
                shutil.copy(f, tmp / f.name)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def is_gptq_dir(path: Path) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.exists():
        return False
    qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") == "gptq"
