"""Run a recipe: resolve, torch passes, export, format passes, verify, gates, manifest.

The pipeline knows no format: the recipe's exporter (export/) says what it writes (a file,
or a folder such as the transformers.js layout) and under which names, each artifact is
verified by the runner of its format (bench/runners: llama.cpp for GGUF, onnxruntime for
ONNX) with the one evaluator, and published the same way.

Everything expensive is cached per input model (the dequantized HF directory of a GGUF input,
the F16 GGUF, the reference log-probabilities, the importance matrix), and every file is
written atomically, so a killed run resumes where it stopped; stale temp files of killed runs
are swept from the cache at start. Outputs are checked before any work starts: an existing
file is never overwritten without --force. The result is published into -o by
``fsutil.Publication`` (manifest written last, listing every file's sha256), so it appears all
at once, and a run killed while publishing is finished by the same command without --force.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith import compress_report, doctor, manifest, models
from edgesmith.bench import quality
from edgesmith.bench.runners import for_format
from edgesmith.compress import PASSES, imatrix
from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ModelError, QualityGateError
from edgesmith.export import EXPORTERS, llamacpp_src
from edgesmith.fsutil import (
    Publication,
    atomic_dir,
    cache_root,
    check_result_writable,
    sha256_file,
    sha256_text,
    sweep_cache,
    write_json_atomic,
    write_text_atomic,
)
from edgesmith.recipe import Recipe, Step


@dataclass
class Options:
    out_dir: Path
    force: bool = False
    threads: int | None = None
    allow_pickle: bool = False
    command: list[str] | None = None


@dataclass
class Timings:
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 3)


def _final_type(steps: list[Step]) -> str:
    """The type the recipe ends with (the last format pass's, else the export's)."""
    qtype = None
    for s in steps:
        if s.kind == "export":
            qtype = EXPORTERS[s.name](s.config).artifact_type()
        elif s.kind == "format":
            qtype = PASSES[s.name](s.config).artifact_type()
    assert qtype is not None
    return qtype


def exporter_of(recipe: Recipe) -> Any:
    """The recipe's exporter (one export step per recipe)."""
    steps = [s for s in recipe.steps if s.kind == "export"]
    return EXPORTERS[steps[0].name](steps[0].config)


def published_names(ref: models.ModelRef, recipe: Recipe) -> list[str]:
    """What the artifact puts into -o, the main file first (a folder artifact is flat)."""
    return exporter_of(recipe).published_names(ref.name, _final_type(recipe.steps))


def _claimed(names: list[str]) -> list[str]:
    """The top-level names an artifact takes in -o (a folder's main file is inside one)."""
    return [n for n in names if "/" not in n]


def output_paths(ref: models.ModelRef, recipe: Recipe, out_dir: Path) -> dict[str, Path]:
    return {
        "artifact": out_dir / published_names(ref, recipe)[0],
        "manifest": out_dir / "manifest.json",
        "report": out_dir / "report.md",
    }


def input_hash(ref: models.ModelRef, cache: Path, progress: Any = None) -> str:
    """sha256 of the input model's weights (cached by the cheap fingerprint)."""
    marker = cache / "input.sha256"
    if marker.exists():
        return marker.read_text().strip()
    files = [ref.path] if ref.kind == "gguf" else sorted(ref.path.glob("*.safetensors")) or \
        sorted(p for p in ref.path.iterdir() if p.suffix in models.PICKLE_SUFFIXES)
    digest = sha256_file(files[0], progress=progress) if len(files) == 1 else \
        "multi:" + ",".join(f"{f.name}={sha256_file(f, progress=progress)}" for f in files)
    write_text_atomic(marker, digest)
    return digest


def _identity(path: Path) -> str:
    """Name, size and mtime of a file, or of a folder's files (a cache key)."""
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    stats = [f.stat() for f in files]
    return (f"{path.name}:{sum(st.st_size for st in stats)}:"
            f"{max((st.st_mtime_ns for st in stats), default=0)}")


