"""The sweep's plan: variants expanded from options (quant types x methods) or from recipe
files, each with its estimated size and fit on every target (``targets fit``'s estimate).

A variant is a recipe (built in memory as YAML text, so it is validated by the same parser as
a recipe file, and its text is what the worker runs) that the pipeline runs into
``<out>/<variant>/``. Variants that share torch-side passes (the same AWQ or GPTQ config and
calibration) share a ``group``: the pipeline caches that pass once, keyed by the steps and the
calibration, so the executors run one variant of each group before the others.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edgesmith import models, recipe
from edgesmith.errors import RecipeError
from edgesmith.fsutil import sha256_text
from edgesmith.targets import fit, profile

METHODS = ("plain", "imatrix", "gptq", "awq")
# the quant types both llama.cpp's quantizer (the gguf_quantize pass) and the fit estimate know
QUANTS = tuple(q for q in fit.BITS_PER_WEIGHT if q not in ("F32", "F16", "BF16"))
GOAL_KEYS = ("max_kld", "max_ppl_increase_pct", "min_top1", "max_size_mb")
# GPTQ writes exact llama.cpp blocks (Q4_0 for 4-bit symmetric group 32, Q8_0 for 8-bit); one
# GPTQ config per bit width, so every 4-bit type's variant shares one GPTQ pass
_GPTQ_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K_S": 4, "Q4_K_M": 4, "Q8_0": 8}
_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Settings:
    """What every variant built from options shares (calibration, eval, gates)."""

    target: str
    goal: dict[str, float] = field(default_factory=dict)
    calib_samples: int = 32
    calib_seq_len: int = 512
    eval_ctx: int = 512
    eval_windows: int = 8


@dataclass
class Fit:
    target: str
    fits: bool
    total_mb: float
    usable_mb: float
    decode_tps_bound: float


@dataclass
class Variant:
    name: str
    recipe_text: str
    quant: str
    method: str
    group: str  # the torch-side passes' identity ("" when none)
    est_size_mb: float = 0.0
    fits: list[Fit] = field(default_factory=list)
    skip: str = ""  # why it is not run ("" = it runs)
    overrides: dict[str, str] = field(default_factory=dict)  # per-tensor types (--search)

    def recipe(self) -> recipe.Recipe:
        return recipe.parse(self.recipe_text, f"<sweep variant {self.name}>")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_goal(text: str | None) -> dict[str, float]:
    """``max_kld=0.03,max_ppl_increase_pct=6`` -> gates."""
    goal: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in GOAL_KEYS:
            raise RecipeError(f"--goal: cannot read {part!r}",
                              f"write KEY=VALUE[,KEY=VALUE] with KEY one of {', '.join(GOAL_KEYS)}")
        try:
            goal[key] = float(value)
        except ValueError as exc:
            raise RecipeError(f"--goal: {key} needs a number, not {value!r}",
                              f"e.g. {key}=0.05") from exc
    return goal


def _steps(quant: str, method: str, overrides: dict[str, str]) -> list[dict[str, Any]]:
    steps: list[dict[str, Any]] = []
    if method == "gptq":
        steps.append({"gptq": {"bits": _GPTQ_BITS[quant], "group_size": 32, "sym": True,
                               "act_order": True, "damp": 0.01}})
    elif method == "awq":
        steps.append({"awq": {"bits": 4, "group_size": 32, "clip": False}})
    steps.append({"export": {"format": "gguf", "outtype": "f16"}})
    q: dict[str, Any] = {"type": quant, "imatrix": method != "plain"}
    if overrides:
        q["tensor_types"] = dict(sorted(overrides.items()))
    steps.append({"gguf_quantize": q})
    return steps


def variant_name(quant: str, method: str, overrides: dict[str, str] | None = None) -> str:
    base = {"plain": quant, "imatrix": f"{quant}-imatrix"}.get(method, f"{method}-{quant}")
    if overrides:  # a pattern's plain name: "[.]attn_v[.]" -> attn_v
        base += "+" + "+".join(f"{re.sub(r'[^A-Za-z0-9_]', '', k)}={v}"
                               for k, v in sorted(overrides.items()))
    return _NAME.sub("_", base)


def build_variant(quant: str, method: str, s: Settings,
                  overrides: dict[str, str] | None = None) -> Variant:
    """One variant built from options: its recipe text, parsed (validated) once here."""
    overrides = overrides or {}
    name = variant_name(quant, method, overrides)
    data = {
        "name": f"sweep-{name}", "target": s.target,
        "description": f"edgesmith sweep variant {name}",
        "calibration": {"source": "builtin:calibration", "samples": s.calib_samples,
                        "seq_len": s.calib_seq_len},
        "eval": {"ctx": s.eval_ctx, "windows": s.eval_windows},
        "steps": _steps(quant, method, overrides),
        "gates": dict(s.goal),
    }
    text = yaml.safe_dump(data, sort_keys=False)
    v = Variant(name, text, quant, method, "", overrides=overrides)
    v.group = group_of(v.recipe())
    return v


def group_of(rec: recipe.Recipe) -> str:
    """The identity of a recipe's torch-side passes (the pipeline's cache key's inputs)."""
    torch_steps = [s for s in rec.steps if s.kind == "torch"]
    if not torch_steps:
        return ""
    c = rec.model.calibration
    return sha256_text("|".join([*(f"{s.name}:{s.config.model_dump_json()}" for s in torch_steps),
                                 f"{c.source}:{c.samples}:{c.seq_len}"]))[:12]


