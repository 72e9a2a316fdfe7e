"""GPTQ (Frantar et al. 2022, arXiv:2210.17323) on torch, layer by layer.

For each Linear ``y = W x`` of a decoder layer, the Hessian of the layer's output error is
``H = 2 X X^T / n`` over the calibration inputs ``X``. GPTQ quantizes ``W`` one column at a time
and spreads each column's rounding error over the columns not yet quantized, weighted by the
inverse Hessian (its upper Cholesky factor), in blocks of 128 columns with lazy updates.

- Grid: compress/qweights.py's (sym = llama.cpp's Q4_0/Q8_0 grid, asym = GPTQ min/max, which
  group 32 makes Q4_1), fp16 scales, so exporters write GPTQ's codes without re-rounding.
- Groups: the scale and zero of a group are chosen when GPTQ reaches its first column, on the
  error-updated weights. With act-order (``desc_act``, columns visited by decreasing Hessian
  diagonal) the groups are static: their params come from the original weights in the original
  column order (gptqmodel's ``static_groups``), so ``g_idx`` stays ordinal and a group-32 weight
  is still exactly a llama.cpp block.
- Dampening: ``damp * mean(diag H)`` is added to the diagonal (more if Cholesky fails).
- True-sequential: inside a decoder layer the Linears that share an input (q/k/v, gate/up) are
  quantized together, then the layer is re-run so later groups (o, then down) see the inputs
  the already-quantized Linears produce.
- Each Linear's Hessian-weighted error ``trace(dW H dW^T)`` is recorded, with the RTN error on
  the same grid and Hessian, for the manifest.

``GPTQPass.run(model, ctx)`` works on an in-memory HF model (the quantized codes are attached
to it, see qweights.attach); ``GPTQPass.run_dir(src, dest, ctx)`` streams a safetensors
directory into a GPTQ checkpoint (compress/gptq_format.py) one layer at a time.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from edgesmith.compress import gptq_format, layerwise
from edgesmith.compress import qweights as qw
from edgesmith.context import RunContext
from edgesmith.errors import ModelError


class GPTQConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[32, 64, 128] = 128
    sym: bool = True
    act_order: bool = False
    damp: float = Field(0.01, gt=0, le=1)
    true_sequential: bool = True
    block_size: int = Field(128, ge=32, le=4096, multiple_of=32)
    batch_size: int = Field(8, ge=1, le=512, description="calibration chunks per forward")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    samples: int | None = Field(None, ge=1, le=4096, description="default: the recipe's")
    seq_len: int | None = Field(None, ge=16, le=8192, description="default: the recipe's")
    checkpoint_format: Literal["gptq", "gptq_v2"] = Field(
        "gptq", description="gptq (v1): every loader; gptq_v2: gptqmodel, also asymmetric")

    def spec(self) -> qw.QuantSpec:
        return qw.QuantSpec(self.bits, self.group_size, self.sym)


class Hessian:
    """Running ``2 X X^T / n`` of a Linear's inputs (fp32, on the inputs' device)."""

    def __init__(self, n_in: int, device: torch.device) -> None:
        self.H = torch.zeros(n_in, n_in, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        t = x.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        x = x * math.sqrt(2.0 / self.n)
        self.H.addmm_(x.T, x)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) I)^-1``; more damping if needed."""
    mean = torch.mean(torch.diag(H)).item() or 1.0
    eye = torch.eye(H.shape[0], device=H.device)
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(H + eye * (damp * 10**attempt * mean))
            return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise ModelError("the calibration Hessian is not positive definite even with 1e5x "
                     "the dampening", "use more calibration samples or a larger damp")


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, spec: qw.QuantSpec, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128,
                  name: str = "weight") -> qw.QuantizedLinear:
    """GPTQ of one ``[out, in]`` weight given its input Hessian ``H`` (``[in, in]``)."""
    out, n_in = weight.shape
    spec.check(name, n_in)
    gs = spec.group_size
    if block_size % gs:
        raise ModelError(f"block size {block_size} is not a multiple of the group size {gs}",
                         "use block_size 128")
    W = weight.detach().float().clone()
    H = H.clone()
    dead = torch.diag(H) == 0  # columns no calibration token ever used
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    n_groups = n_in // gs
    scales = torch.zeros(out, n_groups, device=W.device)
    zeros = torch.zeros(out, n_groups, device=W.device)
    if act_order:  # static groups: params of the original columns, before any update
        scales, zeros = qw.group_params(W.reshape(out, n_groups, gs), spec.bits, spec.sym)
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
        group_of = perm // gs
    else:
        perm = None
        group_of = torch.arange(n_in, device=W.device) // gs
    Hinv = _inverse_cholesky(H, damp)
    codes = torch.zeros(out, n_in, device=W.device)
    group_host = group_of.tolist()
    lo, hi = qw.code_range(spec.bits, spec.sym)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = group_host[col]
            if perm is None and col % gs == 0:  # a group starts: params on updated weights
                s, z = qw.group_params(W1[:, i:i + gs], spec.bits, spec.sym)
                scales[:, g], zeros[:, g] = s, z
            s, z = scales[:, g], zeros[:, g]
            w = W1[:, i]
            safe = torch.where(s == 0, torch.ones_like(s), s)
            q = torch.where(s == 0, z, (torch.round(w / safe) + z).clamp(lo, hi))
            codes[:, col] = q
            Q1[:, i] = (q - z) * s
            err = (w - Q1[:, i]) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1.0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return qw.QuantizedLinear(codes.to(torch.uint8), scales, zeros.to(torch.uint8), spec.bits,
                              gs, spec.sym)


