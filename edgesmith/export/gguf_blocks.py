"""Exact llama.cpp blocks from quantized weights, and a GGUF rewrite that puts them in.

A group-32 ``QuantizedLinear`` (compress/qweights.py) is exactly one of llama.cpp's block types:

- ``Q4_0`` (symmetric 4-bit, zero 8): per 32 values ``d`` (fp16) and 16 bytes of nibbles,
  byte ``j`` = code ``j`` | code ``j + 16`` << 4; llama.cpp dequantizes ``(code - 8) * d``.
- ``Q4_1`` (asymmetric 4-bit): ``d``, ``m`` (fp16) and the same nibbles; ``code * d + m``
  with ``m = fp16(-d * zero)``. That fp16 rounding of ``m`` is the only difference from the
  torch weight ``(code - zero) * d`` (at most 2**-11 |m|, far below one step ``d``).
- ``Q8_0`` (symmetric 8-bit, zero 128): ``d`` (fp16) and 32 int8 ``code - 128``; ``q * d``.

The scales are fp16 already (qweights rounds them), so the blocks carry the very codes and
scales the pass chose: nothing is re-quantized.

``write_quantized`` rewrites a GGUF written by llama.cpp's converter (F16/BF16/F32) with the
quantized tensors replaced by their blocks. The converter may reorder rows (Llama's q/k
projections are permuted for its rope layout): each tensor's rows are matched, by their exact
bytes, against the dequantized weight cast to the GGUF tensor's type, so the row order comes
from the file itself and any converter transform other than a row permutation is detected.
A tensor that cannot be written exactly is left as it is and named in the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.compress.qweights import QuantizedLinear
from edgesmith.errors import ModelError, require
from edgesmith.fsutil import atomic_path

BLOCK = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """``[rows, nb, 32]`` 4-bit codes -> ``[rows, nb, 16]`` bytes in ggml's order."""
    c = codes.astype(np.uint8)
    return c[..., :16] | (c[..., 16:] << np.uint8(4))


def blocks(q: QuantizedLinear, qtype: str | None = None) -> np.ndarray:
    """The llama.cpp blocks of ``q``: uint8 ``[out, in / 32 * block_bytes]`` (rows = outputs)."""
    qtype = qtype or q.gguf_type()
    if qtype is None or qtype != q.gguf_type():
        raise ModelError(
            f"a {q.bits}-bit {'symmetric' if q.sym else 'asymmetric'} group-{q.group_size} weight "
            f"is not exactly a {qtype or 'llama.cpp'} block",
            "use bits 4 (sym -> Q4_0, asym -> Q4_1) or 8 sym (Q8_0) with group_size 32")
    rows, n_in = q.codes.shape
    nb = n_in // BLOCK
    codes = q.codes.cpu().numpy().reshape(rows, nb, BLOCK)
    d = q.scales.cpu().numpy().astype(np.float32)  # [rows, nb], fp16-exact
    if qtype == "Q4_0":
        parts = [_fp16_bytes(d), _nibbles(codes)]
    elif qtype == "Q4_1":
        m = -d * q.zeros.cpu().numpy().astype(np.float32)
        parts = [_fp16_bytes(d), _fp16_bytes(m), _nibbles(codes)]
    else:  # Q8_0
        qs = (codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8)
        parts = [_fp16_bytes(d), qs]
    return np.concatenate(parts, axis=-1).reshape(rows, nb * BLOCK_BYTES[qtype])


def dequantized(q: QuantizedLinear, qtype: str | None = None) -> np.ndarray:
    """What llama.cpp computes from ``blocks(q)``, in fp32 (Q4_1: ``code * d + fp16(m)``)."""
    qtype = qtype or q.gguf_type()
    codes = q.codes.cpu().numpy().astype(np.float32)
    g = q.group_index().cpu().numpy()
    d = q.scales.cpu().numpy().astype(np.float32)[:, g]
    if qtype == "Q4_1":
        m = (-q.scales.cpu().numpy() * q.zeros.cpu().numpy().astype(np.float32))
        return codes * d + m.astype(np.float16).astype(np.float32)[:, g]
    z = q.zeros.cpu().numpy().astype(np.float32)[:, g]
    return (codes - z) * d


def _rows_as_keys(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.dtype.itemsize * a.shape[1]))).ravel()


def match_rows(stored: np.ndarray, q: QuantizedLinear) -> np.ndarray | None:
    """Row order of a converter-written tensor: ``perm`` with ``stored[i] == W[perm[i]]``.

    ``stored`` is the tensor as the GGUF holds it (``[out, in]``, F16/BF16/F32); ``W`` is q's
    dequantized weight cast to the same type (rounding as numpy/torch do). None when the rows
    are not a permutation of W's (the converter transformed the tensor some other way).
    """
    if stored.shape != (q.out_features, q.in_features):
        return None
    w = q.dequantize().cpu()
    if stored.dtype == np.float16:
        ref = w.numpy().astype(np.float16)
    elif stored.dtype == np.float32:
        ref = w.numpy()
    else:  # bf16 arrives as raw uint16 words
        import torch

        ref = w.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        stored = stored.view(np.uint16)
    ref_keys, stored_keys = _rows_as_keys(ref), _rows_as_keys(stored)
    order = np.argsort(ref_keys, kind="stable")
    sorder = np.argsort(stored_keys, kind="stable")
    if not np.array_equal(ref_keys[order], stored_keys[sorder]):
        return None
    perm = np.empty(len(order), dtype=np.int64)
    perm[sorder] = order  # equal rows (same bytes) are paired in order: same values either way
    return perm


