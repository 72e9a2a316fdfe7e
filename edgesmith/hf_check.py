"""An HF model directory's config.json against sane ranges and against the tensors its
safetensors actually hold, and the memory a load needs against this machine's RAM.

All of it reads only config.json and the safetensors headers, so a config that lies (a
``num_hidden_layers`` of 10**9, a ``vocab_size`` of -1) is refused in milliseconds with a
ModelError naming config.json, the field and the fix, before transformers allocates anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

from edgesmith.errors import ModelError
from edgesmith.safetensors_check import TensorEntry, read_header

# Size fields of a config.json and the range we accept: generous, far beyond any released
# model, and low enough that a load cannot ask for absurd memory before the tensor checks.
CONFIG_RANGES: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 22),
    "hidden_size": (1, 1 << 17),
    "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1 << 10),
    "num_attention_heads": (1, 1 << 12),
    "num_key_value_heads": (1, 1 << 12),
    "head_dim": (1, 1 << 12),
    "max_position_embeddings": (1, 1 << 24),
    "type_vocab_size": (1, 1 << 10),
}
REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers")
# Token embedding tensors, by name suffix (decoder-only archs, then BERT).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight")
_LAYER = re.compile(r"(?:^|\.)layers?\.(\d+)\.")
# Per-layer weights whose shape config.json fixes, by name suffix (the Llama family's names,
# BERT's feed-forward): (config fields, shape from h, i, heads*head_dim, kv_heads*head_dim).
_LAYER_SHAPES: dict[str, tuple[str, Callable[[int, int, int, int], list[int]]]] = {
    ".mlp.gate_proj.weight": ("intermediate_size", lambda h, i, q, kv: [i, h]),
    ".mlp.up_proj.weight": ("intermediate_size", lambda h, i, q, kv: [i, h]),
    ".mlp.down_proj.weight": ("intermediate_size", lambda h, i, q, kv: [h, i]),
    ".intermediate.dense.weight": ("intermediate_size", lambda h, i, q, kv: [i, h]),
    ".self_attn.q_proj.weight": ("num_attention_heads", lambda h, i, q, kv: [q, h]),
    ".self_attn.o_proj.weight": ("num_attention_heads", lambda h, i, q, kv: [h, q]),
    ".self_attn.k_proj.weight": ("num_key_value_heads", lambda h, i, q, kv: [kv, h]),
    ".self_attn.v_proj.weight": ("num_key_value_heads", lambda h, i, q, kv: [kv, h]),
}
# What a process needs besides the weights: torch, the tokenizer, activations of a short window.
LOAD_OVERHEAD_BYTES = 512 << 20


def _fix(field: str) -> str:
    return f"correct {field} in config.json, or re-download the model"


def check_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Every size field an integer in its range; heads that divide. Raises ModelError."""
    for name, (lo, hi) in CONFIG_RANGES.items():
        if name not in cfg:
            if name in REQUIRED:
                raise ModelError(f"{cfg_path} has no {name}", _fix(name))
            continue
        value = cfg[name]
        if value is None and name not in REQUIRED:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise ModelError(f"{cfg_path}: {name} is {_show(value)}, not an integer", _fix(name))
        if not lo <= value <= hi:
            raise ModelError(f"{cfg_path}: {name} is {_show(value)}, outside {lo}..{hi}",
                             _fix(name))
    heads, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ModelError(f"{cfg_path}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv}", _fix("num_key_value_heads"))


def check_tensors(cfg: dict[str, Any], tensors: dict[str, tuple[str, TensorEntry]],
                  cfg_path: Path) -> None:
    """config.json against the tensors present (name -> (shard file name, entry)): the token
    embedding is [vocab_size, hidden_size], the layers are exactly 0..num_hidden_layers-1."""
    vocab, hidden, n_layers = cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]
    embedding = next((n for n in tensors if n.endswith(EMBEDDING_SUFFIXES)), None)
    heads = [n for n in ("lm_head.weight",) if n in tensors]
    if embedding is None and not heads:
        raise ModelError(f"{cfg_path.parent} holds no token embedding tensor "
                         f"(*{EMBEDDING_SUFFIXES[0]})",
                         "point at a complete model directory, or add the missing shards")
    for name in [n for n in (embedding,) if n] + heads:
        shard, entry = tensors[name]
        if list(entry.shape) != [vocab, hidden]:
            raise ModelError(
                f"{cfg_path}: vocab_size {vocab} and hidden_size {hidden} disagree with the "
                f"tensor {name} of shape {list(entry.shape)[:4]} in {shard}",
                "correct vocab_size and hidden_size in config.json to match the weights")
    present: set[int] = set()
    for name in tensors:
        m = _LAYER.search(name)
        if m:
            digits = m.group(1)
            if len(digits) > 6 or int(digits) >= n_layers:
                raise ModelError(f"{cfg_path}: num_hidden_layers is {n_layers} but the weights "
                                 f"hold a layer {digits[:8]} ({name[:80]!r})",
                                 "correct num_hidden_layers in config.json to match the weights")
            present.add(int(digits))
    if len(present) != n_layers:
        first = min(set(range(n_layers)) - present)
        raise ModelError(f"{cfg_path}: num_hidden_layers is {n_layers} but the weights hold "
                         f"{len(present)} layers (layer {first} has no tensors)",
                         f"set num_hidden_layers to {len(present)} if that is the model, or "
                         "add the missing shards")
    _check_layer_shapes(cfg, tensors, cfg_path)


