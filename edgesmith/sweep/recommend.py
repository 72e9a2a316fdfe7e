"""Per target: the variant that fits its RAM at the context, meets the gates and is fastest,
and the smallest that meets them, with the numbers that decided it.

Fit is ``targets fit``'s estimate on the artifact itself (its real tensor bytes, KV cache and
compute buffers at ``ctx``). Speed is the decode tokens/s measured on a device of that target
(a ``--device`` whose NAME is the target's name) where there is one, else the target's
roofline bound (memory bandwidth / bytes read per token) from the same estimate, marked as
an estimate: on a memory-bound device it ranks variants the way measured speed does. The two
are never ranked together: once a device of the target measured a variant, the fastest is
chosen among the measured ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgesmith import models
from edgesmith.targets import fit, profile


@dataclass
class Candidate:
    variant: str
    size_mb: float
    kld: float
    ppl_increase_pct: float
    top1: float
    decode_tps: float
    speed_source: str  # "measured on DEVICE" | "roofline estimate"
    total_mb: float
    usable_mb: float


@dataclass
class Recommendation:
    target: str
    ctx: int
    fastest: Candidate | None
    smallest: Candidate | None
    candidates: list[Candidate] = field(default_factory=list)
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (variant, why)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def recommend(out_root: Path, results: list[dict[str, Any]], targets: list[str], ctx: int,
              measured: dict[tuple[str, str], float] | None = None) -> list[Recommendation]:
    """``measured``: (variant, target) -> decode tokens/s measured on a device of the target."""
    measured = measured or {}
    recs = []
    for tname in targets:
        target = profile.load(tname)
        rec = Recommendation(tname, ctx, None, None)
        for r in results:
            if r["status"] == "skipped":
                rec.excluded.append((r["name"], r.get("error") or "skipped"))
                continue
            if r["status"] == "failed":
                rec.excluded.append((r["name"], r.get("error", "failed")))
                continue
            est = fit.estimate(models.resolve(str(out_root / r["artifact"])), target, ctx)
            if r["status"] != "ok":
                rec.excluded.append((r["name"], "missed the gates: "
                                     + "; ".join(r["gates"]["failures"])))
                continue
            if not est.fits:
                rec.excluded.append((r["name"], f"does not fit: needs {est.total_bytes / 1e6:.0f}"
                                     f" MB of {est.usable_ram_bytes / 1e6:.0f} MB at ctx {ctx}"))
                continue
            tps = measured.get((r["name"], tname))
            q = r["quality"]
            rec.candidates.append(Candidate(
                r["name"], r["size_bytes"] / 1e6, q["kld_mean"], q["ppl_increase_pct"],
                q["top1_agreement"], tps if tps is not None else est.decode_tps_upper_bound,
                f"measured on {tname}" if tps is not None else "roofline estimate",
                est.total_bytes / 1e6, est.usable_ram_bytes / 1e6))
        if rec.candidates:
            # measured speeds and roofline bounds are not compared with each other: where a
            # device of the target measured some variants, the fastest is among those
            on_device = [c for c in rec.candidates if c.speed_source.startswith("measured")]
            # ties (same speed) go to the closer-to-reference variant
            rec.fastest = max(on_device or rec.candidates, key=lambda c: (c.decode_tps, -c.kld))
            rec.smallest = min(rec.candidates, key=lambda c: (c.size_mb, c.kld))
        recs.append(rec)
    return recs