def artifact_bytes(path: Path) -> int:
    """Size of an artifact: the file, or every file of a folder (what a device downloads)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _quality_cached(art: Artifact, ref: quality.Reference, cache: Path, ctx: RunContext,
                    label: str) -> quality.QualityResult:
    """Quality of an artifact in its own runtime (the runner of its format); cached by the
    artifact's identity and eval spec."""
    key = f"{art.format}:{_identity(art.path)}:{ref.spec}"
    qfile = cache / "quality.json"
    known = json.loads(qfile.read_text()) if qfile.exists() else {}
    if key in known:
        return quality.QualityResult(**known[key])
    sess = for_format(art.format).open(art.path, threads=ctx.threads, n_ctx=ref.spec.ctx,
                                       logits_all=True)
    try:
        result = quality.evaluate(sess, ref, ctx.progress, label)
    finally:
        sess.close()
    known[key] = result.as_dict()
    write_json_atomic(qfile, known)
    return result


def check_gates(recipe: Recipe, q: quality.QualityResult, size_bytes: int) -> list[str]:
    g = recipe.model.gates
    fails = []
    if g.max_ppl_increase_pct is not None and q.ppl_increase_pct > g.max_ppl_increase_pct:
        fails.append(f"perplexity +{q.ppl_increase_pct:.2f}% > max {g.max_ppl_increase_pct}%")
    if g.max_kld is not None and q.kld_mean > g.max_kld:
        fails.append(f"mean KLD {q.kld_mean:.4f} > max {g.max_kld}")
    if g.min_top1 is not None and q.top1_agreement < g.min_top1:
        fails.append(f"top-1 agreement {q.top1_agreement:.3f} < min {g.min_top1}")
    if g.max_size_mb is not None and size_bytes / 1e6 > g.max_size_mb:
        fails.append(f"size {size_bytes / 1e6:.1f} MB > max {g.max_size_mb} MB")
    return fails


@dataclass
class TorchResult:
    """What the torch-side passes hand on: the directory the exporter reads (a plain HF model,
    or a GPTQ checkpoint), the plain HF directory that transformers loads (the imatrix's), and
    the passes' reports for the manifest."""

    export_dir: Path
    plain_dir: Path
    reports: list[dict[str, Any]] = field(default_factory=list)


def _torch_passes(hf_dir: Path, steps: list[Step], ctx: RunContext, cache: Path,
                  calib: imatrix.CalibrationConfig) -> TorchResult:
    """Run torch-side passes on the HF model; the result is saved (cached, keyed by the steps
    and the calibration) as safetensors, or as a GPTQ checkpoint after a quantizing pass."""
    from edgesmith.compress import gptq_format, qweights
    from edgesmith.export.gguf import plain_dir

    todo = [s for s in steps if s.kind == "torch"]
    if not todo:
        return TorchResult(hf_dir, hf_dir)
    calib_key = f"{calib.samples}:{calib.seq_len}:{sha256_text(calib.text())}"
    key = sha256_text("|".join([*(f"{s.name}:{s.config.model_dump_json()}" for s in todo),
                                calib_key]))[:16]
    dest = cache / f"hf-{key}"
    reports_file = cache / f"hf-{key}.passes.json"
    if not ((dest / "config.json").exists() and reports_file.exists()):
        ctx.extras["calibration"] = calib
        ctx.extras["pass_reports"] = []
        first = PASSES[todo[0].name](todo[0].config)
        if len(todo) == 1 and hasattr(first, "run_dir") and any(hf_dir.glob("*.safetensors")):
            first.run_dir(hf_dir, dest, ctx)  # streamed: one decoder layer in memory
        else:
            model, tok = models.load_hf(hf_dir)
            ctx.extras["tokenizer"] = tok
            for s in todo:
                model = PASSES[s.name](s.config).run(model, ctx)
            if qweights.attached(model):
                gptq_format.save_model(model, dest, tokenizer=tok)
            else:
                with atomic_dir(dest) as tmp:  # a killed save must not look like a cached model
                    model.save_pretrained(tmp, safe_serialization=True)
                    tok.save_pretrained(tmp)
        write_json_atomic(reports_file, ctx.extras.pop("pass_reports", []))
    reports = json.loads(reports_file.read_text())
    if gptq_format.is_gptq_dir(dest):  # transformers and the converter read the plain model
        return TorchResult(dest, plain_dir(dest), reports)
    return TorchResult(dest, dest, reports)


