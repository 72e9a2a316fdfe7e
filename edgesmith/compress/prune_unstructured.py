"""Unstructured pruning: magnitude, Wanda and SparseGPT, at a fraction or N:M (2:4).

- magnitude: the weights of smallest ``|W|`` go, per Linear (``scope: layer``) or with one
  threshold over all of them (``scope: global``); N:M keeps the N largest of every M
  consecutive inputs of a row. No calibration.
- Wanda (Sun et al. 2023): score ``|W_ij| * ||X_j||_2`` over the calibration inputs of the
  Linear, compared within each output row (or within each group of M for N:M).
- SparseGPT (Frantar & Alistarh 2023): GPTQ's column-by-column solver with a zero instead of a
  rounded value. In blocks of ``block_size`` columns the mask is chosen by ``w^2 / [H^-1]_jj^2``
  (the OBS saliency), and each pruned column's error is spread over the columns not yet
  visited through the upper Cholesky factor of ``H^-1`` (gptq._inverse_cholesky, same
  dampening), with lazy block updates. Hessians are gptq.Hessian's; the Linears sharing an input
  are pruned together and the layer re-run between groups (true-sequential, as GPTQ).

Wanda and SparseGPT go layer by layer through compress/layerwise.py: one decoder layer and the
calibration activations in memory, each layer seeing the pruned layers' outputs.
"""

from __future__ import annotations

from typing import Any

import torch

from edgesmith.compress import gptq, layerwise
from edgesmith.compress.prune import PruneConfig, calibration
from edgesmith.context import RunContext
from edgesmith.errors import ModelError


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """True where a weight goes: the ``m - n`` lowest scores of every ``m`` along the rows."""
    rows, cols = score.shape
    if cols % m:
        raise ModelError(f"a Linear with {cols} inputs cannot be pruned {n}:{m}",
                         f"its input width must be a multiple of {m}")
    s = score.reshape(rows, cols // m, m)
    low = torch.topk(s, m - n, dim=-1, largest=False).indices
    mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, low, True)
    return mask.reshape(rows, cols)


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """True where a weight goes: the lowest ``sparsity`` of every row."""
    k = int(score.shape[1] * sparsity)
    mask = torch.zeros_like(score, dtype=torch.bool)
    if k:
        mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    return mask


def _apply(w: torch.nn.Parameter, mask: torch.Tensor) -> None:
    with torch.no_grad():
        w.masked_fill_(mask, 0.0)


def sparsegpt(weight: torch.Tensor, H: torch.Tensor, sparsity: float,
              nm: tuple[int, int] | None = None, damp: float = 0.01,
              block_size: int = 128) -> torch.Tensor:
    """SparseGPT of one ``[out, in]`` weight given its input Hessian; returns the new weight."""
    W = weight.detach().float().clone()
    n_in = W.shape[1]
    if nm is not None and (n_in % nm[1] or block_size % nm[1]):
        raise ModelError(f"a Linear with {n_in} inputs cannot be pruned {nm[0]}:{nm[1]}",
                         f"its input width (and block_size) must be a multiple of {nm[1]}")
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    Hinv = gptq._inverse_cholesky(H, damp)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        if nm is None:
            mask1 = row_mask(W1.pow(2) / d.pow(2), sparsity) if sparsity > 0 else \
                torch.zeros_like(W1, dtype=torch.bool)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                mask1[:, i:i + m] = nm_mask(W1[:, i:i + m].pow(2) / d[i:i + m].pow(2), nm[0], m)
            w = W1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(w), w)
            err = (w - q) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W


