"""Will a model fit a device? Weights + KV cache + runtime overhead vs usable RAM.

Decode is memory-bound on these devices: every generated token reads all the weights used in
the forward pass and the KV cache once, so memory bandwidth / bytes read per token is an upper
bound on decode tokens/s (the roofline). Estimates follow llama.cpp's memory layout: f16 KV
cache and a compute buffer sized for one micro-batch of 512 tokens without flash attention (an
upper bound: edgesmith's contexts use flash attention, which needs less). The context is also
held against the model's trained context length, beyond which its output degrades.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgesmith.models import ModelRef
from edgesmith.targets.profile import Target

# Nominal bits per weight of llama.cpp types (blocks include their scales), for planning from
# an unquantized model. A GGUF input is measured exactly from its tensors instead.
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.5625, "Q5_K_M": 5.69,
    "Q5_K_S": 5.54, "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5,
    "Q4_1": 5.0, "Q3_K_M": 3.91, "Q2_K": 3.35,
}
RUNTIME_BASE_BYTES = 100e6  # the process, llama.cpp and its libraries
UBATCH = 512


@dataclass
class Shape:
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int
    n_vocab: int
    n_params: int
    embd_params: int
    tied: bool
    n_ctx_train: int | None  # the model's trained context length, where known


@dataclass
class FitReport:
    target: str
    model: str
    quant: str
    ctx: int
    weights_bytes: float
    kv_cache_bytes: float
    compute_bytes: float
    runtime_bytes: float
    total_bytes: float
    usable_ram_bytes: float
    fits: bool
    headroom_bytes: float
    max_ctx_that_fits: int  # by memory alone
    model_ctx_limit: int | None  # the model's trained context length
    ctx_beyond_model: bool  # ctx is longer than the model was trained for
    bytes_read_per_token: float
    decode_tps_upper_bound: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_bytes_per_token(n_layer: int, n_kv_head: int, head_dim: int, elem_bytes: int = 2) -> int:
    """K and V of every layer for one token (f16 elements unless told otherwise)."""
    return 2 * n_layer * n_kv_head * head_dim * elem_bytes


def config_attention(cfg: dict[str, Any]) -> tuple[int, int, int, int]:
    """(layers, query heads, KV heads, head dim) from an HF config.json."""
    n_head = cfg["num_attention_heads"]
    return (cfg["num_hidden_layers"], n_head, cfg.get("num_key_value_heads", n_head),
            cfg.get("head_dim") or cfg["hidden_size"] // n_head)


def _hf_shape(path: Path) -> Shape:
    cfg = json.loads((path / "config.json").read_text())
    n_params = embd = 0
    for shard in path.glob("*.safetensors"):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            count = 1
            for d in meta["shape"]:
                count *= d
            n_params += count
            if "embed_tokens" in name:
                embd += count
    n_layer, n_head, n_kv, head_dim = config_attention(cfg)
    return Shape(n_layer, cfg["hidden_size"], n_head, n_kv, head_dim, cfg["vocab_size"],
                 n_params, embd, bool(cfg.get("tie_word_embeddings", False)),
                 cfg.get("max_position_embeddings"))


def _gguf_shape(path: Path) -> tuple[Shape, float, float]:
    """Shape, total tensor bytes, and bytes of token_embd (a row lookup, not a matmul)."""
    from edgesmith.gguf_file import read_header

    r = read_header(path)
    arch = r.field("general.architecture")
    g = lambda k: r.field(f"{arch}.{k}")  # noqa: E731
    names = {t.name for t in r.tensors}
    n_embd, n_head = int(g("embedding_length")), int(g("attention.head_count"))
    n_kv = int(g("attention.head_count_kv") or n_head)
    head_dim = int(g("attention.key_length") or n_embd // n_head)
    tok = next(t for t in r.tensors if t.name == "token_embd.weight")
    n_vocab = int(tok.shape[-1])
    total = float(sum(t.n_bytes for t in r.tensors))
    n_params = sum(t.n_elements for t in r.tensors)
    shape = Shape(int(g("block_count")), n_embd, n_head, n_kv, head_dim, n_vocab, n_params,
                  int(tok.n_elements), "output.weight" not in names,
                  int(g("context_length")) if g("context_length") else None)
    return shape, total, float(tok.n_bytes)


def estimate(ref: ModelRef, target: Target, ctx: int, quant: str | None = None) -> FitReport:
    """Memory needed to run ``ref`` at ``ctx`` tokens on ``target`` with llama.cpp."""
    if ref.kind == "gguf":
        shape, weights, embd_bytes = _gguf_shape(ref.path)
        quant = quant or "as-is"
        read = weights - (0.0 if shape.tied else embd_bytes)
    else:
        shape = _hf_shape(ref.path)
        quant = quant or "Q4_K_M"
        bpw = BITS_PER_WEIGHT[quant]
        weights = shape.n_params * bpw / 8
        read = weights - (0.0 if shape.tied else shape.embd_params * bpw / 8)
    kv_per_token = kv_bytes_per_token(shape.n_layer, shape.n_kv_head, shape.head_dim)
    kv = kv_per_token * ctx
    compute = lambda c: UBATCH * (4 * shape.n_embd + shape.n_vocab) * 4 \
        + UBATCH * c * shape.n_head * 4  # noqa: E731
    total = weights + kv + compute(ctx) + RUNTIME_BASE_BYTES
    usable = target.usable_ram_bytes
    fixed = weights + RUNTIME_BASE_BYTES + UBATCH * (4 * shape.n_embd + shape.n_vocab) * 4
    per_ctx = kv_per_token + UBATCH * shape.n_head * 4
    max_ctx = max(0, int((usable - fixed) // per_ctx))
    bytes_per_token = read + kv  # worst case: the KV cache is full
    return FitReport(
        target=target.name, model=ref.spec, quant=quant, ctx=ctx, weights_bytes=weights,
        kv_cache_bytes=float(kv), compute_bytes=float(compute(ctx)),
        runtime_bytes=RUNTIME_BASE_BYTES, total_bytes=total, usable_ram_bytes=usable,
        fits=total <= usable, headroom_bytes=usable - total, max_ctx_that_fits=max_ctx,
        model_ctx_limit=shape.n_ctx_train,
        ctx_beyond_model=shape.n_ctx_train is not None and ctx > shape.n_ctx_train,
        bytes_read_per_token=bytes_per_token,
        decode_tps_upper_bound=target.memory_bandwidth_gbs * 1e9 / bytes_per_token,
    )
