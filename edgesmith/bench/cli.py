"""`edgesmith bench` and `edgesmith report` (registered into the main CLI by ``register``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from edgesmith.bench.results import BenchResult
from edgesmith.errors import EdgesmithError

err = Console(stderr=True)


def _summary(r: BenchResult) -> Table:
    t = Table(title=f"{r.artifact.name} on {r.device} ({r.settings.runtime}, "
                    f"{r.settings.threads} threads, {r.settings.repeat} repeats)")
    for col in ("metric", "median", "min", "max", "spread"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for name, stat in r.metrics:
        t.add_row(name, f"{stat.median:.3f}", f"{stat.min:.3f}", f"{stat.max:.3f}",
                  f"{stat.spread:.3f}")
    rf = r.roofline
    t.caption = (f"size {r.artifact.size_bytes / 1e6:.1f} MB · bandwidth "
                 f"{rf.mem_bandwidth_gbs:.1f} GB/s · roofline bound {rf.bound_decode_tps:.1f} "
                 f"tok/s · decode at {100 * rf.fraction:.1f}% of it")
    if r.quality:
        q = r.quality
        t.caption += (f"\nppl {q.ppl:.3f} (+{q.ppl_increase_pct:.2f}%) · KLD {q.kld_mean:.4f} · "
                      f"top-1 {100 * q.top1_agreement:.1f}%")
    return t


def bench(
    artifact_spec: str = typer.Argument(..., metavar="ARTIFACT",
                                        help="The artifact to benchmark (.gguf, or builtin:NAME)."),
    threads: int = typer.Option(None, "--threads", "-t",
                                help="Runtime threads (default: physical cores)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", help="Prompt length (prefill)."),
    gen_tokens: int = typer.Option(128, "--gen-tokens", help="Tokens generated (decode)."),
    repeat: int = typer.Option(5, "--repeat", help="Measured repeats (median and spread)."),
    warmup: int = typer.Option(1, "--warmup", help="Discarded warm-up runs first."),
    device: str = typer.Option(None, "--device", help="Device label (default: hostname)."),
    quality: bool = typer.Option(False, "--quality",
                                 help="Also measure perplexity, KLD and top-1 (needs "
                                      "--reference)."),
    reference: str = typer.Option(None, "--reference",
                                  help="Reference model for --quality: HF dir, .gguf or "
                                       "builtin:NAME."),
    remote: str = typer.Option(None, "--remote",
                               help="Run on a device server (edgesmith serve) at this URL."),
    api_key_file: Path = typer.Option(None, "--api-key-file",
                                      help="File holding the device server's API key."),
    output: Path = typer.Option(None, "--output", "-o", help="Results JSON to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing -o."),
    as_json: bool = typer.Option(False, "--json", help="Print the results JSON on stdout."),
    runtime: str = typer.Option(None, "--runtime",
                                help="browser: an ONNX model folder in onnxruntime-web inside "
                                     "headless chromium; litert: a .tflite (or the Android "
                                     "folder) in LiteRT's interpreter on this host's CPU "
                                     "(default: from the artifact's format)."),
    browser_backend: str = typer.Option("wasm", "--browser-backend",
                                        help="With --runtime browser: webgpu or wasm."),
) -> None:
    """Benchmark an artifact: load time, time to first token, prefill and decode tokens/s,
    peak memory, size and the roofline bound, as median and spread over repeats.

    Writes one results JSON per run (atomically; Ctrl-C leaves no file).

    Example: edgesmith bench out/model.Q4_K_M.gguf --threads 4 --repeat 5 -o results/pi5.json

    Example: edgesmith bench out/model.Q4_K_M.gguf --remote http://pi.local:8080
    --api-key-file key -o results/pi5.json

    Example: edgesmith bench out/web/ --runtime browser --browser-backend wasm
    -o results/chromium-wasm.json
    """
    import psutil

    from edgesmith.bench import results, speed
    from edgesmith.context import make_progress
    from edgesmith.fsutil import check_writable

    if output is not None:
        check_writable(output, force)
    artifact = Path(artifact_spec)
    if artifact_spec.startswith("builtin:"):  # a packaged model's file, by name
        from edgesmith.models import resolve

        artifact = Path(resolve(artifact_spec).path)
    if artifact.suffix == ".mlpackage" or (artifact / "model.mlpackage").is_dir():
        from edgesmith.bench.runners.coreml import NO_SPEED

        raise NO_SPEED  # Core ML's predict needs macOS: no figures are made up here
    if quality and not reference:
        raise EdgesmithError("--quality needs a reference model",
                             "add --reference MODEL (the uncompressed model, e.g. builtin:NAME)")
    if remote and quality:
        raise EdgesmithError("--quality is not available with --remote",
                             "measure quality locally: quality does not depend on the device")
    if remote and not api_key_file:
        raise EdgesmithError("--remote needs --api-key-file", "pass the server's key file")
    if runtime is None and (artifact.suffix in (".tflite", ".litertlm")
                            or (artifact.is_dir() and (artifact / "model.tflite").is_file())):
        runtime = "litert"  # a LiteRT artifact runs in LiteRT's interpreter
    if runtime is not None and runtime not in ("browser", "litert"):
        raise EdgesmithError(f"unknown --runtime {runtime!r}", "use --runtime browser or litert")
    if runtime == "litert" and remote:
        raise EdgesmithError("--runtime litert runs LiteRT's interpreter on this host, without "
                             "--remote", "drop --remote (a phone runs the .litertlm in its app)")
    if runtime == "browser" and (remote or quality):
        raise EdgesmithError("--runtime browser runs in a local chromium, without --remote or "
                             "--quality", "measure quality with the onnxruntime runner")
    with make_progress() as progress:
        if runtime == "browser":
            from edgesmith.bench.runners.browser import bench_browser

            n = threads or psutil.cpu_count(logical=False) or 1
            spec = speed.SpeedSpec(threads=n, prompt_tokens=prompt_tokens,
                                   gen_tokens=gen_tokens, repeat=repeat, warmup=warmup)
            result = bench_browser(artifact, spec, browser_backend, device=device,
                                   progress=progress, command=sys.argv)
        elif runtime == "litert":  # host CPU figures, labelled so
            from edgesmith.bench.runners import litert as litert_runner

            n = threads or psutil.cpu_count(logical=False) or 1
            spec = speed.SpeedSpec(threads=n, prompt_tokens=prompt_tokens,
                                   gen_tokens=gen_tokens, repeat=repeat, warmup=warmup)
            result = litert_runner.bench(artifact, spec, device=device, progress=progress,
                                         command=sys.argv,
                                         reference=reference if quality else None)
        elif remote:
            from edgesmith.bench.remote import bench_remote
            from edgesmith.device_server.cli import read_api_key

            task = progress.add_task(f"bench on {remote}", total=None)
            result = bench_remote(remote, read_api_key(api_key_file), artifact,
                                  prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                                  repeat=repeat, warmup=warmup, threads=threads, device=device,
                                  command=sys.argv)
            progress.update(task, total=1, completed=1)
        else:
            n = threads or psutil.cpu_count(logical=False) or 1
            spec = speed.SpeedSpec(threads=n, prompt_tokens=prompt_tokens,
                                   gen_tokens=gen_tokens, repeat=repeat, warmup=warmup)
            result = speed.bench_local(artifact, spec, device=device,
                                       reference=reference if quality else None,
                                       progress=progress, command=sys.argv)
    if output is not None:
        results.write(result, output, force=force)
        err.print(f"wrote {output}", markup=False, highlight=False)
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    else:
        err.print(_summary(result))


def report(
    files: list[Path] = typer.Argument(..., help="Results JSON files written by bench."),
    output: Path = typer.Option(None, "--output", "-o",
                                help="Report file to write (default: stdout)."),
    fmt: str = typer.Option(None, "--format", "-f",
                            help="html or md (default: from -o's suffix, else html)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing -o."),
) -> None:
    """Compare results: one self-contained HTML page (table, size/quality/speed charts, Pareto
    view; no network needed to view it) or Markdown for a pull request.

    Example: edgesmith report results/*.json -o report.html

    Example: edgesmith report results/*.json --format md > report.md
    """
    from edgesmith.bench import report as rep
    from edgesmith.bench import results
    from edgesmith.fsutil import check_writable, write_text_atomic

    kind = (fmt or ("md" if output is not None and output.suffix == ".md" else "html")).lower()
    if kind not in ("html", "md"):
        raise EdgesmithError(f"unknown report format '{fmt}'", "use --format html or md")
    if output is not None:
        check_writable(output, force)
    loaded = [results.read(f) for f in files]
    text = rep.render_html(loaded) if kind == "html" else rep.render_markdown(loaded)
    if output is None:
        sys.stdout.write(text)
    else:
        write_text_atomic(output, text, force=force)
        err.print(f"wrote {output} ({len(loaded)} results)", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the `bench` and `report` commands to ``app``."""
    app.command()(bench)
    app.command()(report)
