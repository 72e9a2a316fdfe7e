"""``sweep --search --goal ...``: the smallest variant that meets the quality goal, found by
measuring as it goes instead of building the whole grid.

1. Bisection over the ladder of quant types (sorted by bits per weight; quality is taken as
   monotone in it): the smallest whole-model type T that meets the goal, in about
   log2(ladder) measured variants.
2. Greedy over tensor classes (per-tensor types: llama.cpp's quantizer overrides): from the
   type L just below T (which misses the goal), raise one class of tensors at a time to T's
   block type, most sensitive first (attn_v, ffn_down, output, ... as llama.cpp's own mixes
   do), measuring KLD after each; a step that does not lower KLD is undone. It stops when a
   mix meets the goal (the answer, if smaller than T), is no smaller than T (T is), or
   when one more measurement would make the search as costly as the grid.

Every measurement is a normal variant (``<out>/<variant>/`` with its manifest) that shares the
F16 GGUF, reference and importance matrix through the cache; the path, the measured count
and the grid's count are in ``sweep.json`` and the report.
"""

from __future__ import annotations

import re
import time
from html import escape
from pathlib import Path
from typing import Any

from edgesmith.sweep import core, plan
from edgesmith.targets import fit

# llama.cpp's per-tensor block type of a whole-model type (what an override names)
BLOCK_TYPE = {"Q2_K": "Q2_K", "Q3_K_M": "Q3_K", "Q4_0": "Q4_0", "Q4_1": "Q4_1",
              "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_0": "Q5_0", "Q5_1": "Q5_1",
              "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K", "Q8_0": "Q8_0"}
