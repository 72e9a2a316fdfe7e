"""The speed harness: time a Session over repeats and assemble a results file.

One run = open the artifact (timed load) and generate ``gen_tokens`` greedily after a
``prompt_tokens`` prompt taken from the bundled held-out text. Warm-up runs go first and are
discarded (they also warm the page cache, as llama-bench's warm-up does). Each metric is
reported as median, min, max and spread (max/min) over the measured repeats. The device
server runs the same ``measure`` on its already-loaded model (``reload_each_repeat=False``).
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

from edgesmith.bench import results
from edgesmith.bench.results import ArtifactInfo, BenchResult, Metrics, Quality, Roofline, Stat
from edgesmith.bench.runners.base import GenerationResult, Session
from edgesmith.errors import EdgesmithError, ModelError
from edgesmith.fsutil import sha256_file
from edgesmith.interrupts import check as check_interrupt

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


@dataclass(frozen=True)
class SpeedSpec:
    threads: int
    prompt_tokens: int = 128
    gen_tokens: int = 128
    repeat: int = 5
    warmup: int = 1

    def __post_init__(self) -> None:
        for name in ("threads", "prompt_tokens", "gen_tokens", "repeat"):
            if getattr(self, name) < 1:
                raise EdgesmithError(f"--{name.replace('_', '-')} must be at least 1",
                                     f"pass a positive --{name.replace('_', '-')}")
        if self.warmup < 0:
            raise EdgesmithError("--warmup must be 0 or more", "pass --warmup 0 or more")

    @property
    def n_ctx(self) -> int:
        return self.prompt_tokens + self.gen_tokens


def reset_peak_rss() -> None:
    """Reset the kernel's resident high-water mark (Linux), so a peak is per repeat."""
    if _CLEAR_REFS.exists():
        _CLEAR_REFS.write_text("5")


def peak_rss_mb() -> float:
    """Peak resident memory of this process since the last reset (Linux VmHWM), in MB.

    Elsewhere the current resident size is reported instead (no portable peak reset).
    """
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6
    return psutil.Process().memory_info().rss / 1e6


def prompt_ids(session: Session, n: int) -> list[int]:
    """``n`` tokens of the held-out text, BOS first where the model uses one."""
    from edgesmith.bench.quality import corpus

    ids = session.tokenize(corpus("heldout"), add_special=True)
    while len(ids) < n:
        ids = ids + ids[1:]
    return ids[:n]


def artifact_info(path: Path) -> ArtifactInfo:
    """Size, hash, weight type and the bytes of weights read per decoded token."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".onnx":
        from edgesmith.bench.runners.browser import onnx_artifact_info

        return onnx_artifact_info(path)
    size = path.stat().st_size
    if path.suffix != ".gguf":
        raise ModelError(f"cannot describe {path}: not a GGUF file or an ONNX model folder",
                         "pass a .gguf file or a folder written by `export --format onnx`")
    from gguf import LlamaFileType

    from edgesmith.gguf_file import GGUFFormatError, read_header

    try:
        reader = read_header(path)
    except (GGUFFormatError, OSError) as exc:
        raise ModelError(f"{path} is not a readable GGUF file: {exc}",
                         "pass a complete .gguf model") from exc
    nbytes = {t.name: t.n_bytes for t in reader.tensors}
    file_type = reader.field("general.file_type")
    try:
        quant = LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") \
            if file_type is not None else "unknown"
    except ValueError:
        quant = "unknown"
    per_token = sum(nbytes.values())
    if "output.weight" in nbytes and "token_embd.weight" in nbytes:
        per_token -= nbytes["token_embd.weight"]  # untied: only one embedding row is read
    return ArtifactInfo(name=path.name, path=str(path), format="gguf", size_bytes=size,
                        sha256=sha256_file(path), quant=quant,
                        n_params=sum(t.n_elements for t in reader.tensors),
                        weight_bytes_per_token=per_token)


def _without_gc(fn: Callable[..., GenerationResult], *args: Any) -> GenerationResult:
    """Run ``fn`` with Python's cyclic garbage collector paused: a collection landing inside
    the timed token loop would be timed as the runtime's (llama-bench has no such pause)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        return fn(*args)
    finally:
        if enabled:
            gc.enable()


