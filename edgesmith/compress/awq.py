"""Torch-side pass: activation-aware weight scaling (AWQ, Lin et al. 2023).

AWQ does not quantize, it prepares a model for the quantizer that follows (RTN, GPTQ,
llama.cpp's). For a group of linears that read the same input x (q/k/v after the attention norm,
gate/up after the MLP norm, o after v, down after up), multiplying input channel j of their
weights by s_j and dividing channel j of the op that produces x by s_j leaves the model's
function unchanged, but moves the later rounding error away from the channels that carry large
activations. Per decoder layer, on the calibration text:

1. a grid search of ``s = mean|x|^a / mean|w~|^(1-a)`` (``w~``: the weights relative to their
   quantization group's largest magnitude; ``a = i / n_grid``), normalized to
   ``sqrt(max s * min s) = 1``, plus ``s = 1``, minimizing the squared error of the block's output
   (the attention, the MLP or the linear) with the group's weights fake-quantized on the very grid
   the exporters write (``qweights``: group-32 asymmetric 4-bit is GGUF Q4_1, symmetric Q4_0);
2. the scales folded into the preceding norm's weight (``(1 + w) / s - 1`` for Gemma's norms,
   whose output is ``x_hat * (1 + w)``) or into the rows of the preceding linear;
3. a clipping search: per output row and quantization group, the largest magnitude shrunk by up
   to half, on the same grid, minimizing that group's share of the linear's output error on the
   calibration inputs. q and k stay unclipped (their error goes through the softmax), as AutoAWQ.

The model stays an ordinary HF model with plain fp weights. Every layer's inputs are those of
the fp model, as in AutoAWQ. The structure is checked before any search: each layer must be the
Llama-like block (Llama, Mistral, Qwen2/3, Gemma 1/2/3...), its norms must scale by ``w`` or
``1 + w``, and folding random scales into a copy of each layer must leave its output unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.compress.qweights import QuantSpec, fake_quantize, group_params
from edgesmith.context import RunContext
from edgesmith.errors import ModelError

MAX_SHRINK = 0.5  # the clipping search shrinks a group's range by at most this fraction
CLIP_TOKENS = 512  # calibration tokens the clipping search uses (evenly spaced)
TOKENS_PER_BATCH = 4096  # tokens per forward of a block during the searches
_NO_CLIP = ("self_attn.q_proj", "self_attn.k_proj")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


class AWQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[32, 64, 128] = 128
    sym: bool = Field(False, description="symmetric grid (Q4_0 at group 32); asymmetric (Q4_1, "
                                         "integer zero point) by default, as AWQ")
    duo_scaling: bool = Field(True, description="s = x^a / w^(1-a); false: s = x^a")
    n_grid: int = Field(20, ge=1, le=100, description="grid points of the scale search; the "
                                                      "clipping search takes half as many")
    # measured on a trained tiny Llama: clipping for this grid helps when the weights are then
    # rounded on it (RTN, GGUF Q4_0/Q4_1 blocks) and hurts before GPTQ or llama.cpp's k-quants,
    # which choose their own ranges from the unclipped weights
    clip: bool = Field(True, description="search the clipping of each weight group; false "
                                         "before gptq or a k-quant gguf_quantize step")

    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym)


@dataclass(frozen=True)
class Group:
    """Linears of one decoder layer that read the same input, and where that input comes from."""

    name: str  # for the report: qkv, o, gate_up, down
    prev: str  # the module (in the layer) whose output the linears read
    offset: float | None  # prev is a norm whose output is x_hat * (offset + w); None: a Linear
    linears: tuple[str, ...]
    inspect: str  # the module whose output the scale search compares


# --- structure ------------------------------------------------------------------------------
def _unknown(model: Any, why: str) -> ModelError:
    arch = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    return ModelError(f"AWQ does not know the structure of {arch}: {why}",
                      "AWQ folds scales into Llama-like decoders (Llama, Mistral, Qwen2/3, "
                      "Gemma); leave the awq step out of the recipe for this model")


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise _unknown(model, "it has no list of decoder layers (model.layers)")
    return list(layers)


@torch.no_grad()
def norm_offset(norm: torch.nn.Module) -> float | None:
    """0 when ``norm(x) = x_hat * w``, 1 when ``x_hat * (1 + w)`` (Gemma), None otherwise.

    Found by probing: the output with w = 0, w = 1 and a random w must be ``x_hat * (o + w)``.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.nn.Parameter) or w.dim() != 1 \
            or getattr(norm, "bias", None) is not None:
        return None
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, w.numel(), generator=gen).to(w.device, w.dtype)
    r = (torch.rand(w.numel(), generator=gen) + 0.5).to(w.device, w.dtype)
    saved = w.detach().clone()
    outs = []
    try:
        for value in (torch.zeros_like(w), torch.ones_like(w), r):
            w.copy_(value)
            outs.append(norm(x).float())
    finally:
        w.copy_(saved)
    y0, y1, yr = outs
    x_hat = y1 - y0
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    scale = float(x_hat.abs().max()) or 1.0
    for offset in (0.0, 1.0):
        if float((y0 - offset * x_hat).abs().max()) <= tol * scale and \
                float((yr - (offset + r.float()) * x_hat).abs().max()) <= tol * 4 * scale:
            return offset
    return None