def gguf_name(hf_name: str, arch: str, n_blocks: int) -> str | None:
    """The GGUF tensor name llama.cpp's converter gives the HF Linear ``hf_name`` (no .weight)."""
    gguf = require("gguf", "gguf")
    archs = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in archs:
        return None
    name = gguf.get_tensor_name_map(archs[arch], n_blocks).get_name(hf_name)
    return f"{name}.weight" if name else None


def write_quantized(src: Path, dest: Path, quantized: Mapping[str, QuantizedLinear | Callable[
        [], QuantizedLinear]], progress: Any = None) -> dict[str, Any]:
    """Rewrite the converter's GGUF ``src`` into ``dest`` with ``quantized`` tensors as blocks.

    ``quantized`` maps HF Linear names (``model.layers.0.self_attn.q_proj``) to a
    QuantizedLinear or a function returning one (loaded when its tensor is written, so memory
    stays one tensor). Returns ``{"written": [{tensor, hf, type}], "not_written": [{tensor?, hf,
    reason}]}``: the latter stay as in ``src`` and a later llama.cpp quantization re-quantizes
    them, which the manifest must say.
    """
    gguf = require("gguf", "gguf")
    reader = gguf.GGUFReader(str(src))
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else ""
    n_blocks_field = reader.fields.get(f"{arch}.block_count")
    n_blocks = int(n_blocks_field.contents()) if n_blocks_field is not None else 0
    by_name = {t.name: t for t in reader.tensors}
    plan: dict[str, tuple[str, Any]] = {}  # gguf name -> (hf name, source)
    not_written: list[dict[str, Any]] = []
    for hf, source in quantized.items():
        name = gguf_name(hf, arch, n_blocks)
        if name is None or name not in by_name:
            not_written.append({"hf": hf, "tensor": name,
                                "reason": f"no tensor of this GGUF ({arch}) holds it"})
            continue
        plan[name] = (hf, source)

    written: list[dict[str, Any]] = []
    perms: dict[str, np.ndarray] = {}
    for t in reader.tensors:  # what each tensor becomes, before anything is written
        if t.name not in plan:
            continue
        hf, source = plan[t.name]
        q = source() if callable(source) else source
        qtype = q.gguf_type()
        perm = match_rows(np.asarray(t.data), q) if qtype else None
        if qtype is None or perm is None:
            reason = (f"{q.bits}-bit {'sym' if q.sym else 'asym'} group {q.group_size} has no "
                      "exact llama.cpp block type") if qtype is None else \
                "the converter changed this tensor beyond a row permutation"
            not_written.append({"hf": hf, "tensor": t.name, "reason": reason})
            continue
        perms[t.name] = perm
        written.append({"tensor": t.name, "hf": hf, "type": qtype,
                        "shape": (q.out_features, q.in_features // BLOCK * BLOCK_BYTES[qtype])})
    types = {w["tensor"]: w["type"] for w in written}
    counts = {k: list(types.values()).count(k) for k in set(types.values())}
    file_type = getattr(gguf.LlamaFileType, f"MOSTLY_{max(counts, key=counts.get)}") \
        if counts else None  # "mostly Q4_0", as llama.cpp labels a file of Q4_0 matmuls

    task = progress.add_task("write quantized blocks into the GGUF", total=len(reader.tensors)) \
        if progress is not None else None
    with atomic_path(dest) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch, endianess=reader.endianess)
        align = reader.fields.get("general.alignment")
        if align is not None:
            writer.data_alignment = int(align.contents())
        for f in reader.fields.values():
            if f.name == gguf.Keys.General.ARCHITECTURE or f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            value = f.contents()
            if f.name == gguf.Keys.General.FILE_TYPE and file_type is not None:
                value = int(file_type)
            writer.add_key_value(f.name, value, vtype, sub_type=sub)
        by_written = {w["tensor"]: w for w in written}
        for t in reader.tensors:
            if t.name in by_written:
                shape = by_written[t.name]["shape"]
                writer.add_tensor_info(t.name, shape, np.dtype(np.uint8), shape[0] * shape[1],
                                       gguf.GGMLQuantizationType[types[t.name]])
            else:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:  # the blocks are made again here: memory stays one tensor
            if t.name in perms:
                source = plan[t.name][1]
                data = blocks(source() if callable(source) else source)[perms.pop(t.name)]
            else:
                data = t.data
            writer.write_tensor_data(np.asarray(data), tensor_endianess=reader.endianess)
            if task is not None:
                progress.advance(task)
        writer.close()
    for w in written:
        del w["shape"]
    return {"written": written, "not_written": not_written}


def checkpoint_sources(ckpt: Any) -> dict[str, Callable[[], QuantizedLinear]]:
    """``write_quantized``'s ``quantized`` argument for a ``gptq_format.GPTQCheckpoint``: each
    Linear is read from the checkpoint when its tensor is written."""
    return {name: (lambda name=name: ckpt.quantized(name)) for name in ckpt.quantized_names()}


def keep_overrides(written: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(regex, type) pairs for llama.cpp's quantizer (``tt_overrides``) that keep the written
    tensors' types, so it copies them instead of re-quantizing (it copies a tensor whose type
    already equals its target: llama-quant.cpp, ``quantize = cur_type != new_type``)."""
    return [(f"^{t['tensor'].replace('.', '[.]')}$", t["type"]) for t in written]
