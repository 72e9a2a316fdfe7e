"""Merge a PEFT LoRA adapter into the base model's weights, so every exporter sees a plain model.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (peft's
``save_pretrained``). For every targeted Linear ``W`` (``[out, in]``) with factors ``A``
(``[r, in]``) and ``B`` (``[out, r]``) the merged weight is ``W + s * B @ A`` with
``s = alpha / r`` (``alpha / sqrt(r)`` for rank-stabilized LoRA, ``use_rslora``), ``r`` and
``alpha`` per module where ``rank_pattern`` / ``alpha_pattern`` say so. A DoRA adapter
(``use_dora``) also stores a magnitude per output row ``m``: the merged weight is
``m / ||W + s B A||_row * (W + s B A)``, as peft's merge computes it. Modules the adapter
saves whole (``modules_to_save``) replace the base module's weights.

Checked before any weight changes: the adapter's type (LoRA only), that every adapter tensor
names a Linear of the model with the shapes it needs, that the adapter's target modules exist,
and the ``base_model_name_or_path`` it records when that is a local model directory (its
config.json must describe the same shapes). A pickle adapter (``adapter_model.bin``) is refused
unless allowed; even then it is read with ``torch.load(weights_only=True)``. The merge is done
in fp32, whatever the adapter's dtype.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from edgesmith.context import RunContext
from edgesmith.errors import ModelError
from edgesmith.fsutil import sha256_file

SAFE = "adapter_model.safetensors"
PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."
_STRUCTURE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "vocab_size", "head_dim")


class MergeLoRAConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="PEFT adapter directory (adapter_config.json + weights)")
    allow_pickle: bool = Field(False, description="accept adapter_model.bin (can run code)")

    @field_validator("adapter")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not (Path(v) / "adapter_config.json").is_file():
            raise ValueError(f"{v} is not a PEFT adapter directory (no adapter_config.json)")
        return v

    @computed_field  # type: ignore[prop-decorator]
    @property
    def adapter_sha256(self) -> str:
        """Part of the torch passes' cache key: a changed adapter is merged again."""
        d = Path(self.adapter)
        files = [d / "adapter_config.json", *(d / n for n in (SAFE, PICKLE) if (d / n).exists())]
        return ",".join(f"{f.name}={sha256_file(f)}" for f in files)


def _adapter_files(adapter: Path, allow_pickle: bool) -> tuple[dict[str, Any], Path]:
    cfg_path = adapter / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{cfg_path} cannot be read as JSON: {exc}",
                         "point --adapter at a directory written by peft's save_pretrained") \
            from exc
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} is not a JSON object", "use peft's adapter_config.json")
    safe, pick = adapter / SAFE, adapter / PICKLE
    if safe.is_file():
        return cfg, safe
    if pick.is_file():
        if not allow_pickle:
            raise ModelError(f"{adapter} holds only {PICKLE}, a pickle file that can run code "
                             "when loaded", "convert it to adapter_model.safetensors, or pass "
                             "--allow-pickle (allow_pickle: true in the merge_lora step)")
        return cfg, pick
    raise ModelError(f"{adapter} has no {SAFE}", "save the adapter with peft's save_pretrained")


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        from edgesmith.models import check_safetensors

        check_safetensors(path)
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure is a bad adapter
        raise ModelError(f"{path} cannot be read as tensors: {exc}",
                         "use adapter_model.safetensors") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ModelError(f"{path} is not a dict of tensors", "use adapter_model.safetensors")
    return state