def _imatrix(hf_dir: Path, recipe: Recipe, cache: Path, ctx: RunContext) -> imatrix.IMatrix:
    calib = recipe.model.calibration
    path = cache / f"imatrix-{hf_dir.name}-{imatrix.cache_key(calib)}.npz"
    if path.exists():
        return imatrix.load(path)
    task = ctx.task("load the model for calibration (transformers, fp32)", total=None)
    model, tok = models.load_hf(hf_dir)
    ctx.progress.update(task, total=1, completed=1)
    imx = imatrix.compute(model, tok, calib, ctx.progress, hf_dir=hf_dir)
    imatrix.save(imx, path)
    return imx


def _converted_name(ref: models.ModelRef, hf_dir: Path, outtype: str, version: str) -> str:
    """Cache name of a converted GGUF: input, (passed) HF dir, type and the converter's version."""
    return f"{ref.name}.{hf_dir.name}.{outtype}.llama-cpp-{version}.gguf"


def _export_cache(ref: models.ModelRef, hf_dir: Path, exporter: Any, cache: Path) -> Path:
    """Cache path of an export: input, (passed) HF dir, type and the exporter's version."""
    kind = exporter.artifact_type()
    if exporter.format == "gguf":
        return cache / _converted_name(ref, hf_dir, kind, llamacpp_src.installed_version())
    return exporter.cache_path(cache, hf_dir, kind)


def plain_gguf(spec: str, qtype: str, progress: Any) -> Path:
    """``spec`` converted to F16 and quantized to ``qtype`` without an importance matrix
    (what llama.cpp's own tools make by default), cached; shares the F16 with ``compress``."""
    from edgesmith.compress.gguf_quantize import quantize

    ref = models.resolve(spec)
    cache = cache_root() / "runs" / ref.fingerprint()
    dest = cache / f"{ref.name}.{qtype}.plain.gguf"
    if dest.exists():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out_dir=cache, cache_dir=cache, progress=progress)
    hf_dir = models.as_hf_dir(ref, progress)
    f16 = cache / _converted_name(ref, hf_dir, "F16", llamacpp_src.installed_version())
    if not f16.exists():
        exporter = EXPORTERS["gguf"]
        exporter(exporter.Config(outtype="f16")).export(hf_dir, ctx, f16)
    quantize(f16, dest, qtype, None, ctx)
    return dest


def _format_pass_cached(step: Step, src: Artifact, ctx: RunContext, recipe: Recipe,
                        version: str) -> Artifact:
    """Run a format-side pass into the cache (its output and metadata kept for a resume)."""
    uses_imatrix = bool(getattr(step.config, "imatrix", False))
    key = sha256_text("|".join([src.path.name, step.name, step.config.model_dump_json(),
                                imatrix.cache_key(recipe.model.calibration) if uses_imatrix
                                else "", version]))[:16]
    fpass = PASSES[step.name](step.config)
    dest = ctx.cache_dir / fpass.cache_name(key)
    meta_file = dest.with_name(dest.name + ".json")
    if dest.exists() and meta_file.exists():
        return Artifact(dest, src.format, {**json.loads(meta_file.read_text()), "cached": True})
    ctx.extras["dest"] = dest
    out = fpass.run(src, ctx)
    write_json_atomic(meta_file, out.meta)
    return out


def _writer(export: Artifact, final: Artifact) -> Artifact:
    """The artifact that wrote a torch-side pass's codes: the export (GGUF blocks) or the
    format pass (ONNX MatMulNBits)."""
    return export if "written" in export.meta else final


def _exact_tensors(export: Artifact, final: Artifact) -> dict[str, Any]:
    """The manifest's record of the tensors a torch-side pass wrote as exact blocks (copied by
    the quantizer) and of those it took but the format re-quantized."""
    src = _writer(export, final)
    if not src.meta.get("written") and not src.meta.get("not_written"):
        return {}
    return {"exact_tensors": src.meta.get("written", []),
            "copied_tensors": final.meta.get("copied", src.meta.get("written", [])
                                             if src is final else []),
            "requantized_tensors": src.meta.get("not_written", [])}


def _warnings(export: Artifact, final: Artifact) -> list[str]:
    return [f"{n.get('tensor') or n['hf']} was quantized by the pass but re-quantized for the "
            f"format: {n['reason']}" for n in _writer(export, final).meta.get("not_written", [])]