def _final_quant(rec: recipe.Recipe) -> str:
    q = [s.config.type for s in rec.steps if s.name == "gguf_quantize"]
    return q[-1] if q else "F16"


def from_options(quants: list[str], methods: list[str], s: Settings) -> list[Variant]:
    bad = [q for q in quants if q not in QUANTS]
    if bad:
        raise RecipeError(f"--quants: unknown type {bad[0]}", f"use some of {', '.join(QUANTS)}")
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise RecipeError(f"--methods: unknown method {bad[0]}",
                          f"use some of {', '.join(METHODS)}")
    out = []
    for m in methods:
        for q in quants:
            v = build_variant(q, m, s) if m != "gptq" or q in _GPTQ_BITS else Variant(
                variant_name(q, m), "", q, m, "",
                skip=f"GPTQ writes Q4_0/Q8_0 blocks: no GPTQ variant of {q} (use "
                     f"{', '.join(_GPTQ_BITS)})")
            out.append(v)
    return out


def from_recipes(paths: list[str]) -> list[Variant]:
    out = []
    for p in paths:
        rec = recipe.load(p)
        if not any(s.kind == "export" and s.name == "gguf" for s in rec.steps):
            raise RecipeError(f"recipe {p} does not export gguf",
                              "sweep runs GGUF recipes (llama.cpp targets)")
        methods = [s.name for s in rec.steps if s.kind == "torch"]
        imx = any(getattr(s.config, "imatrix", False) for s in rec.steps)
        out.append(Variant(_NAME.sub("_", rec.name), rec.text, _final_quant(rec),
                           "+".join(methods) or ("imatrix" if imx else "plain"), group_of(rec)))
    names = [v.name for v in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise RecipeError(f"two recipes are named {dup}", "give each recipe its own name")
    return out


def plan_ref(spec: str, progress: Any = None) -> models.ModelRef:
    """The model the estimates read: an HF directory (a GGUF input's dequantized one, the
    same cached directory the pipeline converts from)."""
    ref = models.resolve(spec)
    return ref if ref.kind == "hf" else models.resolve(str(models.as_hf_dir(ref, progress)))


def estimate(variants: list[Variant], ref: models.ModelRef, targets: list[str],
             ctx: int) -> None:
    """Fill each variant's estimated size and fit on each target; a variant that fits no
    target is skipped, with the reason."""
    tgs = [profile.load(t) for t in targets]
    for v in variants:
        if v.skip:
            continue
        reports = [fit.estimate(ref, t, ctx, v.quant) for t in tgs]
        v.est_size_mb = reports[0].weights_bytes / 1e6 if reports else 0.0
        v.fits = [Fit(r.target, r.fits, r.total_bytes / 1e6, r.usable_ram_bytes / 1e6,
                      r.decode_tps_upper_bound) for r in reports]
        if v.fits and not any(f.fits for f in v.fits):
            v.skip = "fits no target at ctx {}: {}".format(ctx, "; ".join(
                f"{f.target} needs {f.total_mb:.0f} MB of {f.usable_mb:.0f} MB" for f in v.fits))


def render(variants: list[Variant], targets: list[str], ctx: int) -> str:
    """The plan as a text table (``--dry-run``)."""
    head = ["variant", "method", "quant", "est. MB", *(f"{t} @{ctx}" for t in targets), "run"]
    rows = []
    for v in variants:
        fits = {f.target: f for f in v.fits}
        cells = [v.name, v.method, v.quant, f"{v.est_size_mb:.1f}" if v.fits else "-"]
        for t in targets:
            f = fits.get(t)
            cells.append("-" if f is None else
                         f"{'fits' if f.fits else 'NO'} {f.total_mb:.0f}/{f.usable_mb:.0f} MB")
        cells.append("skip: " + v.skip if v.skip else "yes")
        rows.append(cells)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = lambda r: "  ".join(  # noqa: E731
        c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)]) + "\n"


def check_output(out_dir: Path, variants: list[Variant]) -> None:
    """Variant names are folder names under -o."""
    for v in variants:
        if not v.name or v.name.startswith(".") or v.name in ("bench", "logs", "search"):
            raise RecipeError(f"variant name {v.name!r} cannot be a folder of the sweep",
                              "rename the recipe")
