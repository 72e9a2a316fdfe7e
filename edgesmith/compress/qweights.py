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
- symmetric, 8 bits: zero 128, scale = absmax / 127 as llama.cpp's Q8_0, codes 1..255 (int8
  -127..127, as Q8_0's quantizer); group 32 is Q8_0 (its int8 quants are codes - 128).
- asymmetric: GPTQ's min/max grid over a range that includes 0, scale = (max - min) / maxq,
  integer zero = round(-min / scale) kept >= 1 (the v1 GPTQ checkpoint stores zero - 1, so zero 0
  cannot be written). 4-bit group 32 is Q4_1 with d = scale, m = fp16(-scale * zero).

Functions for other passes (AWQ, RTN baselines): ``group_params`` (scale and zero of slabs of
columns), ``quantize_codes`` / ``fake_quantize`` with given params (pass ``sym``: it sets the
code range), ``quantize_rtn`` (a whole weight, round to nearest) and ``weighted_error`` (the
Hessian-weighted error GPTQ minimizes). ``attach`` records a QuantizedLinear on an in-memory HF
model (its weight becomes the dequantized one) for ``gptq_format.save_model``.
An AWQ clipping search clamps a group's weights first and then calls ``group_params``.

On disk the representation is a standard GPTQ checkpoint: compress/gptq_format.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec, name: str = "weight") -> QuantizedLinear:
    """Round-to-nearest quantization of a ``[out, in]`` weight with per-group params."""
    out, n_in = weight.shape
    spec.check(name, n_in)
    w = weight.detach().float().reshape(out, n_in // spec.group_size, spec.group_size)
    scale, zero = group_params(w, spec.bits, spec.sym)
    codes = quantize_codes(w, scale[..., None], zero[..., None], spec.bits, spec.sym)
    return QuantizedLinear(codes.reshape(out, n_in).to(torch.uint8), scale,
                           zero.to(torch.uint8), spec.bits, spec.group_size, spec.sym)


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