def _sparsity_warnings(recipe: Recipe, artifact: Artifact, size: int) -> list[str]:
    """A prune step that only zeroes weights, before a format that stores every zero (Core ML
    stores them as a mask in coreml_compress's sparse modes)."""
    from edgesmith.compress.coreml_compress import SPARSE

    dense = artifact.format in ("gguf", "onnx", "litert") or (
        artifact.format == "coreml" and artifact.meta.get("type") not in SPARSE)
    if not dense or not any(s.name == "prune" and s.config.method != "structured"
                            for s in recipe.steps):
        return []
    from edgesmith.compress.prune import SPARSITY_WARNING

    return [f"{SPARSITY_WARNING} (this {artifact.format} artifact: {size / 1e6:.1f} MB)"]


def _publish(pub: Publication, src: Path, names: list[str], progress: Any) -> str:
    """Publish an artifact: a file as ``names[0]``, a folder's entries flat into -o; returns
    the sha256 of the main file."""
    if src.is_file():
        return pub.copy(src, names[0], progress)
    for child in sorted(src.iterdir()):
        if child.name not in names:
            raise ModelError(f"the exporter wrote {child.name}, which it does not declare",
                             "this is a bug in edgesmith: please report it")
        pub.copy(child, child.name, progress)
    return next(f["sha256"] for f in pub.files if f["path"] == names[0])


