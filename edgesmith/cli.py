"""The edgesmith command line (Typer). Each command maps onto a Python function.

Errors users can cause are printed on one line and exit with code 2; tracebacks only with
--debug. Logs and progress go to stderr; --json prints machine-readable results on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from edgesmith import __version__
from edgesmith.errors import EdgesmithError, QualityGateError, RecipeError

app = typer.Typer(
    name="edgesmith",
    help="Turn a language model into quality-checked, benchmarked artifacts for edge devices.\n\n"
    "Example: edgesmith compress builtin:smollm2-135m --target raspberry-pi-5 -o out/",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
targets_app = typer.Typer(help="Device profiles.\n\nExample: edgesmith targets show raspberry-pi-5",
                          no_args_is_help=True)
recipes_app = typer.Typer(help="Shipped recipes.\n\nExample: edgesmith recipes validate my.yaml",
                          no_args_is_help=True)
app.add_typer(targets_app, name="targets")
app.add_typer(recipes_app, name="recipes")
out = Console()
err = Console(stderr=True)


def _emit(data: Any, as_json: bool) -> bool:
    """Print ``data`` as JSON on stdout when asked; returns whether it did."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    return as_json


QUIET_LOGGERS = ("torchao", "torch.utils._pytree")
# TensorFlow's C++ start-up lines (coremltools and litert-torch import it)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
) -> None:
    if version:
        out.print(__version__)
        raise typer.Exit()
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        # import-time noise of optional libraries (torchao's missing CUDA kernels, torch's
        # pytree deprecations), not about the user's run
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)


def _input_model(spec: str, allow_pickle: bool, loads: bool) -> Any:
    """The input model of compress and export, resolved and checked (its config.json, every
    header, and for ``loads`` the memory of its fp32 load) before any progress display or
    heavy work: a bad model is one line and exit 2, from either command. Later load errors
    become the same ModelError in models.load_hf (compress) or a ToolError from the
    converter (export)."""
    from edgesmith import models

    ref = models.resolve(spec, allow_pickle=allow_pickle)
    if loads:
        models.check_load_memory(ref)
    return ref


@app.command()
def compress(
    model: str = typer.Argument(..., help="HF model directory, .gguf file, or builtin:NAME."),
    target: str = typer.Option(None, "--target", "-t", help="Device; uses its default recipe."),
    recipe_path: str = typer.Option(None, "--recipe", "-r", help="Recipe name or YAML file."),
    output: Path = typer.Option(Path("out"), "--output", "-o", help="Output directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing outputs."),
    threads: int = typer.Option(None, "--threads", help="CPU threads (default: all)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Allow pickle checkpoints (can execute code)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON on stdout."),
    adapter: str = typer.Option(None, "--adapter",
                                help="PEFT LoRA adapter dir merged first (a merge_lora step)."),
) -> None:
    """Compress a model for a device: recipe steps, real-runtime quality check, gates.

    Writes the artifact, manifest.json and report.md into the output directory, and exits
    with code 2 and a one-line reason when a quality gate is missed.

    Example: edgesmith compress builtin:smollm2-135m --target raspberry-pi-5 -o out/

    Example: edgesmith compress ./base --adapter ./my-adapter --target raspberry-pi-5 -o out/
    """
    from edgesmith import pipeline, recipe
    from edgesmith.context import make_progress

    if bool(target) == bool(recipe_path):
        raise RecipeError("pass exactly one of --target or --recipe",
                          "e.g. --target raspberry-pi-5, or --recipe recipes/FILE.yaml")
    rec = recipe.load(recipe_path) if recipe_path else recipe.for_target(target)
    from edgesmith.compress.merge_lora import prepend_to_recipe

    prepend_to_recipe(rec, adapter, allow_pickle)  # --adapter: a merge_lora step first
    _input_model(model, allow_pickle, loads=True)
    opts = pipeline.Options(out_dir=output, force=force, threads=threads,
                            allow_pickle=allow_pickle, command=["edgesmith", *sys.argv[1:]])
    try:
        with make_progress() as progress:
            man = pipeline.compress(model, rec, opts, progress)
    except QualityGateError as exc:  # the manifest (marked failed) was written: show it too
        if exc.manifest is not None:
            _emit(exc.manifest, as_json)
        raise
    if not _emit(man, as_json):
        a = man["artifacts"][0]
        q = a["quality"]
        err.print(f"[green]wrote[/] {output / a['path']} ({a['size_bytes'] / 1e6:.1f} MB): "
                  f"perplexity {q['ppl_increase_pct']:+.2f}%, KLD {q['kld_mean']:.4f}, "
                  f"top-1 {100 * q['top1_agreement']:.1f}%; gates passed; "
                  f"report: {output / 'report.md'}")


