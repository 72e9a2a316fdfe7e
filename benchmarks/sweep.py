"""`edgesmith sweep`: what the shared work saves, what Ray costs, what the search saves.

1. Shared work: a sweep of N quant types (imatrix) from an empty cache, against the anchor
   "its most expensive variant run alone from an empty cache + the quantize/verify time of
   the other N-1" (the converter, the reference and the imatrix counted once). Target: <= 1.5.
2. Ray overhead: the same sweep from another empty cache as Ray tasks on a local Ray instance
   (``ray.init(num_cpus=cores)``), against the local executor's wall time. Target: <= 1.2.
3. Search: ``--search --goal max_kld=X`` (X between two grid variants' measured KLD) against
   the grid: the result meets the goal, is no larger than the grid's best that meets it, and
   how many variants each measured.

Every run is a real `edgesmith sweep` (the CLI in a subprocess, or core.sweep for Ray), each
from its own empty EDGESMITH_CACHE; wall and CPU seconds are printed (the machine is shared).

Usage: python benchmarks/sweep.py [--model builtin:smollm2-135m] [--quants Q3_K_M,...]
       [--eval-windows 2] [--skip-ray] [--skip-search]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

LADDER = "Q3_K_M,Q4_0,Q4_K_M,Q5_K_M,Q6_K,Q8_0"


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sweep_cli(args: argparse.Namespace, cache: Path, out: Path, quants: str,
              *extra: str) -> tuple[dict[str, Any], float, float]:
    """(sweep.json, wall s, CPU s) of one `edgesmith sweep` from ``cache``."""
    env = {**os.environ, "EDGESMITH_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "edgesmith.cli", "sweep", args.model, "--targets",
           args.targets, "--quants", quants, "--methods", "imatrix", "--no-bench",
           "--eval-windows", str(args.eval_windows), "--calib-samples", str(args.calib_samples),
           "--calib-seq-len", "128", "-o", str(out), *extra]
    c0, t0 = _cpu_children(), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if p.returncode != 0:
        sys.exit(f"sweep failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads((out / "sweep.json").read_text()), wall, cpu


def qv(r: dict[str, Any]) -> float:
    t = r["timings_s"]
    return t.get("quantize", 0.0) + t.get("verify", 0.0) + t.get("publish", 0.0)


def shared_work(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, Any], float]:
    s, wall, cpu = sweep_cli(args, tmp / "c-sweep", tmp / "sweep", args.quants)
    res = {r["name"]: r for r in s["results"]}
    costly = max(res.values(), key=qv)
    _, wall1, cpu1 = sweep_cli(args, tmp / "c-alone", tmp / "alone",
                                   costly["name"].removesuffix("-imatrix"))
    anchor = wall1 + sum(qv(r) for n, r in res.items() if n != costly["name"])
    print(f"\n1. shared work ({len(res)} variants of {args.model}, {args.eval_windows} eval "
          "windows, no bench)")
    for n, r in res.items():
        t = r["timings_s"]
        print(f"   {n:16s} convert {t.get('convert', 0):6.1f}  reference "
              f"{t.get('reference', 0):6.1f}  imatrix {t.get('imatrix', 0):6.1f}  "
              f"quantize+verify {qv(r):6.1f} s")
    print(f"   sweep wall {wall:.1f} s (CPU {cpu:.1f} s)")
    print(f"   anchor: {costly['name']} alone from an empty cache {wall1:.1f} s (CPU "
          f"{cpu1:.1f} s) + quantize/verify of the other {len(res) - 1}: "
          f"{anchor - wall1:.1f} s = {anchor:.1f} s")
    print(f"   ratio sweep / anchor = {wall / anchor:.2f} (target <= 1.5)")
    return s, wall


def ray_overhead(args: argparse.Namespace, tmp: Path, local_wall: float) -> None:
    import ray

    from edgesmith.sweep import core, plan

    os.environ["EDGESMITH_CACHE"] = str(tmp / "c-ray")  # the Ray workers inherit it
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    try:
        st = plan.Settings(args.targets.split(",")[0], {}, args.calib_samples, 128, 512,
                           args.eval_windows)
        variants = plan.from_options(args.quants.split(","), ["imatrix"], st)
        opts = core.SweepOptions(tmp / "ray", args.targets.split(","), bench=None,
                                 ray="local", log=lambda m: None)
        c0, t0 = time.process_time(), time.perf_counter()
        s = core.sweep(args.model, variants, opts)
        wall = time.perf_counter() - t0
    finally:
        ray.shutdown()
    failed = [r["name"] for r in s["results"] if r["status"] == "failed"]
    print(f"\n2. Ray overhead: local Ray ({os.cpu_count()} CPUs), same sweep, empty cache")
    print(f"   Ray wall {wall:.1f} s (driver CPU {time.process_time() - c0:.1f} s), local "
          f"executor {local_wall:.1f} s: ratio {wall / local_wall:.2f} (target <= 1.2)"
          + (f"; FAILED: {failed}" if failed else ""))


def search_vs_grid(args: argparse.Namespace, tmp: Path, grid: dict[str, Any]) -> None:
    res = sorted(grid["results"], key=lambda r: r["size_bytes"])
    ok = [r for r in res if r["status"] != "failed"]
    goal = args.goal or (ok[1]["quality"]["kld_mean"] + ok[2]["quality"]["kld_mean"]) / 2
    meeting = [r for r in ok if r["quality"]["kld_mean"] <= goal]
    s, wall, _ = sweep_cli(args, tmp / "c-sweep", tmp / "search", args.quants,
                             "--search", "--goal", f"max_kld={goal:.6f}")
    se = s["search"]
    r = se["result"]
    print(f"\n3. search, goal max_kld={goal:.4f} (between the grid's 2nd and 3rd smallest)")
    for i, p in enumerate(se["path"], 1):
        print(f"   {i}. {p['step']:28s} {p['variant']:40s} {p['size_mb']:7.2f} MB  KLD "
              f"{p['kld']:.4f}  {'meets' if p['meets_goal'] else 'misses'}")
    best = min(meeting, key=lambda x: x["size_bytes"]) if meeting else None
    print(f"   grid: {len(ok)} measured, best meeting the goal "
          + (f"{best['name']} {best['size_bytes'] / 1e6:.2f} MB KLD "
             f"{best['quality']['kld_mean']:.4f}" if best else "none"))
    print("   search: " + (f"{r['variant']} {r['size_mb']:.2f} MB KLD {r['kld']:.4f}" if r else
                           "none") + f", {se['measured_variants']} measured variant(s) "
          f"({wall:.1f} s wall, shared cache with the grid)")
    if r and best:
        print(f"   meets goal: {r['kld'] <= goal}; size vs grid best: "
              f"{r['size_mb'] * 1e6 / best['size_bytes']:.3f}; measured "
              f"{se['measured_variants']} vs {len(ok)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--targets", default="raspberry-pi-4,raspberry-pi-5")
    ap.add_argument("--quants", default=LADDER)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--goal", type=float, default=None)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-search", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgesmith-bench-sweep-") as t:
        tmp = Path(t)
        grid, wall = shared_work(args, tmp)
        if not args.skip_search:
            search_vs_grid(args, tmp, grid)
        if not args.skip_ray:
            ray_overhead(args, tmp, wall)


if __name__ == "__main__":
    main()
