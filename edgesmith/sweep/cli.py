"""`edgesmith sweep` (registered into the main CLI by ``register``)."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from edgesmith.errors import EdgesmithError, RecipeError

err = Console(stderr=True)


def _split(values: list[str] | None) -> list[str]:
    return [p.strip() for v in values or [] for p in v.split(",") if p.strip()]


def _recipe_paths(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        hits = sorted(glob.glob(v)) if any(c in v for c in "*?[") else [v]
        if not hits:
            raise RecipeError(f"--recipes {v} matches no file", "check the pattern")
        out.extend(hits)
    return out


def _devices(values: list[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, url = v.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise EdgesmithError(f"--device {v!r} is not NAME=URL",
                                 "e.g. --device raspberry-pi-5=http://pi.local:8080")
        out[name] = url
    return out


def sweep(
    model: str = typer.Argument(..., help="HF model directory, .gguf file, or builtin:NAME."),
    more_recipes: list[str] = typer.Argument(None, hidden=True,
                                             help="Recipe files a shell glob expanded."),
    targets: list[str] = typer.Option(None, "--targets", "-t",
                                      help="Targets, comma-separated (default: the recipes')."),
    quants: list[str] = typer.Option(None, "--quants", "-q",
                                     help="GGUF types, comma-separated (default Q4_0,Q4_K_M,"
                                          "Q5_K_M,Q6_K,Q8_0)."),
    methods: list[str] = typer.Option(None, "--methods", "-m",
                                      help="plain, imatrix, gptq, awq, comma-separated "
                                           "(default imatrix)."),
    recipes: list[str] = typer.Option(None, "--recipes", "-r",
                                      help="Recipe files or globs instead of --quants."),
    goal: str = typer.Option(None, "--goal",
                             help="Gates of every variant, e.g. 'max_kld=0.03,"
                                  "max_ppl_increase_pct=6'."),
    search: bool = typer.Option(False, "--search",
                                help="Find the smallest variant meeting --goal (per-tensor "
                                     "types included) instead of the full grid."),
    ctx: int = typer.Option(4096, "--ctx", help="Context the targets must fit."),
    eval_windows: int = typer.Option(8, "--eval-windows", help="Quality eval windows."),
    eval_ctx: int = typer.Option(512, "--eval-ctx", help="Quality eval window length."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="Calibration samples."),
    calib_seq_len: int = typer.Option(512, "--calib-seq-len", help="Calibration length."),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Parallel variants (default: auto)."),
    threads: int = typer.Option(None, "--threads", help="Threads per variant (default: auto)."),
    bench: bool = typer.Option(True, "--bench/--no-bench", help="Bench each variant here."),
    ray: str = typer.Option(None, "--ray", help="Ray address (auto, ray://head:10001): each "
                                                "variant a Ray task."),
    ray_gpu: bool = typer.Option(False, "--ray-gpu", help="Ask Ray for a GPU for torch-side "
                                                          "passes (gptq, awq)."),
    device: list[str] = typer.Option(None, "--device", help="NAME=URL of a device server "
                                                            "(repeatable)."),
    api_key_file: Path = typer.Option(None, "--api-key-file", help="Device servers' API key."),
    output: Path = typer.Option(Path("sweep"), "--output", "-o", help="Output directory."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and exit."),
    force: bool = typer.Option(False, "--force", help="Redo finished variants."),
    as_json: bool = typer.Option(False, "--json", help="Print sweep.json on stdout."),
) -> None:
    """Build every variant of a model (quant types x methods, or recipe files), check each
    one's quality, bench it, and recommend per target the fastest and the smallest variant
    that fits and meets the gates. Re-running the same command resumes.

    Example: edgesmith sweep ./model --targets raspberry-pi-4,raspberry-pi-5
    --quants Q4_0,Q4_K_M,Q8_0 --methods imatrix,gptq -o sweep/

    Example: edgesmith sweep ./model --targets raspberry-pi-4 --goal max_kld=0.03 --search
    """
    from edgesmith.sweep import core, plan

    goal_d = plan.parse_goal(goal)
    rpaths = _recipe_paths(_split(recipes) + list(more_recipes or []))
    if more_recipes and not recipes:
        raise EdgesmithError(f"unexpected argument {more_recipes[0]}",
                             "sweep takes one MODEL; recipe files go after --recipes")
    if rpaths and (quants or methods or search):
        raise RecipeError("--recipes cannot be combined with --quants, --methods or --search",
                          "pick recipe files, or build the variants from options")
    if search and not goal_d:
        raise RecipeError("--search needs a --goal", "e.g. --goal max_kld=0.03")
    if ray is not None:
        from edgesmith.errors import require

        require("ray", "ray")
    if device and not api_key_file:
        raise EdgesmithError("--device needs --api-key-file", "pass the device servers' key")
    if rpaths:
        variants = plan.from_recipes(rpaths)
        tlist = _split(targets) or sorted({v.recipe().model.target for v in variants})
    else:
        tlist = _split(targets)
        if not tlist:
            raise RecipeError("sweep needs --targets (or --recipes)",
                              "e.g. --targets raspberry-pi-4,raspberry-pi-5")
        s = plan.Settings(tlist[0], goal_d, calib_samples, calib_seq_len, eval_ctx,
                          eval_windows)
        if search:
            variants = []
        else:
            variants = plan.from_options(_split(quants) or
                                         ["Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"],
                                         _split(methods) or ["imatrix"], s)
    from edgesmith.targets import profile

    for t in tlist:
        profile.load(t)  # an unknown target is one line before any work
    plan.check_output(output, variants)
    opts = core.SweepOptions(output, tlist, ctx, force, jobs, threads,
                             dict(core.BENCH_DEFAULTS) if bench else None, ray, ray_gpu,
                             _devices(device), api_key_file,
                             log=lambda m: err.print(m, markup=False, highlight=False))
    if search:
        from edgesmith.sweep import search as srch

        summary = srch.run(model, s, _split(quants), _split(methods) or ["imatrix"], opts,
                           dry_run=dry_run)
        if summary is not None and as_json:
            sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
        return
    plan.estimate(variants, plan.plan_ref(model), tlist, ctx)
    table = plan.render(variants, tlist, ctx)
    if dry_run:
        sys.stdout.write(table)
        return
    err.print(table, markup=False, highlight=False)
    summary = core.sweep(model, variants, opts)
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2, default=str) + "\n")
    for r in summary["recommendations"]:
        f, s_ = r["fastest"], r["smallest"]
        err.print(f"{r['target']}: " + (f"fastest {f['variant']} ({f['decode_tps']:.1f} tok/s, "
                                        f"{f['size_mb']:.1f} MB, KLD {f['kld']:.4f}); smallest "
                                        f"{s_['variant']} ({s_['size_mb']:.1f} MB)" if f else
                                        "no variant fits and meets the gates"),
                  markup=False, highlight=False)
    err.print(f"wrote {output / 'report.html'}", markup=False, highlight=False)
    failed = [r for r in summary["results"] if r["status"] == "failed"]
    if failed:
        raise EdgesmithError(f"{len(failed)} variant(s) failed: "
                             + "; ".join(f"{r['name']}: {r['error']}" for r in failed[:3]),
                             f"see {output / 'logs'}; re-run the same command to retry them")


def register(app: typer.Typer) -> None:
    """Add the `sweep` command to ``app``."""
    app.command()(sweep)
