"""What a GGUF's header must satisfy before llama.cpp or transformers is handed the file.

llama.cpp answers many inconsistent headers with a GGML_ASSERT (SIGABRT, no message at all, the
whole process gone: ``llama.block_count = 1000``), and transformers dequantizes whatever shapes
the header declares (gigabytes of garbage for ``rope.dimension_count = 4096``). This module
states, once, the rules of llama.cpp's GGUF loader (ggml/src/gguf.cpp) and hyperparameter
loader (src/llama-model.cpp, of the llama.cpp that llama-cpp-python pins), and checks a header
against them and against the tensors actually present. Header only: no tensor data is read.

``structure_problem(header)`` returns the first problem as a phrase, or None.
"""

from __future__ import annotations

import array
import math
import re
from collections.abc import Callable
from typing import Any

from edgesmith.gguf_file import _ARRAY, _STRING, INTEGER_TYPES, GGUFHeader, TensorInfo, shown

# llama.cpp's limits
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # a tensor name must be shorter
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
INT64_MAX = 2**63 - 1
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# architectures with llama's tensor layout, whose tensor shapes are checked one by one
LLAMA_LAYOUT = frozenset({"llama", "qwen2", "qwen3", "llama-embed"})
# architectures whose rope dimension must equal the head size (llama.cpp throws, or asserts
# in the graph of the llama layout)
ROPE_IS_HEAD = LLAMA_LAYOUT | {"deci", "falcon"}
# architectures without the usual hyperparameters or with another meaning for them
NO_HPARAMS = frozenset({"clip"})
EMBD_NOT_TOKEN_EMBD = frozenset({"wavtokenizer-dec"})
_BLOCK = re.compile(r"blk\.(\d+)\.")
# types llama.cpp has no matrix kernels for: a weight of one of these crashes it (SIGSEGV)
NOT_WEIGHT_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64"})

Problem = str | None


def structure_problem(h: GGUFHeader) -> Problem:
    for check in (_tensor_table, _metadata, _hyperparameters, _vocabulary):
        problem = check(h)
        if problem:
            return problem
    return None


# -- the tensor table, as ggml's gguf loader reads it --------------------------------------