DEFAULT_LADDER = ["Q3_K_M", "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
# most sensitive first (llama.cpp's Q*_K_M mixes raise attn_v and ffn_down)
CLASS_ORDER = ["attn_v", "ffn_down", "output", "token_embd", "attn_k", "attn_q",
               "attn_output", "ffn_gate", "ffn_up"]
_BLK = re.compile(r"^blk\.\d+\.([a-z_]+)\.weight$")


def class_pattern(cls: str) -> str:
    return f"^{cls}[.]" if cls in ("output", "token_embd") else f"[.]{cls}[.]"


def classes_of(tensors: list[dict[str, Any]]) -> list[str]:
    present = set()
    for t in tensors:
        m = _BLK.match(t["name"])
        present.add(m.group(1) if m else t["name"].split(".", 1)[0])
    return [c for c in CLASS_ORDER if c in present]


def _meets(r: dict[str, Any]) -> bool:
    return r["status"] == "ok"


def run(spec: str, s: plan.Settings, quants: list[str], methods: list[str],
        o: core.SweepOptions, dry_run: bool = False) -> dict[str, Any] | None:
    ladder = sorted(quants or DEFAULT_LADDER, key=lambda q: fit.BITS_PER_WEIGHT[q])
    bad = [q for q in ladder if q not in BLOCK_TYPE]
    if bad:
        raise plan.RecipeError(f"--search: no per-tensor type for {bad[0]}",
                               f"use some of {', '.join(BLOCK_TYPE)}")
    method = methods[0]
    grid = [plan.build_variant(q, method, s) for q in ladder]
    plan.estimate(grid, plan.plan_ref(spec), o.targets, o.ctx)
    if dry_run:
        o.log(f"search: bisection over {len(ladder)} types, then a greedy over tensor classes")
        print(plan.render(grid, o.targets, o.ctx), end="")
        return None
    t0 = time.perf_counter()
    path: list[dict[str, Any]] = []
    measured: dict[str, dict[str, Any]] = {}
    built: dict[str, plan.Variant] = {}

    def measure(v: plan.Variant, step: str) -> dict[str, Any]:
        if v.name not in measured:
            measured[v.name] = core.execute(spec, [v], o)[0]
            built[v.name] = v
        r = measured[v.name]
        q = r.get("quality") or {}
        path.append({"step": step, "variant": v.name, "quant": v.quant,
                     "overrides": v.overrides, "status": r["status"],
                     "size_mb": r.get("size_bytes", 0) / 1e6, "kld": q.get("kld_mean"),
                     "meets_goal": _meets(r)})
        o.log(f"search: {step}: {v.name} {r['status']}"
              + (f" KLD {q['kld_mean']:.4f} {r['size_bytes'] / 1e6:.1f} MB" if q else ""))
        return r

    fitting = [v for v in grid if not v.skip]
    lo, hi, best = 0, len(fitting) - 1, None
    while lo <= hi:  # the smallest type that meets the goal
        mid = (lo + hi) // 2
        if _meets(measure(fitting[mid], "bisect")):
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    answer = fitting[best] if best is not None else None
    if best is not None and best > 0:
        # at most the grid's count minus one measurements in all
        answer = _greedy(o.out_dir, fitting[best - 1], fitting[best], s, method, measure,
                         measured, len(fitting) - 1 - len(measured)) or answer
    res = measured.get(answer.name) if answer else None
    summary_search = {
        "goal": s.goal, "ladder": ladder, "grid_variants": len(fitting),
        "measured_variants": len(measured), "path": path,
        "result": None if answer is None else {
            "variant": answer.name, "quant": answer.quant, "overrides": answer.overrides,
            "size_mb": res["size_bytes"] / 1e6, "kld": res["quality"]["kld_mean"]},
        "wall_s": round(time.perf_counter() - t0, 3)}
    return core.finish(spec, list(built.values()), list(measured.values()), o,
                       extra={"search": summary_search},
                       extra_html=_path_html(summary_search))


def _greedy(out_dir: Path, low: plan.Variant, high: plan.Variant, s: plan.Settings,
            method: str, measure: Any, measured: dict[str, dict[str, Any]],
            budget_left: int) -> plan.Variant | None:
    """Raise tensor classes of ``low`` to ``high``'s block type until the goal is met."""
    from edgesmith.compress.gguf_quantize import tensor_types

    base = measured[low.name]
    tensors = tensor_types(out_dir / base["artifact"])
    target_type = BLOCK_TYPE[high.quant]
    high_size = measured[high.name]["size_bytes"]
    kept: dict[str, str] = {}
    last_kld = base["quality"]["kld_mean"]
    budget = len(measured) + max(0, budget_left)
    for cls in classes_of(tensors):
        if len(measured) >= budget:
            return None  # the search would cost as much as the grid
        trial = {**kept, class_pattern(cls): target_type}
        v = plan.build_variant(low.quant, method, s, trial)
        r = measure(v, f"raise {cls} to {target_type}")
        if r["status"] == "failed":
            continue
        if r["size_bytes"] >= high_size:
            return None  # no smaller than the whole-model type above: that one is the answer
        if _meets(r):
            return v
        if r["quality"]["kld_mean"] < last_kld:
            kept, last_kld = trial, r["quality"]["kld_mean"]
    return None


def _path_html(summary: dict[str, Any]) -> str:
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in (
            i + 1, p["step"], p["variant"], f"{p['size_mb']:.1f}",
            "-" if p["kld"] is None else f"{p['kld']:.4f}", "yes" if p["meets_goal"] else "no"))
        + "</tr>" for i, p in enumerate(summary["path"]))
    res = summary["result"]
    head = "".join(f"<th>{c}</th>" for c in ("#", "step", "variant", "size MB", "KLD",
                                             "meets goal"))
    return (f"<h2>Search</h2><p>Goal {escape(str(summary['goal']))}: "
            + (f"<b>{escape(res['variant'])}</b> ({res['size_mb']:.1f} MB, KLD "
               f"{res['kld']:.4f})" if res else "no variant meets it")
            + f", in {summary['measured_variants']} measured variant(s); the grid has "
            f"{summary['grid_variants']}.</p>"
            f'<table id="search"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>')