def _type_of(exporter: Any) -> str:
    kind = getattr(exporter, "artifact_type", None)
    return str(kind()) if kind else str(exporter.format)


@app.command()
def export(
    model: str = typer.Argument(..., help="HF model directory, .gguf file, or builtin:NAME."),
    fmt: str = typer.Option("gguf", "--format", "-f",
                            help="Export format: gguf, onnx (transformers.js folder) or hf-gptq."),
    outtype: str = typer.Option(None, "--outtype", help="gguf: f16 (default), bf16 or f32."),
    dtype: str = typer.Option(None, "--dtype", help="onnx: fp32 (default) or q4 (int4)."),
    block_size: int = typer.Option(None, "--block-size",
                                   help="onnx q4: 16, 32 (default), 64, 128."),
    bits: int = typer.Option(None, "--bits", help="hf-gptq: 2, 3, 4 (default) or 8."),
    group_size: int = typer.Option(None, "--group-size", help="hf-gptq: 32, 64, 128 (default)."),
    sym: bool = typer.Option(None, "--sym/--asym", help="hf-gptq: symmetric (default) or not."),
    samples: int = typer.Option(None, "--samples", help="hf-gptq: calibration chunks (32)."),
    seq_len: int = typer.Option(None, "--seq-len", help="hf-gptq: tokens per chunk (512)."),
    output: Path = typer.Option(Path("out"), "--output", "-o", help="Output directory."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Allow pickle checkpoints (can execute code)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Run one exporter, no recipe and no quality check.

    A file format (gguf) writes one file into -o; a folder format writes its files into -o
    itself (onnx: config.json, tokenizer files and onnx/model*.onnx, as transformers.js loads
    them; hf-gptq: a GPTQ checkpoint), with a manifest listing every file's sha256.

    Example: edgesmith export ./my-hf-model --format onnx --dtype q4 -o out/web/
    """
    from edgesmith import models
    from edgesmith.context import RunContext, make_progress
    from edgesmith.export import EXPORTERS
    from edgesmith.fsutil import (
        Publication,
        cache_root,
        check_result_writable,
        check_writable,
        sha256_file,
    )

    if fmt not in EXPORTERS:
        raise RecipeError(f"unknown export format '{fmt}'", f"use one of: {', '.join(EXPORTERS)}")
    cls = EXPORTERS[fmt]
    given = {"outtype": outtype, "dtype": dtype, "block_size": block_size, "bits": bits,
             "group_size": group_size, "sym": sym, "samples": samples, "seq_len": seq_len}
    flags = {"outtype": "--outtype", "dtype": "--dtype", "block_size": "--block-size",
             "bits": "--bits", "group_size": "--group-size", "sym": "--sym/--asym",
             "samples": "--samples", "seq_len": "--seq-len"}
    given = {k: v for k, v in given.items() if v is not None}
    for key in given:
        if key not in cls.Config.model_fields:
            known = [flags[k] for k in flags if k in cls.Config.model_fields]
            raise RecipeError(f"{flags[key]} does not apply to --format {fmt}",
                              f"options of {fmt}: {', '.join(known)}")
    try:
        config = cls.Config(**given)
    except ValueError as exc:
        first = exc.errors()[0] if hasattr(exc, "errors") else {"loc": ("?",), "msg": str(exc)}
        key = str(first["loc"][0])
        raise RecipeError(f"invalid {flags.get(key, key)} for --format {fmt}: {first['msg']}",
                          "see `edgesmith export --help`") from exc
    exporter = cls(config)
    ref = _input_model(model, allow_pickle, loads=False)
    folder = getattr(exporter, "layout", "file") == "folder"
    if folder:
        check_result_writable(output, ["manifest.json"], force)
    else:
        dest = output / f"{ref.name}.{_type_of(exporter)}.{fmt}"
        check_writable(dest, force)
    with make_progress() as progress:
        cache = cache_root() / "runs" / ref.fingerprint()
        cache.mkdir(parents=True, exist_ok=True)
        ctx = RunContext(out_dir=output, cache_dir=cache, progress=progress, force=force)
        hf_dir = models.as_hf_dir(ref, progress)
        if not folder:
            art = exporter.export(hf_dir, ctx, dest)
            result = {"path": str(art.path), "format": fmt, "type": _type_of(exporter),
                      "size_bytes": art.path.stat().st_size, "sha256": sha256_file(art.path),
                      "converter_peak_rss_bytes": art.meta.get("peak_rss_bytes"),
                      "converter_peak_anon_bytes": art.meta.get("peak_anon_bytes")}
        else:
            from edgesmith import manifest as manifest_mod
            from edgesmith.fsutil import temp_path

            staging = temp_path(cache / f"export-{fmt}")
            try:
                art = exporter.export(hf_dir, ctx, staging)
                names = sorted(p.name for p in art.path.iterdir())
                with Publication(output, names, force) as pub:
                    for name in names:
                        pub.copy(art.path / name, name, progress)
                    man = manifest_mod.new(["edgesmith", *sys.argv[1:]])
                    man.update({"input": {"spec": model, "kind": ref.kind},
                                "export": {"format": fmt, "config": config.model_dump(),
                                           "meta": {k: v for k, v in art.meta.items()
                                                    if k != "tensors"}}})
                    man = pub.commit(man)
            finally:
                import shutil

                shutil.rmtree(staging, ignore_errors=True)
            result = {"path": str(output), "format": fmt, "type": _type_of(exporter),
                      "size_bytes": sum(f["size_bytes"] for f in man["files"]),
                      "files": man["files"], "meta": man["export"]["meta"]}
    if not _emit(result, as_json):
        err.print(f"[green]wrote[/] {result['path']} ({result['size_bytes'] / 1e6:.1f} MB)")


@app.command()
def doctor(
    model: str = typer.Argument(..., help="HF model directory, .gguf file, or builtin:NAME."),
    target: str = typer.Option(None, "--target", "-t", help="Device (its formats are checked)."),
    recipe_path: str = typer.Option(None, "--recipe", "-r", help="Recipe name or YAML file."),
    ctx: int = typer.Option(4096, "--ctx", min=1, help="Context length for the RAM fit."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="Allow pickle checkpoints (can execute code)."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON on stdout."),
) -> None:
    """Say what will and will not work for a model, before any heavy work (headers only).

    One table per target format: can the architecture be converted, do the layers' widths
    suit the recipe's block and group sizes, does it fit the target's RAM at --ctx, which
    tokenizer and chat template it has, what is missing. Exits 2 if a check fails; compress
    runs the same checks first.

    Example: edgesmith doctor ./my-hf-model --target raspberry-pi-5 --ctx 4096
    """
    from edgesmith import doctor as doc
    from edgesmith import recipe
    from edgesmith.targets import profile

    if target and recipe_path:
        raise RecipeError("pass at most one of --target or --recipe",
                          "e.g. --target raspberry-pi-5, or --recipe recipes/FILE.yaml")
    rec = recipe.load(recipe_path) if recipe_path else \
        recipe.for_target(target) if target and profile.load(target).default_recipe else None
    rep = doc.run(model, target_name=target, recipe=rec, ctx=ctx, allow_pickle=allow_pickle)
    if not _emit(rep.as_dict(), as_json):
        doc.render(rep, err)
    if rep.failures:
        raise typer.Exit(2)


@targets_app.command("list")
def targets_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List device profiles. Example: edgesmith targets list"""
    from edgesmith.targets import profile

    ts = profile.all_targets()
    if _emit([t.model_dump() for t in ts], as_json):
        return
    table = Table("target", "RAM", "bandwidth", "runtimes", "default recipe")
    for t in ts:
        table.add_row(t.name, f"{t.ram_gb:g} GB", f"{t.memory_bandwidth_gbs:g} GB/s",
                      ", ".join(t.runtimes), t.default_recipe or "—")
    out.print(table)


@targets_app.command("show")
def targets_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Show one device profile. Example: edgesmith targets show raspberry-pi-5"""
    from edgesmith.targets import profile

    t = profile.load(name)
    if not _emit(t.model_dump(), as_json):
        import yaml

        out.print(yaml.safe_dump(t.model_dump(), sort_keys=False).rstrip())


@targets_app.command("fit")
def targets_fit(
    model: str = typer.Argument(..., help="HF model directory, .gguf file, or builtin:NAME."),
    target: str = typer.Option(..., "--target", "-t", help="Device profile name."),
    ctx: int = typer.Option(4096, "--ctx", help="Context length in tokens."),
    quant: str = typer.Option(None, "--quant", help="Planned type for an HF model (Q4_K_M)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Estimate memory (weights + KV cache + overhead) and a decode tokens/s upper bound.

    Example: edgesmith targets fit ./my-hf-model --target raspberry-pi-5 --ctx 4096
    """
    from edgesmith import models
    from edgesmith.targets import fit, profile

    t = profile.load(target)
    if quant is not None and quant not in fit.BITS_PER_WEIGHT:
        raise RecipeError(f"unknown --quant {quant}",
                          f"use one of: {', '.join(fit.BITS_PER_WEIGHT)}")
    ref = models.resolve(model)
    rep = fit.estimate(ref, t, ctx, quant)
    browser = None
    if t.browser is not None:  # what onnxruntime-web can load at all
        from edgesmith.doctor_onnx import browser_fit

        browser = browser_fit(ref, t)
    if _emit({**rep.as_dict(), **({"browser": browser} if browser else {})}, as_json):
        return
    mb = lambda b: f"{b / 1e6:,.0f} MB"  # noqa: E731
    table = Table("item", "value", title=f"{model} on {t.name} at ctx {ctx} ({rep.quant})")
    for k, v in [("weights", mb(rep.weights_bytes)), ("KV cache (f16)", mb(rep.kv_cache_bytes)),
                 ("compute buffers", mb(rep.compute_bytes)), ("runtime", mb(rep.runtime_bytes)),
                 ("total", mb(rep.total_bytes)), ("usable RAM", mb(rep.usable_ram_bytes)),
                 ("fits", "yes" if rep.fits else "NO"), ("headroom", mb(rep.headroom_bytes)),
                 ("max ctx that fits in RAM", f"{rep.max_ctx_that_fits:,}"),
                 ("model's trained context", f"{rep.model_ctx_limit:,}"
                  if rep.model_ctx_limit else "unknown"),
                 ("decode tok/s upper bound", f"{rep.decode_tps_upper_bound:.1f}")]:
        table.add_row(k, v)
    if browser:
        table.add_row("browser: q4 weights (one ArrayBuffer)",
                      f"{mb(browser['q4_bytes'])} of {mb(browser['max_array_buffer_bytes'])}"
                      f" ({'fits' if browser['fits_array_buffer'] else 'DOES NOT LOAD'})")
        table.add_row("browser: largest tensor (one WebGPU buffer)",
                      f"{mb(browser['largest_tensor_bytes'])} of "
                      f"{mb(browser['max_buffer_bytes'])}"
                      f" ({'fits' if browser['fits_gpu_buffer'] else 'DOES NOT LOAD'})")
    out.print(table)
    if rep.ctx_beyond_model:
        err.print(f"[yellow]warning:[/] --ctx {ctx:,} is longer than the {rep.model_ctx_limit:,} "
                  "tokens the model was trained for; its output degrades beyond that")


@recipes_app.command("list")
def recipes_list(as_json: bool = typer.Option(False, "--json")) -> None:
    """List shipped recipes. Example: edgesmith recipes list"""
    from edgesmith import recipe

    rows = [recipe.load(n).model for n in recipe.names()]
    if _emit([r.model_dump(mode="json") for r in rows], as_json):
        return
    table = Table("recipe", "target", "description")
    for r in rows:
        table.add_row(r.name, r.target, r.description)
    out.print(table)


@recipes_app.command("show")
def recipes_show(name: str, as_json: bool = typer.Option(False, "--json")) -> None:
    """Print a shipped recipe's YAML. Example: edgesmith recipes show raspberry-pi-5-q4km"""
    from edgesmith import recipe

    r = recipe.load(name)
    if not _emit(r.model.model_dump(mode="json"), as_json):
        sys.stdout.write(r.text)


@recipes_app.command("validate")
def recipes_validate(file: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Validate a recipe file. Example: edgesmith recipes validate my-recipe.yaml"""
    from edgesmith import recipe

    r = recipe.load(str(file))
    if not _emit({"valid": True, "file": str(file), **r.model.model_dump(mode="json")},
                 as_json):
        err.print(f"[green]ok[/] {file}: recipe {r.name} for {r.model.target}, "
                  f"{len(r.steps)} steps")


def _register_subcommands() -> None:
    from edgesmith.bench.cli import register as register_bench
    from edgesmith.device_server.cli import register as register_server
    from edgesmith.export.bundle_cli import register as register_bundle
    from edgesmith.sweep.cli import register as register_sweep
    from edgesmith.web.serve import register as register_web

    register_bench(app)
    register_server(app)
    register_web(app)
    register_bundle(app)
    register_sweep(app)


_register_subcommands()


def _disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk, however the library reports it."""
    import errno

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(seen) or "StorageFull" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(exit, usage error, abort) exception classes of click and of the click that newer
    Typer versions vendor as ``typer._click`` (its BadParameter is not click's)."""
    import click

    exits: list[type] = [click.exceptions.Exit, typer.Exit]
    usage: list[type] = [click.ClickException]
    aborts: list[type] = [click.exceptions.Abort]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None  # type: ignore[assignment]
    if vendored is not None:
        usage.append(vendored.ClickException)
        aborts.extend(getattr(vendored, n) for n in ("Abort",) if hasattr(vendored, n))
    return tuple(exits), tuple(usage), tuple(aborts)


def main() -> None:
    """Entry point: one-line errors (exit 2) unless --debug."""
    from edgesmith import interrupts

    debug = "--debug" in sys.argv
    interrupts.install()
    try:
        # Typer turns Ctrl-C (and typer.Exit) into a returned exit code when not standalone
        rc = app(standalone_mode=False)
    except EdgesmithError as exc:
        if debug:
            raise
        err.print(exc.one_line(), markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted; no partial outputs were left", markup=False)
        sys.exit(130)
    except Exception as exc:  # click usage errors and unexpected failures
        exit_types, usage_types, abort_types = _click_exceptions()
        if isinstance(exc, exit_types):
            sys.exit(getattr(exc, "exit_code", 0))
        if isinstance(exc, usage_types):  # a bad option value: click's message, exit 2
            exc.show()
            sys.exit(2)
        if isinstance(exc, abort_types):
            sys.exit(130)
        if debug:
            raise
        if _disk_full(exc):  # raised by a library writing into the cache (torch, safetensors)
            where = getattr(exc, "filename", None) or "the cache or the output directory"
            err.print(f"error: disk full while writing {where} (fix: free space there, or set "
                      "EDGESMITH_CACHE to a disk with room)", markup=False, soft_wrap=True)
            sys.exit(2)
        err.print(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the "
                  "traceback)", markup=False, soft_wrap=True)
        sys.exit(1)
    if isinstance(rc, int) and rc != 0:
        if rc == 130:
            err.print("interrupted; no partial outputs were left", markup=False)
        sys.exit(rc)


if __name__ == "__main__":
    main()