def _tensor_table(h: GGUFHeader) -> Problem:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if not h.tensors:
        return "it holds no tensors"
    expected = 0  # each tensor starts where the one before ends, padded to the alignment
    prev: TensorInfo | None = None
    for t in h.tensors:
        if len(t.name) >= GGML_MAX_NAME:
            return f"tensor name {shown(t.name)!r} is {len(t.name)} characters (llama.cpp: " \
                   f"under {GGML_MAX_NAME})"
        if len(t.shape) > GGML_MAX_DIMS:
            return f"tensor {shown(t.name)} has {len(t.shape)} dimensions (llama.cpp: at most " \
                   f"{GGML_MAX_DIMS})"
        if any(d > INT64_MAX for d in t.shape) or t.n_elements > INT64_MAX:
            return f"tensor {shown(t.name)} has the impossible shape {list(t.shape)}"
        if t.type in NOT_WEIGHT_TYPES and t.name.endswith(".weight"):
            return f"tensor {shown(t.name)} has type {t.type}, which llama.cpp cannot compute " \
                   "with (a weight is a float or quantized type)"
        block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[t.type]]
        row = t.shape[0] if t.shape else 1
        if row % block:
            return f"tensor {shown(t.name)} of type {t.type} has rows of {row} values, not a " \
                   f"multiple of its block size {block}"
        rel = t.offset - h.data_offset
        if rel != expected:
            return _misplaced(t, rel, expected, prev, h.alignment)
        expected += -(-t.n_bytes // h.alignment) * h.alignment
        prev = t
    end = h.data_offset + expected  # the reader checked that no tensor runs past the file
    if h.file_size > end:
        return f"{h.file_size - end} bytes after the last tensor's data belong to no tensor " \
               "(a tensor's type or shape does not match its data)"
    return None


def _misplaced(t: TensorInfo, rel: int, expected: int, prev: TensorInfo | None,
               align: int) -> str:
    where = f"tensor {shown(t.name)} starts at data offset {rel}"
    if rel % align:
        return f"{where}, not aligned to {align} bytes"
    if prev is None:
        return f"{where}, not 0: the first tensor starts the data section"
    name = shown(prev.name)
    was = f"{name} ({prev.type}, shape {list(prev.shape)}) ends at {expected}"
    if rel < expected:
        return f"{where} but {was}: they overlap, or {name}'s type or shape was changed"
    return f"{where} but {was}: a gap, or {name}'s type or shape was changed"


# -- metadata llama.cpp cannot read ---------------------------------------------------------

def _metadata(h: GGUFHeader) -> Problem:
    for key, vtype in h.types.items():
        if vtype[:2] == (_ARRAY, _ARRAY):
            return f"{shown(key)} is an array of arrays, which llama.cpp cannot read"
        if not key:
            return "a metadata key is empty"
    arch = h.field("general.architecture")
    if h.types.get("general.architecture") != (_STRING,) or not arch:
        return "general.architecture is missing or not a string"
    return None


# -- hyperparameters against llama.cpp's limits and the tensors present --------------------

class _Bad(Exception):
    pass


def _int(h: GGUFHeader, key: str, default: int | None = None, lo: int = 0,
         hi: int = 2**32 - 1) -> int:
    if key not in h.fields:
        if default is None:
            raise _Bad(f"{key} is missing")
        return default
    value = h.fields[key]
    if h.types[key][0] not in INTEGER_TYPES:
        raise _Bad(f"{key} is {_show(value)}, not an integer")
    if not lo <= value <= hi:
        raise _Bad(f"{key} is {value}, outside [{lo}, {hi}]")
    return int(value)


def _per_layer(h: GGUFHeader, key: str, n_layer: int, default: list[int]) -> list[int]:
    """A value that is one integer or an array of one per layer (llama.cpp's get_key_or_arr)."""
    if key not in h.fields:
        return default
    value = h.fields[key]
    if h.types[key][0] != _ARRAY:
        return [_int(h, key)] * n_layer
    if h.types[key][1] not in INTEGER_TYPES:
        raise _Bad(f"{key} is an array of non-integers")
    if len(value) != n_layer:
        raise _Bad(f"{key} has {len(value)} values for {n_layer} layers")
    if any(not 0 <= v < 2**32 for v in value):
        raise _Bad(f"{key} holds a value outside [0, 2^32)")
    return [int(v) for v in value]


def _show(value: Any) -> str:
    if isinstance(value, (list, array.array)):
        return f"an array of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _hyperparameters(h: GGUFHeader) -> Problem:
    arch = str(h.field("general.architecture"))
    if arch in NO_HPARAMS:
        return None
    try:
        _check_hparams(h, arch, lambda k: f"{arch}.{k}")
    except _Bad as bad:
        return str(bad)
    return None


def _check_hparams(h: GGUFHeader, arch: str, k: Callable[[str], str]) -> None:
    n_layer = _int(h, k("block_count"), lo=1, hi=LLAMA_MAX_LAYERS)
    blocks = {int(m.group(1)) for t in h.tensors if (m := _BLOCK.match(t.name))}
    if blocks and blocks != set(range(n_layer)):
        found = f"blk.0 to blk.{max(blocks)}" if blocks == set(range(max(blocks) + 1)) \
            else f"{len(blocks)} distinct blocks up to blk.{max(blocks)}"
        raise _Bad(f"{k('block_count')} is {n_layer} but the tensors are of {found}")
    _int(h, k("nextn_predict_layers"), 0, hi=n_layer)
    _int(h, k("context_length"), lo=1)
    n_embd = _int(h, k("embedding_length"), lo=1)
    tok = next((t for t in h.tensors if t.name == "token_embd.weight"), None)
    if tok is not None and arch not in EMBD_NOT_TOKEN_EMBD and tok.shape[:1] != (n_embd,):
        raise _Bad(f"{k('embedding_length')} is {n_embd} but token_embd.weight has shape "
                   f"{list(tok.shape)}")
    _experts(h, k, n_layer)
    zeros = [0] * n_layer
    n_head = _per_layer(h, k("attention.head_count"), n_layer, zeros)
    n_head_kv = _per_layer(h, k("attention.head_count_kv"), n_layer, n_head)
    for il, (q, kv) in enumerate(zip(n_head, n_head_kv, strict=True)):
        if kv > q or (kv and q % kv):
            raise _Bad(f"layer {il} has {q} attention heads and {kv} key-value heads (the "
                       "key-value heads must divide the heads)")
    for key in (k("attention.layer_norm_rms_epsilon"), k("attention.layer_norm_epsilon")):
        eps = h.field(key, 0.0)
        if isinstance(eps, (list, array.array, str)) or not 0 <= eps < math.inf:
            raise _Bad(f"{key} is {_show(eps)}, not a finite number >= 0")  # llama.cpp asserts
    scaling = h.field(k("rope.scaling.type"), "linear")
    if scaling not in ROPE_SCALING_TYPES:
        raise _Bad(f"{k('rope.scaling.type')} is {_show(scaling)}, not one of "
                   f"{', '.join(ROPE_SCALING_TYPES)}")
    if not n_head[0]:
        return
    if k("attention.key_length") not in h.fields and n_embd % n_head[0]:
        raise _Bad(f"{k('embedding_length')} {n_embd} is not a multiple of "
                   f"{k('attention.head_count')} {n_head[0]}")
    d_k = _int(h, k("attention.key_length"), n_embd // n_head[0], lo=1)
    d_v = _int(h, k("attention.value_length"), n_embd // n_head[0], lo=1)
    n_rot = _int(h, k("rope.dimension_count"), d_k)
    if n_rot > d_k or n_rot % 2 or (arch in ROPE_IS_HEAD and n_rot != d_k):
        need = f"equal to the head size {d_k}" if arch in ROPE_IS_HEAD \
            else f"even and at most the head size {d_k}"
        raise _Bad(f"{k('rope.dimension_count')} is {n_rot}, must be {need}")
    if arch in LLAMA_LAYOUT:
        if d_v != d_k:
            raise _Bad(f"key length {d_k} and value length {d_v} differ")
        if 0 in n_head_kv:
            raise _Bad(f"{k('attention.head_count_kv')} is 0 for a layer")
        n_ff = _per_layer(h, k("feed_forward_length"), n_layer, zeros)
        _llama_shapes(h, n_embd, n_head, n_head_kv, d_k, d_v, n_ff, n_rot)


def _experts(h: GGUFHeader, k: Callable[[str], str], n_layer: int) -> None:
    n_expert = _int(h, k("expert_count"), 0, hi=LLAMA_MAX_EXPERTS)
    used = max(_per_layer(h, k("expert_used_count"), n_layer, [0]))
    groups = _int(h, k("expert_group_count"), 0)
    group_used = _int(h, k("expert_group_used_count"), 0)
    if n_expert == 0:
        if used or groups:
            raise _Bad(f"{k('expert_used_count')} or {k('expert_group_count')} set with no "
                       "experts")
        return
    if not 0 < used <= n_expert:
        raise _Bad(f"{k('expert_used_count')} is {used}, must be in [1, {n_expert}]")
    if groups >= n_expert or (groups > 1 and (n_expert % groups
                                               or not 0 < group_used < groups)):
        raise _Bad(f"{n_expert} experts cannot form {groups} groups of which {group_used} "
                   "are used")


def _llama_shapes(h: GGUFHeader, n_embd: int, n_head: list[int], n_head_kv: list[int],
                  d_k: int, d_v: int, n_ff: list[int], n_rot: int) -> None:
    """Each tensor of llama's layout has the shape its hyperparameters give it (ggml order)."""
    n_vocab = _n_vocab(h)
    top: dict[str, tuple[int, ...]] = {"output_norm.weight": (n_embd,),
                                       "rope_freqs.weight": (n_rot // 2,)}
    if n_vocab is not None:
        top["token_embd.weight"] = top["output.weight"] = (n_embd, n_vocab)
    for t in h.tensors:
        m = _BLOCK.match(t.name)
        if m is None:
            want = top.get(t.name)
        else:
            il = int(m.group(1))
            q, kv, ff = n_head[il], n_head_kv[il], n_ff[il]
            want = {
                "attn_norm.weight": (n_embd,), "ffn_norm.weight": (n_embd,),
                "attn_q.weight": (n_embd, q * d_k), "attn_k.weight": (n_embd, kv * d_k),
                "attn_v.weight": (n_embd, kv * d_v), "attn_output.weight": (q * d_v, n_embd),
                "attn_q_norm.weight": (d_k,), "attn_k_norm.weight": (d_k,),
                "ffn_gate.weight": (n_embd, ff), "ffn_up.weight": (n_embd, ff),
                "ffn_down.weight": (ff, n_embd),
            }.get(t.name[m.end():])
        if want is not None and t.shape != want:
            raise _Bad(f"tensor {shown(t.name)} has shape {list(t.shape)}, the "
                       f"hyperparameters give {list(want)}")


def _n_vocab(h: GGUFHeader) -> int | None:
    arch = h.field("general.architecture")
    if f"{arch}.vocab_size" in h.fields:
        return _int(h, f"{arch}.vocab_size", lo=1)
    tokens = h.field("tokenizer.ggml.tokens")
    return len(tokens) if isinstance(tokens, list) else None


# -- the vocabulary -------------------------------------------------------------------------

def _vocabulary(h: GGUFHeader) -> Problem:
    tokens = h.field("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    if h.types["tokenizer.ggml.tokens"] != (_ARRAY, _STRING):
        return "tokenizer.ggml.tokens is not an array of strings"
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        if key in h.fields and (not isinstance(h.fields[key], (list, array.array))
                                or len(h.fields[key]) != len(tokens)):
            return f"{key} has {_show(h.fields[key])} for {len(tokens)} tokens"
    # llama.cpp asserts that each token's text is unique (tokens our reader could not decode
    # may differ in their bytes: they are left out)
    decoded = [t for t in tokens if "\ufffd" not in t]
    if len(set(decoded)) != len(decoded):
        seen: set[str] = set()
        for t in decoded:
            if t in seen:
                return f"the token {shown(t)!r} is in tokenizer.ggml.tokens twice"
            seen.add(t)
    return None