def layer_groups(model: Any, index: int, layer: torch.nn.Module) -> list[Group]:
    """The scaling groups of one decoder layer; a ModelError when it is not Llama-like."""
    mods = dict(layer.named_modules())
    wanted = [f"self_attn.{n}" for n in _ATTN] + [f"mlp.{n}" for n in _MLP]
    missing = [n for n in wanted if not isinstance(mods.get(n), torch.nn.Linear)]
    if missing:
        raise _unknown(model, f"layer {index} has no Linear {', '.join(missing)}")
    others = [n for n, m in mods.items() if isinstance(m, torch.nn.Linear) and n not in wanted]
    if others:
        raise _unknown(model, f"layer {index} has linears AWQ does not place: {', '.join(others)}")
    mlp_norm = "pre_feedforward_layernorm" if "pre_feedforward_layernorm" in mods \
        else "post_attention_layernorm"
    offsets = {}
    for norm in ("input_layernorm", mlp_norm):
        if norm not in mods:
            raise _unknown(model, f"layer {index} has no {norm}")
        offsets[norm] = norm_offset(mods[norm])
        if offsets[norm] is None:
            raise _unknown(model, f"layer {index}'s {norm} ({type(mods[norm]).__name__}) does not "
                                  "scale its output by its weight w or by 1 + w")
    lin = {n: mods[n] for n in wanted}
    widths = {"input_layernorm": mods["input_layernorm"].weight.numel(),
              mlp_norm: mods[mlp_norm].weight.numel()}
    v, o = lin["self_attn.v_proj"], lin["self_attn.o_proj"]
    groups = [Group("qkv", "input_layernorm", offsets["input_layernorm"],
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn")]
    # o's input channel j is v's output channel j only when every head has its own k/v head
    # (no GQA); AutoAWQ's condition, as a shape check
    if v.out_features == o.in_features:
        groups.append(Group("o", "self_attn.v_proj", None, ("self_attn.o_proj",),
                            "self_attn.o_proj"))
    groups += [Group("gate_up", mlp_norm, offsets[mlp_norm], ("mlp.gate_proj", "mlp.up_proj"),
                     "mlp"),
               Group("down", "mlp.up_proj", None, ("mlp.down_proj",), "mlp.down_proj")]
    for g in groups:
        width = widths[g.prev] if g.offset is not None else lin[g.prev].out_features
        bad = [n for n in g.linears if lin[n].in_features != width]
        if bad:
            raise _unknown(model, f"layer {index}: {', '.join(bad)} do not read {g.prev}'s "
                                  f"{width} outputs")
    return groups


def check_group_size(model: Any, layers: list[torch.nn.Module], spec: QuantSpec) -> None:
    prefix = _layers_prefix(model, layers)
    for i, layer in enumerate(layers):
        for name, m in layer.named_modules():
            if isinstance(m, torch.nn.Linear):
                spec.check(f"{prefix}.{i}.{name}", m.in_features)


def _layers_prefix(model: Any, layers: list[torch.nn.Module]) -> str:
    return next((n.rsplit(".", 1)[0] for n, m in model.named_modules() if m is layers[0]),
                "model.layers")


# --- folding --------------------------------------------------------------------------------
@torch.no_grad()
def fold(layer: torch.nn.Module, group: Group, s: torch.Tensor) -> None:
    """Scale the group's input channels by ``s`` and its producer's output by ``1 / s``."""
    prev = layer.get_submodule(group.prev)
    w = prev.weight
    s = s.to(w.device, torch.float32)
    if group.offset is None:
        w.copy_((w.float() / s[:, None]).to(w.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.copy_((prev.bias.float() / s).to(prev.bias.dtype))
    else:
        w.copy_(((group.offset + w.float()) / s - group.offset).to(w.dtype))
    for name in group.linears:
        lw = layer.get_submodule(name).weight
        lw.copy_((lw.float() * s[None, :]).to(lw.dtype))


# --- calibration ----------------------------------------------------------------------------
def calibration_ids(tokenizer: Any, calib: CalibrationConfig) -> torch.Tensor:
    """The calibration text as ``[chunks, seq_len]`` token ids (as the importance matrix)."""
    ids = tokenizer(calib.text(), add_special_tokens=False)["input_ids"]
    n = min(calib.samples, len(ids) // calib.seq_len)
    if n < 1:
        raise ModelError(f"calibration text has {len(ids)} tokens, less than one chunk of "
                         f"{calib.seq_len}", "use a longer calibration text or a smaller seq_len")
    return torch.tensor(ids[: n * calib.seq_len]).reshape(n, calib.seq_len)


class _Stop(Exception):
    pass


def _hidden_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _capture(model: Any, layers: list[torch.nn.Module], ids: torch.Tensor) \
        -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Layer 0's input for every chunk, and every layer's keyword arguments (for one chunk:
    rotary embeddings and masks, which broadcast over a batch of chunks)."""
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    kwargs_of: list[dict[str, Any]] = [{} for _ in layers]

    def keeper(i: int) -> Callable[..., None]:
        def keep(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(args) > 1:
                raise _unknown(model, "its decoder layers take positional arguments")
            kwargs_of[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        return keep

    hooks = [m.register_forward_pre_hook(keeper(i), with_kwargs=True)
             for i, m in enumerate(layers)]
    try:
        decoder(input_ids=ids[:1].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    inputs: list[torch.Tensor] = []

    def grab(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs.append(_hidden_of(args, kwargs))
        raise _Stop

    hook = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for b in range(0, ids.shape[0], 8):
            with contextlib.suppress(_Stop):
                decoder(input_ids=ids[b: b + 8].to(device), use_cache=False)
    finally:
        hook.remove()
    return torch.cat(inputs), kwargs_of


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, tuple | list) else y


@dataclass
class _Call:
    """How a module was called inside the layer: its hidden input's slot and the rest."""

    keyword: bool
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.keyword:
            return _out(module(*self.args, hidden_states=x, **self.kwargs))
        return _out(module(x, *self.args, **self.kwargs))


def _batches(x: torch.Tensor) -> list[torch.Tensor]:
    per = max(1, TOKENS_PER_BATCH // max(1, x.shape[1]))
    return list(torch.split(x, per))


# --- the searches ---------------------------------------------------------------------------
def fake_quant(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``w`` ``[out, in]`` rounded onto the exporters' grid per group of columns (fp32)."""
    out, n_in = w.shape
    g = w.float().reshape(out, n_in // spec.group_size, spec.group_size)
    scale, zero = group_params(g, spec.bits, spec.sym)
    return fake_quantize(g, scale[..., None], zero[..., None], spec.bits,
                         spec.sym).reshape(out, n_in)


@torch.no_grad()
def search_scale(layer: torch.nn.Module, group: Group, x: list[torch.Tensor], call: _Call,
                 spec: QuantSpec, cfg: AWQConfig) -> tuple[torch.Tensor, dict[str, Any]]:
    """The best input-channel scales of ``group`` on its inputs ``x`` (batches)."""
    inspect = layer.get_submodule(group.inspect)
    linears = [layer.get_submodule(n) for n in group.linears]
    n_in = linears[0].in_features
    x_mean = torch.zeros(n_in, device=x[0].device)
    count = 0
    for xb in x:
        flat = xb.reshape(-1, n_in).float()
        x_mean += flat.abs().sum(0)
        count += flat.shape[0]
    x_mean /= count
    w = torch.cat([m.weight.detach().float() for m in linears])
    wg = w.abs().reshape(-1, spec.group_size)
    w_mean = (wg / (wg.amax(1, keepdim=True) + 1e-6)).reshape(w.shape).mean(0)
    del w, wg
    target = [call(inspect, xb).float() for xb in x]
    originals = [m.weight.detach().clone() for m in linears]

    def loss_with(s: torch.Tensor) -> float:
        for m, w0 in zip(linears, originals, strict=True):
            m.weight.copy_((fake_quant(w0.float() * s, spec) / s).to(w0.dtype))
        err = sum(float((call(inspect, xb).float() - t).pow(2).sum())
                  for xb, t in zip(x, target, strict=True))
        return err / sum(t.numel() for t in target)

    ones = torch.ones(n_in, device=x_mean.device)
    candidates: list[tuple[float | None, torch.Tensor]] = [] if not cfg.duo_scaling \
        else [(None, ones)]  # without duo scaling, ratio 0 is s = 1
    for i in range(cfg.n_grid):
        a = i / cfg.n_grid
        if cfg.duo_scaling:
            s = (x_mean.pow(a) / (w_mean.pow(1 - a) + 1e-4)).clamp(min=1e-4)
        else:
            s = x_mean.pow(a).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        s = torch.where(torch.isfinite(s), s, ones)
        candidates.append((a, s))
    best: tuple[float, float | None, torch.Tensor] | None = None
    plain = None
    try:
        for a, s in candidates:
            loss = loss_with(s)
            if a is None or (a == 0 and not cfg.duo_scaling):
                plain = loss
            if best is None or loss < best[0]:
                best = (loss, a, s)
    finally:
        for m, w0 in zip(linears, originals, strict=True):
            m.weight.copy_(w0)
    assert best is not None
    return best[2], {"group": group.name, "ratio": best[1], "loss": best[0], "loss_plain": plain}


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, spec: QuantSpec, n_grid: int) \
        -> torch.Tensor:
    """Per row and group, the clipping bound (``[out, n_groups]``) that minimizes the error of
    the group's partial output ``x_g @ w_g`` on ``x`` (``[tokens, in]``) after quantization."""
    out_f, n_in = weight.shape
    n_groups, gs = n_in // spec.group_size, spec.group_size
    step = max(1, x.shape[0] // CLIP_TOKENS)
    xg = x[::step].float().reshape(-1, n_groups, gs).transpose(0, 1)  # [G, n, gs]
    best_all = []
    rows = max(1, min(out_f, (1 << 25) // max(1, xg.shape[0] * xg.shape[1])))
    for r0 in range(0, out_f, rows):
        w = weight[r0: r0 + rows].float().reshape(-1, n_groups, gs)  # [o, G, gs]
        wt = w.permute(1, 2, 0)  # [G, gs, o]
        org_out = torch.bmm(xg, wt)  # [G, n, o]
        org_max = w.abs().amax(-1, keepdim=True)  # [o, G, 1]
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        for i in range(max(1, int(MAX_SHRINK * n_grid))):
            m = org_max * (1 - i / n_grid)
            cw = torch.clamp(w, -m, m)
            scale, zero = group_params(cw, spec.bits, spec.sym)
            qw = fake_quantize(cw, scale[..., None], zero[..., None], spec.bits, spec.sym)
            err = (torch.bmm(xg, qw.permute(1, 2, 0)) - org_out).pow(2).mean(1)  # [G, o]
            err = err.t()[..., None]  # [o, G, 1]
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, m, best_max)
        best_all.append(best_max[..., 0])
    return torch.cat(best_all)


@torch.no_grad()
def apply_clip(linear: torch.nn.Linear, max_val: torch.Tensor, group_size: int) -> None:
    w = linear.weight
    g = w.float().reshape(w.shape[0], -1, group_size)
    m = max_val.to(w.device)[..., None]
    w.copy_(torch.clamp(g, -m, m).reshape(w.shape).to(w.dtype))


# --- the pass -------------------------------------------------------------------------------
@torch.no_grad()
def check_folding(layer: torch.nn.Module, groups: list[Group], kwargs: dict[str, Any],
                  x: torch.Tensor) -> float:
    """Relative output change of a copy of ``layer`` with random scales folded in."""
    twin = copy.deepcopy(layer)
    gen = torch.Generator().manual_seed(1)
    for g in groups:
        n = twin.get_submodule(g.linears[0]).in_features
        fold(twin, g, torch.exp(0.5 * torch.randn(n, generator=gen)))
    ref = _out(layer(x, **kwargs)).float()
    got = _out(twin(x, **kwargs)).float()
    del twin
    return float((got - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


def _device(model: Any) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    return next(model.parameters()).device


@torch.no_grad()
def awq(model: Any, ids: torch.Tensor, cfg: AWQConfig, progress: Any = None) \
        -> dict[str, Any]:
    """Scale and clip ``model`` in place for ``cfg``'s grid on calibration ``ids``
    ``[chunks, seq_len]``; returns the per-layer report."""
    spec = cfg.spec()
    model.eval()
    layers = decoder_layers(model)
    plans = [layer_groups(model, i, m) for i, m in enumerate(layers)]
    check_group_size(model, layers, spec)
    t0 = time.perf_counter()
    x, kwargs_of = _capture(model, layers, ids)
    home = next(model.parameters()).device
    device = _device(model)
    dtype = next(model.parameters()).dtype
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    task = progress.add_task(f"AWQ w{cfg.bits} g{cfg.group_size}", total=len(layers)) \
        if progress is not None else None
    x = x.to(device)
    report: list[dict[str, Any]] = []
    # Every layer is checked before any search: a structure AWQ does not fold exactly fails
    # here, not after hours of work.
    probe = torch.randn(1, ids.shape[1], x.shape[-1],
                        generator=torch.Generator().manual_seed(2)).to(home, dtype)
    for i, (layer, groups) in enumerate(zip(layers, plans, strict=True)):
        change = check_folding(layer, groups, kwargs_of[i], probe)
        if change > tol:
            raise _unknown(model, f"folding scales into layer {i} changes its output by "
                                  f"{change:.1e} (relative)")
    for i, (layer, groups) in enumerate(zip(layers, plans, strict=True)):
        layer.to(device)
        kw = _to(kwargs_of[i], device)
        entry, x = _layer(layer, groups, x, kw, spec, cfg)
        entry["layer"] = i
        report.append(entry)
        layer.to(home)
        if task is not None:
            progress.advance(task)
    prefix = _layers_prefix(model, layers)
    changed = sorted({f"{prefix}.{e['layer']}.{name}.weight"
                      for e, groups in zip(report, plans, strict=True)
                      for name in [*(n for g in groups for n in (g.prev, *g.linears)),
                                   *e["clipped"]]})
    return {"pass": "awq", "settings": cfg.model_dump(mode="json"), "layers": report,
            "tokens": int(ids.numel()), "seconds": round(time.perf_counter() - t0, 2),
            "changed": changed}


def _layer(layer: torch.nn.Module, groups: list[Group], x: torch.Tensor, kw: dict[str, Any],
           spec: QuantSpec, cfg: AWQConfig) -> tuple[dict[str, Any], torch.Tensor]:
    """AWQ on one layer: returns its report and the next layer's input (the fp output)."""
    inputs: dict[str, list[torch.Tensor]] = {}
    calls: dict[str, _Call] = {}
    sources = {g.linears[0]: g for g in groups}
    sources.setdefault("self_attn.o_proj", None)  # o is clipped even where it is not scaled
    hooks = []

    def keeper(name: str) -> Callable[..., None]:
        def keep(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs.setdefault(name, []).append(_hidden_of(args, kwargs))
        return keep

    def caller(name: str) -> Callable[..., None]:
        def keep(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if name not in calls:
                calls[name] = _Call(not args, tuple(args[1:]),
                                    {k: v for k, v in kwargs.items() if k != "hidden_states"})
        return keep

    for name in sources:
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(
            keeper(name), with_kwargs=True))
    for g in groups:
        hooks.append(layer.get_submodule(g.inspect).register_forward_pre_hook(
            caller(g.inspect), with_kwargs=True))
    try:
        out = torch.cat([_out(layer(xb, **kw)) for xb in _batches(x)])
    finally:
        for h in hooks:
            h.remove()
    entries = []
    scales: list[tuple[Group, torch.Tensor]] = []
    for g in groups:
        s, info = search_scale(layer, g, inputs[g.linears[0]], calls[g.inspect], spec, cfg)
        scales.append((g, s))
        entries.append(info)
    for g, s in scales:
        fold(layer, g, s)
        inputs[g.linears[0]] = [xb / s.to(xb.dtype) for xb in inputs[g.linears[0]]]
    clipped = []
    if cfg.clip:
        source_of = {n: g.linears[0] for g in groups for n in g.linears}
        source_of.setdefault("self_attn.o_proj", "self_attn.o_proj")
        for name, src in source_of.items():
            if name in _NO_CLIP:
                continue
            lin = layer.get_submodule(name)
            feats = torch.cat(inputs[src]).reshape(-1, lin.in_features)
            max_val = search_clip(lin.weight, feats, spec, cfg.n_grid)
            apply_clip(lin, max_val, spec.group_size)
            clipped.append(name)
    return {"groups": entries, "clipped": clipped}, out


class AWQPass:
    """Torch-side Pass plug point: ``run(model, ctx) -> model`` (scaled and clipped in place).

    The calibration comes from ``ctx.extras``: ``tokenizer`` (required) and ``calibration``
    (a CalibrationConfig, the recipe's; default: the builtin calibration text). The report
    (settings, per-layer search losses, the weights it changed) is ``self.report`` and is
    appended to ``ctx.extras["pass_reports"]`` (the manifest's ``passes``).
    """

    name = "awq"
    Config = AWQConfig
    kind = "torch"

    def __init__(self, config: AWQConfig | None = None) -> None:
        self.config = config or AWQConfig()
        self.report: dict[str, Any] = {}

    def run(self, model: Any, ctx: RunContext) -> Any:
        tokenizer = ctx.extras.get("tokenizer")
        if tokenizer is None:
            raise ModelError("the awq pass needs the model's tokenizer for its calibration text",
                             "run it through a recipe (edgesmith compress)")
        calib = ctx.extras.get("calibration") or CalibrationConfig()
        ids = calibration_ids(tokenizer, calib)
        self.report = awq(model, ids, self.config, ctx.progress)
        ctx.extras.setdefault("pass_reports", []).append(self.report)
        return model
