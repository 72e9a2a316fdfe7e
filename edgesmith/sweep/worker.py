"""Run one variant: the pipeline into ``<out>/<variant>/``, then (optionally) a local bench.

The same function runs in a local worker process (``python -m edgesmith.sweep.worker JOB``,
one process per variant, so a crash of llama.cpp or an out-of-memory kill takes only its own
variant down) and inside a Ray task. It never raises for a variant's failure: the result
dict says what happened (``ok``, ``gates-failed`` with its manifest, ``failed`` with the
one-line error), so one failed variant does not stop the others.

Resume: a variant whose folder already holds a complete result (``fsutil.verify_result``)
of the same recipe text is not run again; a killed one is run again and the pipeline resumes
it from the cache (its F16 GGUF, reference, imatrix and torch-side passes).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from edgesmith.errors import EdgesmithError, QualityGateError
from edgesmith.fsutil import verify_result, write_json_atomic

BENCH_DIR = "bench"


def bench_path(out_root: Path, name: str, device: str) -> Path:
    return out_root / BENCH_DIR / f"{name}.{device}.json"


def done_result(out_root: Path, name: str, recipe_text: str) -> dict[str, Any] | None:
    """The result of a variant finished by an earlier run of the same sweep, else None."""
    vdir = out_root / name
    man_file = vdir / "manifest.json"
    if not man_file.exists() or verify_result(vdir):
        return None
    man = json.loads(man_file.read_text())
    if man.get("recipe", {}).get("text") != recipe_text:
        return None
    return _result(name, man, out_root, time_s=0.0, resumed=True)


def _result(name: str, man: dict[str, Any], out_root: Path, time_s: float,
            resumed: bool = False) -> dict[str, Any]:
    art = man["artifacts"][0]
    return {"name": name, "status": "ok" if man["gates"]["passed"] else "gates-failed",
            "resumed": resumed, "artifact": f"{name}/{art['path']}",
            "size_bytes": art["size_bytes"], "sha256": art["sha256"],
            "quality": art["quality"], "gates": man["gates"],
            "timings_s": man.get("timings_s", {}), "seconds": round(time_s, 3),
            "fallbacks": len(art.get("fallbacks", [])), "error": ""}


def run_variant(spec: str, name: str, recipe_text: str, out_root: str, threads: int,
                force: bool = False, bench: dict[str, Any] | None = None,
                device_label: str = "local") -> dict[str, Any]:
    """Compress (and bench) one variant; returns its result dict, never raises for it."""
    from edgesmith import pipeline, recipe
    from edgesmith.context import make_progress

    root = Path(out_root)
    t0 = time.perf_counter()
    res = None if force else done_result(root, name, recipe_text)
    try:
        if res is None:
            rec = recipe.parse(recipe_text, f"<sweep variant {name}>")
            opts = pipeline.Options(out_dir=root / name, force=force, threads=threads,
                                    command=["edgesmith", "sweep", f"--variant={name}"])
            with make_progress(quiet=True) as progress:
                try:
                    man = pipeline.compress(spec, rec, opts, progress)
                except QualityGateError as exc:
                    if exc.manifest is None:
                        raise
                    man = exc.manifest
            res = _result(name, man, root, time.perf_counter() - t0)
        if bench is not None:
            res["bench"] = _bench(root, res, threads, bench, device_label, force)
    except EdgesmithError as exc:
        res = {"name": name, "status": "failed", "error": exc.one_line(),
               "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as exc:  # a variant's bug must not stop the sweep
        res = {"name": name, "status": "failed",
               "error": f"error: {type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-4000:],
               "seconds": round(time.perf_counter() - t0, 3)}
    return res


def _bench(root: Path, res: dict[str, Any], threads: int, cfg: dict[str, Any],
           device: str, force: bool) -> str:
    """A local bench of the variant's artifact, its quality taken from the manifest (the
    pipeline measured it in llama.cpp); cached in ``bench/`` like the variant itself."""
    from edgesmith.bench import results, speed

    dest = bench_path(root, res["name"], device)
    if dest.exists() and not force:
        old = results.read(dest)
        if old.artifact.sha256 == res["sha256"]:
            return str(dest.relative_to(root))
    spec = speed.SpeedSpec(threads=threads, **cfg)
    r = speed.bench_local(root / res["artifact"], spec, device=device,
                          command=["edgesmith", "sweep", f"--variant={res['name']}"])
    r = with_quality(r, res)
    dest.parent.mkdir(parents=True, exist_ok=True)
    results.write(r, dest, force=True)
    return str(dest.relative_to(root))


def with_quality(r: Any, res: dict[str, Any]) -> Any:
    from edgesmith.bench.results import Quality

    return r.model_copy(update={"quality": Quality(reference="sweep input (torch fp32)",
                                                   **res["quality"])})


def main(argv: list[str]) -> int:
    """``python -m edgesmith.sweep.worker JOB.json RESULT.json``: the local executor's
    worker process."""
    from edgesmith import interrupts

    interrupts.install()
    job = json.loads(Path(argv[0]).read_text())
    res = run_variant(**job)
    write_json_atomic(Path(argv[1]), res)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
