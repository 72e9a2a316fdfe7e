"""A tiny llama GGUF that llama.cpp loads (built with gguf-py's GGUFWriter, ~100 KB), and the
byte-level patches the hostile-file tests apply to it.

The patches find their place with their own small walk of the header (``layout``), not with
edgesmith's reader, so a bug in the reader cannot hide in the test's input.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_CTX = 2, 64, 4, 2, 128, 256
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def build(path: Path, *, template: str = TEMPLATE, alignment: bool = True, seed: int = 0) -> Path:
    """Write the tiny model: SentencePiece-style vocabulary of byte tokens, Q8_0 matrices
    (general.alignment written out, 32, unless ``alignment`` is false)."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, TokenType
    from gguf.quants import quantize

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581a", "a"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL] + [TokenType.BYTE] * 256 \
        + [TokenType.NORMAL] * 2
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_layer_norm_rms_eps(1e-5)
    if alignment:
        w.add_custom_alignment(32)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    if template:
        w.add_chat_template(template)

    def mat(name: str, rows: int, cols: int, qtype: Q = Q.Q8_0) -> None:
        data = (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)
        w.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)

    mat("token_embd.weight", len(tokens), N_EMBD)
    for i in range(N_LAYER):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(N_EMBD, np.float32))
        mat(f"blk.{i}.attn_q.weight", N_EMBD, N_EMBD)
        mat(f"blk.{i}.attn_k.weight", N_EMBD // N_HEAD * N_HEAD_KV, N_EMBD)
        mat(f"blk.{i}.attn_v.weight", N_EMBD // N_HEAD * N_HEAD_KV, N_EMBD, Q.F16)
        mat(f"blk.{i}.attn_output.weight", N_EMBD, N_EMBD)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(N_EMBD, np.float32))
        mat(f"blk.{i}.ffn_gate.weight", N_FF, N_EMBD)
        mat(f"blk.{i}.ffn_up.weight", N_FF, N_EMBD)
        mat(f"blk.{i}.ffn_down.weight", N_EMBD, N_FF)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# -- a walk of the header, for patches ----------------------------------------------------

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@dataclass
class Layout:
    value_at: dict[str, tuple[int, int]]  # key -> (position of its type field, of its value)
    tensor_at: dict[str, int]  # tensor name -> position of its n_dims field
    header_end: int


def layout(data: bytes) -> Layout:
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        s = data[pos + 8 : pos + 8 + n].decode()
        pos += 8 + n
        return s

    def skip(vtype: int) -> None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                skip(etype)
        else:
            pos += _SIZES[vtype]

    values = {}
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", data, pos)
        values[key] = (pos, pos + 4)
        pos += 4
        skip(vtype)
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        tensors[name] = pos
        (n_dims,) = struct.unpack_from("<I", data, pos)
        pos += 4 + 8 * n_dims + 4 + 8
    return Layout(values, tensors, pos)


def set_value(data: bytearray, key: str, fmt: str, value: Any) -> bytearray:
    """Overwrite a scalar field in place (same size: fmt is the field's own format)."""
    _, at = layout(bytes(data)).value_at[key]
    struct.pack_into(fmt, data, at, value)
    return data


def set_type(data: bytearray, key: str, vtype: int) -> bytearray:
    at, _ = layout(bytes(data)).value_at[key]
    struct.pack_into("<I", data, at, vtype)
    return data


def tensor_fields(data: bytes, name: str) -> tuple[int, int]:
    """Positions of a tensor's type and of its offset in the tensor table."""
    at = layout(data).tensor_at[name]
    (n_dims,) = struct.unpack_from("<I", data, at)
    type_at = at + 4 + 8 * n_dims
    return type_at, type_at + 4


def kv_bytes(key: str, vtype: int, payload: bytes) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + payload


def insert_kv(data: bytes, key: str, vtype: int, payload: bytes, align: int = 32) -> bytearray:
    """Add one metadata item before the others, and a filler item that makes the header grow
    by a multiple of the alignment, so the tensors' data stays where their offsets say."""
    item = kv_bytes(key, vtype, payload)
    filler = kv_bytes("test.filler", 0, b"\0")
    filler = kv_bytes("test.filler" + "_" * (-(len(item) + len(filler)) % align), 0, b"\0")
    out = bytearray(data[:24] + item + filler + data[24:])
    (n_kv,) = struct.unpack_from("<Q", out, 16)
    struct.pack_into("<Q", out, 16, n_kv + 2)
    return out


def rename(data: bytearray, old: str, new: str) -> bytearray:
    """Rename a key or tensor to a name of the same length."""
    assert len(old) == len(new)
    k = struct.pack("<Q", len(old)) + old.encode()
    at = data.index(k)
    data[at + 8 : at + 8 + len(old)] = new.encode()
    return data


def nested_arrays(depth: int) -> bytes:
    """The payload of an array of arrays ``depth`` deep around an empty array of uint8."""
    return struct.pack("<IQ", 9, 1) * (depth - 1) + struct.pack("<IQ", 0, 0)
