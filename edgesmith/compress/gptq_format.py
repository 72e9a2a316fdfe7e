"""The GPTQ checkpoint: how quantized weights (compress/qweights.py) are stored on disk.

A standard GPTQ checkpoint (``quant_method: gptq``) in the AutoGPTQ/gptqmodel layout, which
transformers+optimum/gptqmodel, vLLM and onnxruntime-genai's builder load:

- ``<linear>.qweight`` int32 ``[in * bits / 32, out]``: the codes as a little-endian bit stream
  along ``in`` (for 2/4/8 bits 32/bits values per int32, for 3 bits AutoGPTQ's 32 values in 3
  words);
- ``<linear>.qzeros`` int32 ``[n_groups, out * bits / 32]``: the zeros, packed the same way along
  ``out``; ``checkpoint_format: gptq`` (v1, what every loader reads) stores zero - 1,
  ``gptq_v2`` the zero itself (gptqmodel loads asymmetric v1 only from itself);
- ``<linear>.scales`` fp16 ``[n_groups, out]``; ``<linear>.g_idx`` int32 ``[in]``;
- every other tensor as it was; ``quantization_config`` in config.json (and quantize_config.json).

``CheckpointWriter`` writes one shard at a time (memory stays one layer), ``save_model`` an
in-memory model carrying ``qweights.attach``ed codes, ``GPTQCheckpoint`` reads one back lazily,
and ``dequantize_checkpoint`` makes the plain model a converter without GPTQ support reads.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesmith.compress.qweights import QCONFIG_ATTR, QuantizedLinear, QuantSpec, attached
from edgesmith.errors import ModelError
from edgesmith.fsutil import temp_path


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


def to_tensors(q: QuantizedLinear, v2: bool = False) -> dict[str, torch.Tensor]:
    """``qweight``, ``qzeros``, ``scales``, ``g_idx`` as a GPTQ checkpoint stores them (v1
    stores zero - 1, ``gptq_v2`` the zero itself)."""
    mask = (1 << q.bits) - 1
    stored = (q.zeros.cpu().numpy().astype(np.int64) - (0 if v2 else 1)) & mask
    return {
        "qweight": torch.from_numpy(pack(q.codes.cpu().numpy().T, q.bits)),
        "qzeros": torch.from_numpy(np.ascontiguousarray(pack(stored, q.bits).T)),
        "scales": q.scales.cpu().T.contiguous().to(torch.float16),
        "g_idx": q.group_index().cpu().to(torch.int32),
    }


def from_tensors(tensors: dict[str, torch.Tensor], bits: int, group_size: int, sym: bool,
                 v2: bool = False) -> QuantizedLinear:
    """Inverse of ``to_tensors``, for any GPTQ tensor set (group_size -1: one group)."""
    qweight = tensors["qweight"].cpu().numpy()
    scales = tensors["scales"].float().T.contiguous()  # [out, n_groups]
    out = int(scales.shape[0])
    n_in = qweight.shape[0] * 32 // bits
    codes = unpack(qweight, bits, n_in).T  # [out, in]
    stored = unpack(tensors["qzeros"].cpu().numpy().T, bits, out)  # [out, n_groups]
    zeros = (stored.astype(np.int64) + (0 if v2 else 1)) & ((1 << bits) - 1)
    g_idx = tensors.get("g_idx")
    q = QuantizedLinear(torch.from_numpy(np.ascontiguousarray(codes)), scales,
                        torch.from_numpy(zeros.astype(np.uint8)), bits,
                        n_in if group_size == -1 else group_size, sym,
                        None if g_idx is None else g_idx.to(torch.int32))
    if q.g_idx is not None and q.ordinal:
        q.g_idx = None
    return q


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
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_path(self.dest)  # owner-tagged: a kill -9 leaves it to the cache sweep
        self.tmp.mkdir()
        self.weight_map: dict[str, str] = {}
        self.total = 0
        self._pending: dict[str, torch.Tensor] = {}

    def add_quantized(self, name: str, q: QuantizedLinear) -> None:
        for k, v in to_tensors(q, self.v2).items():
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
        return from_tensors(parts, self.bits, self.group_size, self.sym, self.v2)

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
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dest)
    tmp.mkdir()
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