class _Layers:
    """The LayerPass of Wanda and SparseGPT."""

    def __init__(self, config: PruneConfig) -> None:
        self.c = config
        self.groups: list[list[str]] = []
        self.pruned: dict[str, torch.nn.Linear] = {}

    def process(self, index: int, prefix: str, layer: torch.nn.Module,
                inputs: layerwise.LayerInputs) -> None:
        mods = dict(layerwise.linears(layer))
        if self.c.method == "wanda":  # Wanda: one forward, every Linear's input norms
            norms = {n: torch.zeros(m.in_features, device=m.weight.device)
                     for n, m in mods.items()}

            def add(name: str, x: torch.Tensor) -> None:
                norms[name] += x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0)

            layerwise.collect(layer, inputs, mods, add)
            for n, m in mods.items():
                self._wanda(f"{prefix}.{n}", m, norms[n].sqrt())
            return
        if sorted(x for g in self.groups for x in g) != sorted(mods):
            self.groups = layerwise.sequential_groups(layer, inputs)
        for group in self.groups:
            h = gptq.Hessian(mods[group[0]].in_features, mods[group[0]].weight.device)
            layerwise.collect(layer, inputs, {group[0]: mods[group[0]]},
                              lambda _n, x, h=h: h.add(x), stop=True)
            for n in group:
                m = mods[n]
                new = sparsegpt(m.weight, h.H, self.c.sparsity, self.c.nm(), self.c.damp,
                                self.c.block_size)
                with torch.no_grad():
                    m.weight.copy_(new.to(m.weight.dtype))
                self.pruned[f"{prefix}.{n}"] = m

    def _wanda(self, full: str, m: torch.nn.Linear, norm: torch.Tensor) -> None:
        score = m.weight.detach().float().abs() * norm.reshape(1, -1)
        nm = self.c.nm()
        _apply(m.weight, nm_mask(score, *nm) if nm else row_mask(score, self.c.sparsity))
        self.pruned[full] = m


def _magnitude(model: Any, config: PruneConfig) -> dict[str, torch.nn.Linear]:
    prefix, layers = layerwise.decoder_layers(model)
    targets = {f"{prefix}.{i}.{n}": m for i, layer in enumerate(layers)
               for n, m in layerwise.linears(layer)}
    mods = dict(model.named_modules())
    for name in config.modules:
        mod = mods.get(name)
        if not isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
            raise ModelError(f"prune modules: {name} is not a Linear or Embedding of the model",
                             "name lm_head or the embedding's module (model.embed_tokens)")
        targets[name] = mod  # type: ignore[assignment]
    nm = config.nm()
    if config.scope == "global" and nm is None:
        scores = torch.cat([m.weight.detach().abs().flatten().float()
                            for m in targets.values()])
        k = max(1, int(scores.numel() * config.sparsity))
        thresh = torch.kthvalue(scores.cpu(), k).values.item()
        for m in targets.values():
            _apply(m.weight, m.weight.detach().abs() <= thresh)
        return targets
    for m in targets.values():
        score = m.weight.detach().abs().float()
        if nm:
            _apply(m.weight, nm_mask(score, *nm))
        else:
            k = int(score.numel() * config.sparsity)
            if k:
                thresh = torch.kthvalue(score.flatten().cpu(), k).values.item()
                _apply(m.weight, score <= thresh)
    return targets


def prune(model: Any, ctx: RunContext, config: PruneConfig) -> dict[str, Any]:
    """Unstructured pruning of ``model`` in place; the report has the sparsity per Linear."""
    if config.method == "magnitude":
        pruned = _magnitude(model, config)
    else:
        device = layerwise.pick_device(config.device)
        batches = calibration(model, ctx, config)
        lp = _Layers(config)
        layerwise.run(layerwise.ModelSource(model, device), batches, lp, progress=ctx.progress,
                      label=f"prune {config.method} {config.pattern or config.sparsity} (layers)")
        pruned = lp.pruned
    per = [{"name": n, "sparsity": round(float((m.weight == 0).float().mean()), 4),
            "params": m.weight.numel()} for n, m in pruned.items()]
    zeros = sum(p["sparsity"] * p["params"] for p in per)
    total = sum(p["params"] for p in per)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    notes = [f"{n} is tied to the embeddings: pruning one prunes both"
             for n in config.modules if tied and n in ("lm_head", "model.embed_tokens")]
    return {"layers": per, "sparsity_pruned_modules": round(zeros / total, 4) if total else 0.0,
            "untouched": [n for n in ("lm_head", "model.embed_tokens")
                          if n not in config.modules],
            **({"warnings": notes} if notes else {})}
