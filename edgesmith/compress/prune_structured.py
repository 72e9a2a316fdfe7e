"""Structured pruning: fewer FFN channels, attention heads / KV groups, decoder layers.

The result is a smaller dense model of the same architecture, so every runtime stores and runs
it smaller: config.json gets the new ``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads``, ``head_dim`` (written explicitly: hidden / heads no longer gives it)
and ``num_hidden_layers``. The same counts are kept in every layer, because a Llama-like
config.json (and llama.cpp's converter) has one width for all layers.

1. Layers (``drop_layers``): the calibration text is run through the model layer by layer
   (compress/layerwise.py) and each block's importance is ``1 - cos(input, output)`` averaged
   over the tokens (ShortGPT's block influence); the blocks that change their input least go.
2. Heads and channels, layer by layer on the remaining model (each layer sees the inputs the
   already-pruned layers before it produce). The inputs of ``o_proj`` and ``down_proj`` give
   their Hessians ``H = 2 X X^T / n`` (gptq.Hessian). A channel's (a head's) importance is the
   energy of its contribution to the output, ``W[:, j] H[j, j] W[:, j]^T`` summed over the
   head's columns (``importance: activations``), or the norms of its weights (``magnitude``).
   A KV group's importance is the sum of its query heads'; each kept group keeps the same
   number of its query heads, so the GQA layout stays valid.
3. With ``update`` (default), ``o_proj`` and ``down_proj`` are refitted to what is kept by
   least squares on the calibration inputs, ``W' = W H[:, K] (H[K, K] + damp)^-1``: the
   output the removed channels made is, as far as the kept ones can, made by them.
"""

from __future__ import annotations

from typing import Any

import torch

from edgesmith.compress import gptq, layerwise
from edgesmith.compress.prune import PruneConfig, calibration
from edgesmith.context import RunContext
from edgesmith.errors import ModelError

_DAMP = 0.01


def _parts(layer: torch.nn.Module, prefix: str) -> tuple[Any, Any]:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    need = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
            (mlp, ("gate_proj", "up_proj", "down_proj"))]
    for mod, names in need:
        if mod is None or not all(isinstance(getattr(mod, n, None), torch.nn.Linear)
                                  for n in names):
            raise ModelError(f"{prefix} is not a Llama-like decoder layer (self_attn.q/k/v/"
                             "o_proj and mlp.gate/up/down_proj Linears)",
                             "structured pruning supports Llama, Mistral, Qwen2/3-like models")
    return attn, mlp


def _linear(src: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) \
        -> torch.nn.Linear:
    out = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device=weight.device, dtype=src.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def _rows(m: torch.nn.Linear, idx: torch.Tensor) -> torch.nn.Linear:
    w = m.weight.detach()
    return _linear(m, w[idx], m.bias.detach()[idx] if m.bias is not None else None)


def _cols(m: torch.nn.Linear, idx: torch.Tensor, H: torch.Tensor | None) -> torch.nn.Linear:
    """``m`` reading only input columns ``idx``; refitted by least squares when ``H`` is given."""
    w = m.weight.detach().float()
    if H is None:
        new = w[:, idx]
    else:
        Hk = H[idx][:, idx]
        Hk = Hk + torch.eye(len(idx), device=H.device) * (_DAMP * (torch.diag(Hk).mean() or 1))
        rhs = (w @ H[:, idx]).T  # [k, out]
        new = torch.linalg.solve(Hk, rhs).T
    return _linear(m, new.to(m.weight.dtype), m.bias.detach() if m.bias is not None else None)


def _energy(w: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """Per input column j of ``w``: ``||w[:, j]||^2 H[j, j]`` (its output energy alone)."""
    return w.float().pow(2).sum(0) * torch.diag(H)


def _keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(scores, k).indices).values