def _pattern(patterns: dict[str, Any], module: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern: a key matches the module name's end (regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module):
            return float(value)
    return default


def _group(state: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]],
                                                     dict[str, torch.Tensor]]:
    """Adapter tensors by the module they adapt (``lora_A``, ``lora_B``, ``magnitude``), and the
    whole-module weights (``modules_to_save``), with peft's ``base_model.model.`` prefix off."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    whole: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = re.match(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", name) or \
            re.match(r"(.+)\.(lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?$", name)
        if m:
            lora.setdefault(m.group(1), {})[m.group(2)] = t
        elif re.search(r"\.(lora_embedding_[AB]|lora_bias)\b|\.lora_", name):
            raise ModelError(f"adapter tensor {key} is of a kind this merge does not support "
                             "(embedding LoRA or LoRA bias)",
                             "merge it with peft's merge_and_unload and pass the merged model")
        else:
            whole[name] = t
    return lora, whole


def _check_config(cfg: dict[str, Any], adapter: Path) -> None:
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise ModelError(f"{adapter} is a {kind} adapter; merge_lora merges LoRA (and DoRA, "
                         "rsLoRA) adapters only", "merge it with peft and pass the merged model")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ModelError(f"{adapter} trains biases (bias: {cfg.get('bias')}), which this merge "
                         "does not support", "merge it with peft's merge_and_unload")
    if cfg.get("fan_in_fan_out"):
        raise ModelError(f"{adapter} was made for Conv1D layers (fan_in_fan_out)",
                         "merge_lora supports Linear layers (Llama-like models)")


def _check_base(cfg: dict[str, Any], model: Any, adapter: Path) -> str | None:
    """The base model the adapter records: when it is a local model directory, its config.json
    must have this model's shapes. Returns the recorded name."""
    base = cfg.get("base_model_name_or_path")
    if not base:
        return None
    cfg_file = Path(str(base)) / "config.json"
    if cfg_file.is_file():
        try:
            theirs = json.loads(cfg_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return str(base)
        ours = model.config.to_dict()
        diff = [k for k in _STRUCTURE_KEYS if k in theirs and k in ours and theirs[k] != ours[k]]
        if diff:
            k = diff[0]
            raise ModelError(f"adapter {adapter} was trained on {base}, whose {k} is {theirs[k]}; "
                             f"this model's is {ours[k]}", "merge it into the model it was "
                             "trained on (base_model_name_or_path in adapter_config.json)")
    return str(base)


def _merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float,
            magnitude: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().float() + scale * (b.float() @ a.float())
    if magnitude is not None:  # DoRA: each output row rescaled to its trained magnitude
        norm = w.norm(p=2, dim=1)
        w = w * (magnitude.float().reshape(-1) / norm).reshape(-1, 1)
    return w


def merge(model: Any, adapter: Path, allow_pickle: bool = False) -> dict[str, Any]:
    """Merge the adapter at ``adapter`` into ``model`` in place; returns the pass report."""
    adapter = Path(adapter)
    cfg, weights = _adapter_files(adapter, allow_pickle)
    _check_config(cfg, adapter)
    base = _check_base(cfg, model, adapter)
    lora, whole = _group(_load_tensors(weights))
    if not lora and not whole:
        raise ModelError(f"{weights} holds no LoRA tensors", "save the adapter with peft")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    r0, alpha0 = float(cfg.get("r", 8)), float(cfg.get("lora_alpha", 8))
    rs, dora = bool(cfg.get("use_rslora")), bool(cfg.get("use_dora"))
    plan: list[tuple[str, torch.nn.Linear, torch.Tensor, float]] = []
    for name, parts in sorted(lora.items()):
        mod = modules.get(name)
        if not isinstance(mod, torch.nn.Linear):
            raise ModelError(f"adapter {adapter} adapts {name}, which this model "
                             f"({type(model).__name__}) {'lacks' if mod is None else 'has as a '}"
                             f"{'' if mod is None else type(mod).__name__}",
                             "merge it into the base model it was trained on")
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ModelError(f"adapter {adapter} has only part of {name}'s LoRA factors",
                             "save the adapter again with peft")
        a, b = parts["lora_A"], parts["lora_B"]
        mag = parts.get("lora_magnitude_vector")
        if mag is not None and not dora:
            raise ModelError(f"adapter {adapter} stores DoRA magnitudes but its config does not "
                             "say use_dora", "save the adapter again with peft")
        r = a.shape[0]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != mod.in_features or \
                b.shape != (mod.out_features, r) or (mag is not None and
                                                     mag.numel() != mod.out_features):
            raise ModelError(f"adapter {adapter} does not fit {name}: lora_A {list(a.shape)}, "
                             f"lora_B {list(b.shape)} for a Linear of {mod.in_features} -> "
                             f"{mod.out_features}", "merge it into the base model it was "
                             "trained on (a different size or architecture)")
        if dora and mag is None:
            raise ModelError(f"adapter {adapter} is DoRA but {name} has no magnitude vector",
                             "save the adapter again with peft")
        rank = _pattern(cfg.get("rank_pattern") or {}, name, r0)
        if int(rank) != r:
            raise ModelError(f"adapter {adapter}: {name} has rank {r}, its config says "
                             f"{int(rank)}", "save the adapter again with peft")
        alpha = _pattern(cfg.get("alpha_pattern") or {}, name, alpha0)
        scale = alpha / math.sqrt(r) if rs else alpha / r
        plan.append((name, mod, _merged(mod.weight, a, b, scale, mag), scale))
    targets = cfg.get("target_modules")
    if isinstance(targets, list) and plan:
        absent = sorted(t for t in set(targets) if not any(
            n == t or n.endswith("." + t) for n in modules))
        if absent:
            raise ModelError(f"adapter {adapter} targets {', '.join(absent)}, which this model "
                             "does not have", "merge it into the base model it was trained on")
    replaced = []
    for name, t in sorted(whole.items()):
        key = name.replace(".modules_to_save.default", "").replace(".modules_to_save", "")
        p = params.get(key)
        if p is None or p.shape != t.shape:
            raise ModelError(f"adapter {adapter} saves {name} {list(t.shape)}, which does not "
                             f"match this model ({'absent' if p is None else list(p.shape)})",
                             "merge it into the base model it was trained on")
        replaced.append((p, t, key))
    with torch.no_grad():  # everything was checked: now change the model
        for _name, mod, w, _s in plan:
            mod.weight.copy_(w.to(mod.weight.dtype))
        for p, t, _key in replaced:
            p.copy_(t.to(p.dtype))
    return {
        "pass": "merge_lora", "adapter": str(adapter), "weights": weights.name,
        "base_model_name_or_path": base, "rank": int(r0), "alpha": alpha0, "rslora": rs,
        "dora": dora, "merged_modules": [n for n, *_ in plan],
        "scales": sorted({round(s, 6) for *_, s in plan}),
        "replaced_modules": [k for *_, k in replaced],
    }


def prepend_to_recipe(rec: Any, adapter: str | None, allow_pickle: bool) -> None:
    """``compress --adapter DIR``: a merge_lora step before the recipe's steps (recorded in
    the recipe as run); ``--allow-pickle`` also lets the recipe's own merge_lora steps read a
    pickle adapter."""
    from edgesmith.errors import RecipeError
    from edgesmith.recipe import Step

    if allow_pickle:
        for s in rec.steps:
            if s.name == "merge_lora":
                s.config = s.config.model_copy(update={"allow_pickle": True})
    if adapter is None:
        return
    if any(s.name == "merge_lora" for s in rec.steps):
        raise RecipeError(f"recipe {rec.name} already merges an adapter (merge_lora step)",
                          "pass --adapter or use the recipe's merge_lora step, not both")
    try:
        config = MergeLoRAConfig(adapter=adapter, allow_pickle=allow_pickle)
    except ValueError as exc:
        raise ModelError(f"--adapter {adapter} is not a PEFT adapter directory (no "
                         "adapter_config.json)", "point it at peft's save_pretrained output") \
            from exc
    rec.steps.insert(0, Step("torch", "merge_lora", config))
    rec.model.steps.insert(0, {"merge_lora": {"adapter": adapter, "allow_pickle": allow_pickle}})


class MergeLoRAPass:
    """Torch-side Pass: ``run(model, ctx) -> model`` with the adapter merged in."""

    name = "merge_lora"
    Config = MergeLoRAConfig
    kind = "torch"

    def __init__(self, config: MergeLoRAConfig) -> None:
        self.config = config

    def run(self, model: Any, ctx: RunContext) -> Any:
        t0 = time.perf_counter()
        report = merge(model, Path(self.config.adapter), self.config.allow_pickle)
        report["settings"] = self.config.model_dump(mode="json")
        report["seconds"] = round(time.perf_counter() - t0, 3)
        # a distill step's teacher "original" is the model before lossy passes: merged too
        ctx.extras.setdefault("merged_adapters", []).append(self.config)
        ctx.extras.setdefault("pass_reports", []).append(report)
        return model