def compress(spec: str, recipe: Recipe, opts: Options, progress: Any) -> dict[str, Any]:
    """Run ``recipe`` on model ``spec``; returns the manifest (also written to out_dir)."""
    t = Timings()
    ref = models.resolve(spec, allow_pickle=opts.allow_pickle)
    models.check_load_memory(ref)  # before hashing a model too big to load at all
    if not models.is_causal_lm(ref):
        raise ModelError(f"{spec} ({ref.architecture()}) is not a causal language model, so "
                         "compress cannot check its quality", "use `edgesmith export` for it")
    # the doctor's header-only checks: an architecture, tokenizer, layer width or RAM fit that
    # cannot work stops here, in seconds, instead of minutes into the run
    doctor.preflight(spec, recipe, ref, ctx=512)  # fit: refuse only what cannot run at all
    outs = output_paths(ref, recipe, opts.out_dir)
    names = published_names(ref, recipe)
    exporter = exporter_of(recipe)
    # an unfinished result in -o (a killed run's: see fsutil.Publication) needs no --force
    check_result_writable(opts.out_dir, [*_claimed(names), outs["manifest"].name,
                                         outs["report"].name], opts.force)
    exporter.version()  # fail early, naming the extra, if the exporter's tools are missing
    sweep_cache()  # temp files of killed runs (their owner is gone), never a live run's
    cache = cache_root() / "runs" / ref.fingerprint()
    cache.mkdir(parents=True, exist_ok=True)
    ctx = RunContext(out_dir=opts.out_dir, cache_dir=cache, progress=progress, force=opts.force)
    if opts.threads:
        ctx.threads = opts.threads
    with t.stage("load"):
        source_hf = models.as_hf_dir(ref, progress)
        sha = input_hash(ref, cache, progress)
    with t.stage("torch_passes"):
        passed = _torch_passes(source_hf, recipe.steps, ctx, cache, recipe.model.calibration)
        hf_dir = passed.export_dir
    with t.stage("reference"):
        spec_eval = quality.EvalSpec(recipe.model.eval.ctx, recipe.model.eval.windows)
        reference = quality.reference(source_hf, spec_eval, cache, progress, ctx.threads)
    if any(s.name == "gguf_quantize" and s.config.imatrix for s in recipe.steps):
        with t.stage("imatrix"):
            ctx.extras["imatrix"] = _imatrix(passed.plain_dir, recipe, cache, ctx)
    artifact: Artifact | None = None
    baseline: Artifact | None = None
    version = exporter.version()
    # Every step writes into the cache, keyed by what made it; the artifact is copied into
    # out/ only after it was verified, so a run killed at any point leaves out/ as it was and
    # resumes from the last finished step.
    for step in recipe.steps:
        if step.kind == "export":
            exporter = EXPORTERS[step.name](step.config)
            cached = _export_cache(ref, hf_dir, exporter, cache)
            meta_file = cached.with_name(cached.name + ".json")
            with t.stage("convert"):
                # an export that wrote a pass's blocks is a cache hit only with its metadata
                if cached.exists() and (meta_file.exists() or hf_dir == passed.plain_dir):
                    meta = json.loads(meta_file.read_text()) if meta_file.exists() else \
                        {"type": exporter.artifact_type()}
                    artifact = Artifact(cached, exporter.format, {**meta, "cached": True})
                else:
                    artifact = exporter.export(hf_dir, ctx, cached)
                    write_json_atomic(meta_file, artifact.meta)
            baseline = artifact
        elif step.kind == "format":
            assert artifact is not None
            if getattr(step.config, "imatrix", False):  # names must be llama.cpp's tensors
                imatrix.check_against_gguf(ctx.extras["imatrix"], artifact.path)
            with t.stage("quantize"):
                artifact = _format_pass_cached(step, artifact, ctx, recipe, version)
    assert artifact is not None and baseline is not None
    with t.stage("verify"):
        q_base = _quality_cached(baseline, reference, cache, ctx,
                                 f"{baseline.meta.get('type')} baseline")
        q = _quality_cached(artifact, reference, cache, ctx, names[0])
    size = artifact_bytes(artifact.path)
    failures = check_gates(recipe, q, size)
    man = manifest.new(opts.command)
    man.update({
        "input": {"spec": spec, "kind": ref.kind, "path": str(ref.path), "sha256": sha,
                  "architecture": ref.architecture()},
        "recipe": {"name": recipe.name, "source": str(recipe.source or "<inline>"),
                   "as_run": recipe.model.model_dump(mode="json"), "text": recipe.text},
        "target": recipe.model.target,
        "reference": {"runtime": "torch fp32", "ppl": reference.ppl,
                      "eval": {"ctx": spec_eval.ctx, "windows": spec_eval.windows,
                               "tokens_scored": q.tokens_scored, "corpus": "builtin:heldout"}},
        "baseline": {"type": baseline.meta.get("type"), "format": baseline.format,
                     "size_bytes": artifact_bytes(baseline.path),
                     "quality": q_base.as_dict(),
                     "convert_peak_rss_bytes": baseline.meta.get("peak_rss_bytes"),
                     "convert_peak_anon_bytes": baseline.meta.get("peak_anon_bytes")},
        "artifacts": [{
            "path": names[0], "format": artifact.format, "type": artifact.meta.get("type"),
            "runtime": for_format(artifact.format).name,
            # how the quality figures were obtained: in the runtime itself, unless the runner
            # says otherwise (Core ML's predict needs macOS: estimated on Linux)
            "verified": getattr(for_format(artifact.format), "verified", "in its runtime"),
            # the exporter's and passes' own checks (e.g. a chat answer in LiteRT-LM)
            "checks": artifact.meta.get("checks", []),
            "size_bytes": size,
            "sha256": None,  # of the bytes published, below
            "imatrix": artifact.meta.get("imatrix", False),
            "quality": q.as_dict(),
            "tensors": artifact.meta.get("tensors", []),
            "fallbacks": artifact.meta.get("fallbacks", []),
            **_exact_tensors(baseline, artifact),
        }],
        "passes": passed.reports,
        "warnings": _warnings(baseline, artifact) + _sparsity_warnings(recipe, artifact, size),
        "gates": {"passed": not failures, "failures": failures,
                  "limits": recipe.model.gates.model_dump()},
        "timings_s": t.seconds,
    })
    # The result appears all at once: the journal and the old manifest's removal first, then
    # the artifact and the report, the manifest (listing every file's sha256) last.
    with Publication(opts.out_dir, [*_claimed(names), outs["report"].name], opts.force,
                     manifest=outs["manifest"].name) as pub:
        with t.stage("publish"):  # t.seconds is the manifest's timings_s
            man["artifacts"][0]["sha256"] = _publish(pub, artifact.path, names, progress)
        pub.write_text(outs["report"].name, compress_report.render(man))
        pub.commit(man)
    if failures:
        exc = QualityGateError(f"{outs['artifact'].name} missed the quality gate of recipe "
                               f"{recipe.name}: {'; '.join(failures)}",
                               "try a higher-precision recipe (GGUF: q5km or q8; ONNX: an fp16 "
                               "embedding and head); details in "
                               f"{outs['report']}")
        exc.manifest = man
        raise exc
    return man
