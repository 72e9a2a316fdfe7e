"""A small generic Llama-family decoder in plain PyTorch, written to trace for Core ML.

transformers' own modelling code (masks built from cache objects, dynamic rope dispatch) does
not trace cleanly with ``torch.jit.trace``; this module computes the same function with only
ops coremltools' torch frontend converts, loads the HF weights under their HF names, and comes
in two forms:

- stateless: ``forward(input_ids [1, S]) -> logits [1, S, V]`` (the causal mask built inside);
- stateful: ``forward(input_ids [1, S], causal_mask [1, 1, S, T]) -> logits [1, S, V]`` (called
  without a mask it runs stateless, as the checks against transformers do), the
  key and value caches registered buffers ``key_cache`` / ``value_cache``
  ``[layers, 1, kv_heads, context, head_dim]`` that coremltools turns into ``ct.StateType``
  states; the positions are ``T - S .. T - 1`` (the mask's width says how many are cached).

Covered: Llama, Mistral (within its sliding window) and Qwen2 (bias on q/k/v), SiLU MLP, RMSNorm,
rope "default"; anything else is refused by ``spec_of`` before any work starts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesmith.errors import ModelError

COVERED = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MASK_MIN = -1e4  # fp16-safe "minus infinity" for masked scores


@dataclass(frozen=True)
class LlamaSpec:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    eps: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool


def _refuse(arch: str, why: str) -> ModelError:
    return ModelError(f"the Core ML exporter does not cover this {arch}: {why}",
                      f"it exports {', '.join(COVERED)} with SiLU, RMSNorm and default rope; "
                      "use --format gguf or onnx for this model")


def spec_of(config: dict[str, Any], context: int | None = None) -> LlamaSpec:
    """The module's shape from an HF config.json, or a ModelError naming what is not covered."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in COVERED), None)
    if arch is None:
        raise _refuse(archs[0] if archs else "model", "not a Llama-family decoder")
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(arch, f"activation {act}")
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if rope else "default"
    if rope_type != "default":
        raise _refuse(arch, f"rope type {rope_type}")
    window = config.get("sliding_window")
    if arch != "LlamaForCausalLM" and window and config.get("use_sliding_window", True) and \
            context and context > int(window):
        raise _refuse(arch, f"context {context} beyond its sliding window {window}")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    theta = config.get("rope_theta") or rope.get("rope_theta") or 10000.0
    qwen = arch == "Qwen2ForCausalLM"
    attn_bias = bool(config.get("attention_bias", False))
    return LlamaSpec(
        vocab=int(config["vocab_size"]), hidden=hidden,
        intermediate=int(config["intermediate_size"]), layers=int(config["num_hidden_layers"]),
        heads=heads, kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or hidden // heads), rope_theta=float(theta),
        eps=float(config.get("rms_norm_eps", 1e-6)),
        tied=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=qwen or attn_bias, o_bias=attn_bias and not qwen,
        mlp_bias=bool(config.get("mlp_bias", False)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.hidden, s.heads * s.head_dim, bias=s.qkv_bias)
        self.k_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.v_proj = nn.Linear(s.hidden, s.kv_heads * s.head_dim, bias=s.qkv_bias)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.hidden, bias=s.o_bias)


class MLP(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden, s.intermediate, bias=s.mlp_bias)
        self.up_proj = nn.Linear(s.hidden, s.intermediate, bias=s.mlp_bias)
        self.down_proj = nn.Linear(s.intermediate, s.hidden, bias=s.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden, s.eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden, s.eps)
        self.mlp = MLP(s)


class Decoder(nn.Module):
    def __init__(self, s: LlamaSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab, s.hidden)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.hidden, s.eps)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rot * sin


class CoreMLLlama(nn.Module):
    """The decoder; ``stateful`` adds the KV cache buffers (``context`` positions)."""

    def __init__(self, s: LlamaSpec, context: int, stateful: bool) -> None:
        super().__init__()
        self.s, self.context, self.stateful = s, context, stateful
        self.model = Decoder(s)
        # a tied head reads the embedding's own parameter: one constant in the package
        self.lm_head = None if s.tied else nn.Linear(s.hidden, s.vocab, bias=False)
        inv = 1.0 / (s.rope_theta ** (torch.arange(0, s.head_dim, 2, dtype=torch.float64)
                                      / s.head_dim))
        freqs = torch.outer(torch.arange(context, dtype=torch.float64), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("rope_cos", emb.cos().float(), persistent=False)
        self.register_buffer("rope_sin", emb.sin().float(), persistent=False)
        if stateful:
            shape = (s.layers, 1, s.kv_heads, context, s.head_dim)
            self.register_buffer("key_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("value_cache", torch.zeros(shape, dtype=torch.float16))

    def _attend(self, i: int, attn: Attention, x: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, mask: torch.Tensor, past: Any, end: Any,
                cached: bool) -> torch.Tensor:
        s = self.s
        n = x.shape[1]
        q = attn.q_proj(x).view(1, n, s.heads, s.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, n, s.kv_heads, s.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(1, n, s.kv_heads, s.head_dim).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cached:
            self.key_cache[i, :, :, past:end, :] = k.to(torch.float16)
            self.value_cache[i, :, :, past:end, :] = v.to(torch.float16)
            k = self.key_cache[i, :, :, :end, :].to(q.dtype)
            v = self.value_cache[i, :, :, :end, :].to(q.dtype)
        rep = s.heads // s.kv_heads
        if rep > 1:  # grouped-query attention: head h reads kv head h // rep
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (s.head_dim ** -0.5) + mask
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
        return attn.o_proj(out.transpose(1, 2).reshape(1, n, s.heads * s.head_dim))

    def forward(self, input_ids: torch.Tensor,
                causal_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = input_ids.shape[-1]
        if causal_mask is None:  # stateless: positions 0..n-1, causal
            pos = torch.arange(n)
            mask = (pos[None, :] > pos[:, None]).float()[None, None] * MASK_MIN
            past, end = 0, n
        else:
            mask = causal_mask
            end = causal_mask.shape[-1]
            past = end - n
        cached = self.stateful and causal_mask is not None  # stateless calls skip the cache
        cos, sin = self.rope_cos[past:end], self.rope_sin[past:end]
        h = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            h = h + self._attend(i, layer.self_attn, layer.input_layernorm(h), cos, sin, mask,
                                 past, end, cached)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return nn.functional.linear(self.model.norm(h), head)

    def load_weights(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load HF-named weights (the tied head may be absent); every parameter must be set."""
        own = dict(self.named_parameters())  # a tied model has no head of its own
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise ModelError(f"the weights lack {missing[0]} ({len(missing)} missing)",
                             "pass the HF model directory the exporter was given")
        with torch.no_grad():
            for name, p in own.items():
                t = tensors[name]
                if tuple(t.shape) != tuple(p.shape):
                    raise ModelError(f"{name} has shape {tuple(t.shape)}, the config says "
                                     f"{tuple(p.shape)}", "the checkpoint and config disagree")
                p.copy_(t.to(torch.float32))


def hf_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a plain safetensors HF model directory (fp32)."""
    from safetensors.torch import load_file

    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise ModelError(f"{hf_dir} has no safetensors weights",
                         "the Core ML exporter reads a safetensors HF model directory")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def from_hf(hf_dir: Path, context: int, stateful: bool) -> CoreMLLlama:
    """The module for ``hf_dir`` with its weights loaded (eval mode, fp32)."""
    config = json.loads((Path(hf_dir) / "config.json").read_text())
    module = CoreMLLlama(spec_of(config, context), context, stateful)
    module.load_weights(hf_tensors(hf_dir))
    return module.eval()