def _check_layer_shapes(cfg: dict[str, Any], tensors: dict[str, tuple[str, TensorEntry]],
                        cfg_path: Path) -> None:
    hidden = cfg["hidden_size"]
    inter = cfg.get("intermediate_size")
    heads = cfg.get("num_attention_heads")
    if not isinstance(inter, int) or not isinstance(heads, int):
        return
    kv = cfg.get("num_key_value_heads")
    kv = kv if isinstance(kv, int) else heads
    head_dim = cfg.get("head_dim")
    head_dim = head_dim if isinstance(head_dim, int) else hidden // heads
    for name, (shard, entry) in tensors.items():
        suffix = next((s for s in _LAYER_SHAPES if name.endswith(s)), None)
        if suffix is None:
            continue
        field, shape_of = _LAYER_SHAPES[suffix]
        expected = shape_of(hidden, inter, heads * head_dim, kv * head_dim)
        if list(entry.shape) != expected:
            raise ModelError(
                f"{cfg_path}: {field} and hidden_size disagree with the tensor {name[:80]} of "
                f"shape {list(entry.shape)[:4]} in {shard} (config.json gives {expected})",
                "correct config.json's sizes (hidden_size, intermediate_size, heads, "
                "head_dim) to match the weights")


def safetensors_tensors(hf_dir: Path) -> dict[str, tuple[str, TensorEntry]]:
    """Every tensor of the directory's shards (name -> (shard name, entry)), each checked;
    a tensor in two shards is refused (transformers would silently take one of them)."""
    tensors: dict[str, tuple[str, TensorEntry]] = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        for name, entry in read_header(shard).tensors.items():
            if name in tensors:
                raise ModelError(f"tensor {name[:80]!r} is in both {tensors[name][0]} and "
                                 f"{shard.name} of {hf_dir}", "remove the stale shard")
            tensors[name] = (shard.name, entry)
    return tensors


def load_bytes(entries: Iterable[TensorEntry]) -> int:
    """Memory a fp32 load of these tensors needs: weights, the largest tensor once more while
    it is converted, and the process's own overhead."""
    sizes = [e.fp32_bytes for e in entries]
    return sum(sizes) + max(sizes, default=0) + LOAD_OVERHEAD_BYTES


def require_memory(need: int, what: str, ram: int | None = None) -> None:
    """Refuse a load that cannot fit in this machine's RAM (``ram`` bytes, default: psutil's
    total), instead of swapping, or being killed, gigabytes later."""
    ram = psutil.virtual_memory().total if ram is None else ram
    if need > ram:
        raise ModelError(f"{what} needs about {_gb(need)} of memory, this machine has "
                         f"{_gb(ram)} of RAM",
                         "use a smaller model, or a machine with more memory")


def require_load_memory(hf_dir: Path) -> None:
    """The memory of a fp32 load of the directory's tensors, against RAM."""
    entries = [entry for _, entry in safetensors_tensors(hf_dir).values()]
    require_memory(load_bytes(entries), f"loading {hf_dir} in fp32")


def require_dequant_memory(gguf_path: Path) -> None:
    """A GGUF's dequantization through transformers: the dequantized model and the fresh copy
    it is saved through, both in fp32, against RAM."""
    from edgesmith.gguf_file import read_header as read_gguf_header

    fp32 = sum(4 * t.n_elements for t in read_gguf_header(gguf_path).tensors)
    require_memory(2 * fp32 + LOAD_OVERHEAD_BYTES,
                   f"dequantizing {gguf_path} to fp32 (transformers)")


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