class _HeadsAndChannels:
    """The LayerPass of step 2 and 3: prune each layer's heads and FFN channels in place."""

    def __init__(self, config: PruneConfig, cfg: Any) -> None:
        self.c = config
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.rep = self.n_heads // self.n_kv
        self.kv_keep = max(1, round(config.kv_groups_keep * self.n_kv))
        self.rep_keep = max(1, round(config.heads_keep * self.rep))
        width = cfg.intermediate_size
        m = config.multiple_of
        self.ffn_keep = width if config.ffn_keep == 1 else \
            min(width, max(m, round(config.ffn_keep * width / m) * m))
        self.layers: list[dict[str, Any]] = []

    def process(self, index: int, prefix: str, layer: torch.nn.Module,
                inputs: layerwise.LayerInputs) -> None:
        attn, mlp = _parts(layer, prefix)
        hd = attn.head_dim
        hs: dict[str, gptq.Hessian] = {}
        mods = {"o": attn.o_proj, "down": mlp.down_proj}
        for k, mod in mods.items():
            hs[k] = gptq.Hessian(mod.in_features, mod.weight.device)
        layerwise.collect(layer, inputs, mods, lambda n, x: hs[n].add(x))
        rec: dict[str, Any] = {"layer": index}
        if (self.kv_keep, self.rep_keep) != (self.n_kv, self.rep):
            rec.update(self._heads(attn, hs["o"].H, hd))
        if self.ffn_keep != mlp.down_proj.in_features:
            rec.update(self._channels(mlp, hs["down"].H))
        self.layers.append(rec)

    def _heads(self, attn: Any, H: torch.Tensor, hd: int) -> dict[str, Any]:
        wo = attn.o_proj.weight.detach()
        if self.c.importance == "activations":
            per_col = _energy(wo, H)
        else:
            v = attn.v_proj.weight.detach().float().reshape(self.n_kv, hd, -1)
            vnorm = v.pow(2).sum((1, 2)).repeat_interleave(self.rep * hd)
            per_col = wo.float().pow(2).sum(0) * vnorm
        head = per_col.reshape(self.n_heads, hd).sum(1)  # [n_heads]
        groups = head.reshape(self.n_kv, self.rep)
        kv = _keep(groups.sum(1), self.kv_keep)
        q_heads = [int(g) * self.rep + int(j) for g in kv
                   for j in _keep(groups[g], self.rep_keep)]
        q_idx = torch.tensor([h * hd + d for h in q_heads for d in range(hd)])
        kv_idx = torch.tensor([int(g) * hd + d for g in kv for d in range(hd)])
        dev = wo.device
        q_idx, kv_idx = q_idx.to(dev), kv_idx.to(dev)
        attn.q_proj = _rows(attn.q_proj, q_idx)
        attn.k_proj = _rows(attn.k_proj, kv_idx)
        attn.v_proj = _rows(attn.v_proj, kv_idx)
        attn.o_proj = _cols(attn.o_proj, q_idx, H if self.c.update else None)
        attn.num_key_value_groups = self.rep_keep
        return {"kv_groups_kept": [int(g) for g in kv], "heads_kept": q_heads,
                "head_importance": [round(float(x), 6) for x in head]}

    def _channels(self, mlp: Any, H: torch.Tensor) -> dict[str, Any]:
        down = mlp.down_proj.weight.detach()
        if self.c.importance == "activations":
            score = _energy(down, H)
        else:
            score = down.float().norm(dim=0) * (mlp.up_proj.weight.detach().float().norm(dim=1)
                                                + mlp.gate_proj.weight.detach().float().norm(dim=1))
        idx = _keep(score, self.ffn_keep)
        kept_share = float(score[idx].sum() / score.sum()) if float(score.sum()) else 1.0
        mlp.gate_proj = _rows(mlp.gate_proj, idx)
        mlp.up_proj = _rows(mlp.up_proj, idx)
        mlp.down_proj = _cols(mlp.down_proj, idx, H if self.c.update else None)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = self.ffn_keep
        return {"ffn_channels": self.ffn_keep, "ffn_importance_kept": round(kept_share, 4)}


class _Similarity:
    """The LayerPass of step 1: ``1 - cos(input, output)`` of every block, nothing changed."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prev: list[torch.Tensor] | None = None
        self.influence: list[float] = []

    @staticmethod
    def _bi(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
        cos = [torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten()
               for x, y in zip(a, b, strict=True)]
        return float(1 - torch.cat(cos).mean())

    def process(self, index: int, prefix: str, layer: torch.nn.Module,
                inputs: layerwise.LayerInputs) -> None:
        if self.prev is not None:
            self.influence.append(self._bi(self.prev, inputs.hidden))
        self.prev = inputs.hidden
        if index == self.n - 1:
            self.influence.append(self._bi(inputs.hidden, inputs.run(layer)))


def _drop(model: Any, keep: list[int]) -> None:
    prefix, layers = layerwise.decoder_layers(model)
    kept = torch.nn.ModuleList([layers[i] for i in keep])
    for new_i, layer in enumerate(kept):
        for mod in layer.modules():
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_i
    parent = model.get_submodule(prefix.rsplit(".", 1)[0]) if "." in prefix else model
    setattr(parent, prefix.rsplit(".", 1)[-1], kept)
    cfg = model.config
    if isinstance(getattr(cfg, "layer_types", None), list):
        cfg.layer_types = [cfg.layer_types[i] for i in keep]
    cfg.num_hidden_layers = len(keep)


def prune(model: Any, ctx: RunContext, config: PruneConfig) -> dict[str, Any]:
    """Structured pruning of ``model`` in place (its modules replaced by smaller ones)."""
    cfg = model.config
    device = layerwise.pick_device(config.device)
    batches = calibration(model, ctx, config)
    _, layers = layerwise.decoder_layers(model)
    for i, layer in enumerate(layers):
        _parts(layer, f"layer {i}")
    n = len(layers)
    report: dict[str, Any] = {"structure_before": _structure(cfg)}
    if config.drop_layers:
        if config.drop_layers >= n:
            raise ModelError(f"drop_layers {config.drop_layers} would remove all {n} layers",
                             f"use drop_layers below {n}")
        sim = _Similarity(n)
        layerwise.run(layerwise.ModelSource(model, device), batches, sim,
                      progress=ctx.progress, label="prune: block similarity (layers)")
        order = sorted(range(n), key=lambda i: sim.influence[i])
        dropped = sorted(order[: config.drop_layers])
        _drop(model, [i for i in range(n) if i not in dropped])
        report["block_influence"] = [round(x, 6) for x in sim.influence]
        report["dropped_layers"] = dropped
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ModelError("the model's query heads are not a multiple of its KV heads",
                         "structured pruning supports MHA/GQA Llama-like models")
    hc = _HeadsAndChannels(config, cfg)
    if (hc.kv_keep, hc.rep_keep, hc.ffn_keep) != (hc.n_kv, hc.rep, cfg.intermediate_size):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        layerwise.run(layerwise.ModelSource(model, device), batches, hc,
                      progress=ctx.progress, label="prune: heads and channels (layers)")
        cfg.head_dim = head_dim
        cfg.num_key_value_heads = hc.kv_keep
        cfg.num_attention_heads = hc.kv_keep * hc.rep_keep
        cfg.intermediate_size = hc.ffn_keep
        report["layers"] = hc.layers
    report["structure_after"] = _structure(cfg)
    return report


def _structure(cfg: Any) -> dict[str, Any]:
    return {k: getattr(cfg, k, None) for k in ("num_hidden_layers", "num_attention_heads",
                                               "num_key_value_heads", "head_dim",
                                               "intermediate_size", "hidden_size")}