def measure(open_session: Callable[[], Session], spec: SpeedSpec, *, reload_each_repeat: bool,
            progress: Any = None, label: str = "bench") -> Metrics:
    """Warm up, then time ``spec.repeat`` runs; each metric over the measured runs."""
    runs: list[tuple[float, GenerationResult, float]] = []
    task = progress.add_task(label, total=spec.warmup + spec.repeat) if progress else None
    session: Session | None = None
    prompt: list[int] = []
    try:
        for i in range(spec.warmup + spec.repeat):
            reset_peak_rss()
            if session is None or reload_each_repeat:
                if session is not None:
                    session.close()
                session = open_session()
            prompt = prompt or prompt_ids(session, spec.prompt_tokens)
            gen = _without_gc(session.generate, prompt, spec.gen_tokens)
            check_interrupt()
            if i >= spec.warmup:
                runs.append((session.load_s, gen, peak_rss_mb()))
            if progress is not None:
                progress.advance(task)
    finally:
        if session is not None:
            session.close()
    return Metrics(
        load_s=Stat.of([r[0] for r in runs]),
        ttft_s=Stat.of([r[1].ttft_s for r in runs]),
        prefill_tps=Stat.of([r[1].prefill_tps for r in runs]),
        decode_tps=Stat.of([r[1].decode_tps for r in runs]),
        peak_rss_mb=Stat.of([r[2] for r in runs]),
    )


def roofline(metrics: Metrics, bandwidth_gbs: float, weight_bytes_per_token: int) -> Roofline:
    bound = bandwidth_gbs * 1e9 / weight_bytes_per_token
    return Roofline(mem_bandwidth_gbs=bandwidth_gbs, weight_bytes_per_token=weight_bytes_per_token,
                    bound_decode_tps=bound, fraction=metrics.decode_tps.median / bound)


def assemble(*, info: ArtifactInfo, spec: SpeedSpec, metrics: Metrics, env: Any, runtime: str,
             reload_each_repeat: bool, device: str | None, source: str,
             command: list[str] | None = None, quality: Quality | None = None) -> BenchResult:
    settings = results.Settings(runtime=runtime, threads=spec.threads,
                                prompt_tokens=spec.prompt_tokens, gen_tokens=spec.gen_tokens,
                                repeat=spec.repeat, warmup=spec.warmup, n_ctx=spec.n_ctx,
                                reload_each_repeat=reload_each_repeat)
    return BenchResult(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=command if command is not None else sys.argv,
        device=device or env.hostname, source=source, environment=env, artifact=info,
        settings=settings, metrics=metrics,
        roofline=roofline(metrics, env.mem_bandwidth_gbs, info.weight_bytes_per_token),
        quality=quality)


def check_artifact(path: Path) -> Any:
    """The runner for ``path``, or a ModelError for a missing file or a non-model."""
    from edgesmith.bench.runners import runner_for
    from edgesmith.models import resolve

    path = Path(path)
    if not path.exists():
        raise ModelError(f"artifact {path} does not exist",
                         "pass the path of a .gguf file or an ONNX model folder")
    if path.is_file():
        resolve(str(path))  # checks the magic bytes and the header
    return runner_for(path)


def quality_of(path: Path, reference_spec: str, threads: int, progress: Any = None) -> Quality:
    """Perplexity, KLD and top-1 of ``path`` against the reference model, in its runtime."""
    from edgesmith.bench import quality
    from edgesmith.bench.runners import runner_for
    from edgesmith.fsutil import cache_root
    from edgesmith.models import as_hf_dir, resolve

    ref_model = resolve(reference_spec)
    hf_dir = as_hf_dir(ref_model, progress)
    cache = cache_root() / "runs" / f"{ref_model.name}-{ref_model.fingerprint()}"
    spec = quality.EvalSpec()
    ref = quality.reference(hf_dir, spec, cache, progress, threads)
    session = runner_for(path).open(path, threads=threads, n_ctx=spec.ctx, logits_all=True)
    try:
        q = quality.evaluate(session, ref, progress, label=Path(path).name)
    finally:
        session.close()
    return Quality(reference=reference_spec, **q.as_dict())


def bench_local(path: Path, spec: SpeedSpec, *, device: str | None = None,
                reference: str | None = None, progress: Any = None,
                command: list[str] | None = None) -> BenchResult:
    """Benchmark ``path`` on this machine (and its quality when ``reference`` is given)."""
    from edgesmith.bench.env import environment

    path = Path(path)
    runner = check_artifact(path)
    info = artifact_info(path)
    task = progress.add_task("memory bandwidth", total=None) if progress else None
    env = environment(spec.threads)
    if progress is not None:
        progress.update(task, total=1, completed=1)

    def open_session() -> Session:
        return runner.open(path, threads=spec.threads, n_ctx=spec.n_ctx)

    metrics = measure(open_session, spec, reload_each_repeat=True, progress=progress,
                      label=f"bench {path.name}")
    q = quality_of(path, reference, spec.threads, progress) if reference else None
    return assemble(info=info, spec=spec, metrics=metrics, env=env, runtime=runner.name,
                    reload_each_repeat=True, device=device, source="local", command=command,
                    quality=q)