class _GPTQLayers:
    """The LayerPass: GPTQ of every Linear of a decoder layer, true-sequential."""

    def __init__(self, config: GPTQConfig) -> None:
        self.config = config
        self.spec = config.spec()
        self.quantized: dict[str, qw.QuantizedLinear] = {}  # of the layer not yet sunk
        self.names: list[str] = []  # every Linear quantized so far
        self.errors: list[dict[str, Any]] = []
        self.groups: list[list[str]] = []

    def process(self, index: int, prefix: str, layer: torch.nn.Module,
                inputs: layerwise.LayerInputs) -> None:
        mods = dict(layerwise.linears(layer))
        for name, m in mods.items():  # fail before any work on a width that does not fit
            self.spec.check(f"{prefix}.{name}", m.in_features)
        if not self.config.true_sequential:
            groups = [list(mods)]
        elif sorted(n for g in self.groups for n in g) == sorted(mods):
            groups = self.groups  # decoder layers are alike: found once, on layer 0
        else:
            groups = layerwise.sequential_groups(layer, inputs)
        if index == 0:
            self.groups = groups
        for group in groups:
            if self.config.true_sequential:  # one input, so one Hessian, for the whole group
                h = Hessian(mods[group[0]].in_features, mods[group[0]].weight.device)
                layerwise.collect(layer, inputs, {group[0]: mods[group[0]]},
                                  lambda _n, x, h=h: h.add(x), stop=True)
                hessians = dict.fromkeys(group, h)
            else:
                hessians = {n: Hessian(mods[n].in_features, mods[n].weight.device)
                            for n in group}
                layerwise.collect(layer, inputs, {n: mods[n] for n in group},
                                  lambda n, x, hs=hessians: hs[n].add(x))
            for n in group:
                self._quantize(f"{prefix}.{n}", mods[n], hessians[n].H)

    def _quantize(self, full: str, m: torch.nn.Linear, H: torch.Tensor) -> None:
        t0 = time.perf_counter()
        c = self.config
        q = gptq_quantize(m.weight, H, self.spec, c.damp, c.act_order, c.block_size, full)
        seconds = time.perf_counter() - t0
        w = m.weight.detach().float()
        deq = q.dequantize()
        rtn = qw.quantize_rtn(w, self.spec, full).dequantize()
        self.errors.append({"name": full, "error": qw.weighted_error(w - deq, H),
                            "rtn_error": qw.weighted_error(w - rtn, H),
                            "seconds": round(seconds, 3)})
        with torch.no_grad():
            m.weight.copy_(deq.to(m.weight.dtype))
        self.quantized[full] = q.to("cpu")
        self.names.append(full)

    def take(self, prefix: str) -> dict[str, qw.QuantizedLinear]:
        """The results of layer ``prefix``, handed over (and forgotten: memory stays a layer)."""
        mine = {k: v for k, v in self.quantized.items() if k.startswith(prefix + ".")}
        for k in mine:
            del self.quantized[k]
        return mine


def _tokenizer_and_calibration(ctx: RunContext, config: GPTQConfig, model_dir: Path | None) \
        -> tuple[Any, str, int, int]:
    from edgesmith.compress.imatrix import CalibrationConfig

    calib = ctx.extras.get("calibration") or CalibrationConfig()
    tok = ctx.extras.get("tokenizer")
    if tok is None:
        if model_dir is None:
            raise ModelError("the gptq pass needs the model's tokenizer",
                             "the pipeline passes it in ctx.extras['tokenizer']")
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    text = ctx.calibration_text or calib.text()
    return tok, text, config.samples or calib.samples, config.seq_len or calib.seq_len


