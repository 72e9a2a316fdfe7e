"""A whole sweep: plan -> run every variant (local workers or Ray) -> bench on devices ->
recommend per target -> ``sweep.json`` and ``report.html`` in -o.

``-o`` holds ``<variant>/`` (artifact, manifest.json, report.md: the pipeline's result),
``bench/<variant>.<device>.json`` (bench results), ``logs/<variant>.log`` (local workers),
``sweep.json`` (the plan, every result, the recommendations) and ``report.html``. Running
the same command again resumes: finished variants are kept, the others run (from the cache).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.bench import results as bench_results
from edgesmith.fsutil import write_json_atomic, write_text_atomic
from edgesmith.sweep import local, plan, recommend, report
from edgesmith.sweep.worker import BENCH_DIR

BENCH_DEFAULTS = {"prompt_tokens": 32, "gen_tokens": 16, "repeat": 2, "warmup": 1}


@dataclass
class SweepOptions:
    out_dir: Path
    targets: list[str]
    ctx: int = 4096
    force: bool = False
    jobs: int | None = None
    threads: int | None = None
    bench: dict[str, Any] | None = field(default_factory=lambda: dict(BENCH_DEFAULTS))
    ray: str | None = None
    ray_gpu: bool = False
    devices: dict[str, str] = field(default_factory=dict)  # NAME -> URL
    api_key_file: Path | None = None
    log: Any = print


def execute(spec: str, variants: list[plan.Variant], o: SweepOptions) -> list[dict[str, Any]]:
    """Run the variants that are not skipped (locally or on Ray); results in plan order,
    skipped variants included."""
    sched = local.schedule(variants)
    o.out_dir.mkdir(parents=True, exist_ok=True)
    n = len(sched)

    def on_result(r: dict[str, Any]) -> None:
        extra = r.get("error") or (f"KLD {r['quality']['kld_mean']:.4f}, "
                                   f"{r['size_bytes'] / 1e6:.1f} MB")
        o.log(f"sweep: {r['name']}: {r['status']}{' (resumed)' if r.get('resumed') else ''}"
              f" ({extra})")

    if o.ray:
        from edgesmith.sweep import ray_exec

        ran = ray_exec.run(spec, sched, o.out_dir, o.ray, o.threads, o.force, o.bench,
                           on_result, gpu=o.ray_gpu, log=o.log)
    else:
        b = local.budget(n, spec, o.jobs, o.threads)
        o.log(f"sweep: {n} variant(s) to run locally in {b.line()}")
        ran = local.run(spec, sched, o.out_dir, b, o.force, o.bench, on_result)
    by_name = {r["name"]: r for r in ran}
    return [by_name.get(v.name) or {"name": v.name, "status": "skipped", "error": v.skip}
            for v in variants]


def _bench_files(out_dir: Path, results: list[dict[str, Any]]) -> list[Any]:
    names = {r["name"] for r in results if r["status"] in ("ok", "gates-failed")}
    found = []
    for f in sorted((out_dir / BENCH_DIR).glob("*.json")):
        if f.name.split(".", 1)[0] in names:
            found.append(bench_results.read(f))
    return found


def finish(spec: str, variants: list[plan.Variant], results: list[dict[str, Any]],
           o: SweepOptions, extra: dict[str, Any] | None = None,
           extra_html: str = "") -> dict[str, Any]:
    """Devices, recommendations, sweep.json and report.html."""
    measured: dict[tuple[str, str], float] = {}
    device_rows: list[dict[str, Any]] = []
    if o.devices:
        from edgesmith.sweep import devices

        device_rows = devices.bench_all(o.out_dir, results, o.devices, o.api_key_file,
                                        o.bench or BENCH_DEFAULTS, o.log)
        measured = {(d["variant"], d["device"]): d["decode_tps"] for d in device_rows
                    if d.get("decode_tps") is not None}
    recs = recommend.recommend(o.out_dir, results, o.targets, o.ctx, measured)
    bench = _bench_files(o.out_dir, results)
    summary = {"schema": "edgesmith.sweep", "schema_version": 1, "model": spec,
               "targets": o.targets, "ctx": o.ctx,
               "variants": [v.as_dict() for v in variants], "results": results,
               "devices": device_rows, "recommendations": [r.as_dict() for r in recs],
               **(extra or {})}
    write_json_atomic(o.out_dir / "sweep.json", summary)
    write_text_atomic(o.out_dir / "report.html",
                      report.render_html(spec, results, recs, bench, extra_html))
    return summary


def sweep(spec: str, variants: list[plan.Variant], o: SweepOptions) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = execute(spec, variants, o)
    summary = finish(spec, variants, results, o)
    summary["wall_s"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(o.out_dir / "sweep.json", summary)
    return summary