class GPTQPass:
    """Torch-side Pass plug point: ``run(model, ctx) -> model`` (and ``run_dir`` streaming)."""

    name = "gptq"
    Config = GPTQConfig
    kind = "torch"

    def __init__(self, config: GPTQConfig | None = None) -> None:
        self.config = config or GPTQConfig()
        self.report: dict[str, Any] = {}

    def qconfig(self, groups: list[list[str]]) -> dict[str, Any]:
        c = self.config
        return gptq_format.quantization_config(
            c.spec(), desc_act=c.act_order, damp=c.damp, true_sequential=c.true_sequential,
            modules=groups or None, meta={"edgesmith": {"grid": "llama.cpp", "pass": "gptq"}},
            checkpoint_format=c.checkpoint_format)

    def _batches(self, ctx: RunContext, model_dir: Path | None) -> list[torch.Tensor]:
        tok, text, samples, seq_len = _tokenizer_and_calibration(ctx, self.config, model_dir)
        return layerwise.calibration_batches(tok, text, samples, seq_len, self.config.batch_size)

    def _finish(self, layers: _GPTQLayers, seconds: float, ctx: RunContext) -> None:
        err = sum(e["error"] for e in layers.errors)
        rtn = sum(e["rtn_error"] for e in layers.errors)
        self.report = {
            "pass": "gptq", "settings": self.config.model_dump(mode="json"),
            "quantization_config": self.qconfig(layers.groups), "seconds": round(seconds, 2),
            "layers": layers.errors, "error_total": err, "rtn_error_total": rtn,
            "tensors": list(layers.names),
        }
        ctx.extras.setdefault("pass_reports", []).append(self.report)

    def run(self, model: Any, ctx: RunContext) -> Any:
        """GPTQ the in-memory ``model``: weights become fake-quantized, codes are attached."""
        t0 = time.perf_counter()
        device = layerwise.pick_device(self.config.device)
        model_dir = Path(model.config._name_or_path) if getattr(
            model.config, "_name_or_path", "") else None
        batches = self._batches(ctx, model_dir)
        layers = _GPTQLayers(self.config)
        source = layerwise.ModelSource(model, device)
        was_training = model.training
        model.eval()

        def sink(_i: int, prefix: str, _layer: torch.nn.Module) -> None:
            for name, q in layers.take(prefix).items():
                qw.attach(model, name, q)

        layerwise.run(source, batches, layers, sink, progress=ctx.progress,
                      label=f"gptq w{self.config.bits} g{self.config.group_size} (layers)")
        model.train(was_training)
        qw.set_quantization_config(model, self.qconfig(layers.groups))
        self._finish(layers, time.perf_counter() - t0, ctx)
        return model

    def run_dir(self, src: Path, dest: Path, ctx: RunContext) -> Path:
        """GPTQ a safetensors HF directory into a GPTQ checkpoint at ``dest``, layer by layer:
        one decoder layer and the calibration activations in memory."""
        t0 = time.perf_counter()
        device = layerwise.pick_device(self.config.device)
        source = layerwise.DirSource(src, device)
        batches = self._batches(ctx, src)
        layers = _GPTQLayers(self.config)
        writer = gptq_format.CheckpointWriter(dest, self.config.checkpoint_format)

        def sink(_i: int, prefix: str, _layer: torch.nn.Module) -> None:
            mine = layers.take(prefix)
            for name, q in mine.items():
                writer.add_quantized(name, q)
            skip = {f"{n}.weight" for n in mine}
            writer.add({k: source.tensor(k) for k in source.keys(prefix + ".") if k not in skip})

        try:
            layerwise.run(source, batches, layers, sink, progress=ctx.progress,
                          label=f"gptq w{self.config.bits} g{self.config.group_size} (layers)")
            writer.add({k: source.tensor(k) for k in source.non_layer_keys()})
            extra = [f for f in Path(src).iterdir() if f.name.startswith(
                ("tokenizer", "special_tokens", "generation_config", "chat_template"))
                or f.suffix == ".model"]
            out = writer.close(source.config.to_dict(), self.qconfig(layers.groups), extra)
        except BaseException:
            writer.abort()
            raise
        finally:
            source.close()
        self._finish(layers, time.perf_counter() - t0, ctx)
        return out

