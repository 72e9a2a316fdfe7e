"""Exporter: a causal LM with an external KV cache to LiteRT (``.tflite`` + ``.litertlm``), for
Android (LiteRT-LM, MediaPipe's successor runtime).

Route: ``litert_torch.generative.export_hf`` (litert-torch 0.10, next to torch 2.13), its
generic HF path (any transformers causal LM whose attention takes an attention backend; not
the per-family hand-written examples). It traces transformers' own modelling code with its
attention swapped for LiteRT's transposed-cache attention and writes one ``.tflite`` with
``prefill_P`` and ``decode`` signatures over an external KV cache of ``cache_length`` positions
(see bench/runners/litert.py for the signatures and how the evaluator drives them).

The fp32 export runs in a child process (``python -m edgesmith.export.litert``): export_hf
prints to stdout, imports TensorFlow, and its peak memory is then measured exactly
(``os.wait4``'s rusage of that child). It is cached by the pipeline (``cache_path``) and is the
baseline; quantized variants are derived from it in seconds (compress/litert_quantize.py), so
a model is exported once.

The folder: ``model.tflite``, ``model.litertlm`` (the model, the HF tokenizer and the LLM
metadata LiteRT-LM needs: export/litertlm.py, with its start-token and chat-template fixes),
``tokenizer.json``, ``tokenizer_config.json`` (and the tokenizer's other files), ``config.json``,
``generation_config.json``. Every ``.litertlm`` is checked in LiteRT-LM's own runtime (a greedy
chat answer against the same .tflite's in LiteRT's interpreter); the result is
``meta["checks"]``, copied into the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgesmith.context import Artifact, RunContext
from edgesmith.errors import DependencyError, ModelError, ToolError
from edgesmith.fsutil import atomic_dir

EXTRA_HINT = "pip install 'edgesmith[litert]'"
# model.task: MediaPipe LLM Inference's bundle, only for a SentencePiece tokenizer
MODEL_FILES = ("model.tflite", "model.litertlm", "model.task")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "config.json",
                   "generation_config.json")
# ai_edge_quantizer recipes offered (recipe option `dtype`, or litert_quantize's `recipe`),
# measured on SmolLM2-135M in LiteRT's interpreter against PyTorch fp32 (KLD, top-1, host
# decode tok/s): see benchmarks/mobile_vs_anchors.py
Quantization = Literal["fp32", "dynamic_wi8c_hr_afp32", "dynamic_wi8_afp32",
                       "weight_only_wi8_afp32", "dynamic_wi4b32_afp32"]


class LiteRTExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # fp32: the export itself (the baseline); a recipe name: the fp32 export quantized with it
    dtype: Quantization = "fp32"
    # the prefill signature's length (prefill_P); prompts are prefilled in chunks of it
    prefill_length: int = Field(256, ge=8, le=4096)
    # the KV cache every signature carries (the context a phone app gets); the decode cost
    # grows with it (attention runs over the whole static cache)
    cache_length: int = Field(1024, ge=64, le=32768)
    # run the .litertlm in LiteRT-LM and compare a greedy chat answer with the interpreter's
    chat_check: bool = True


def _require() -> None:
    """The extra's packages are there (found, not imported: TensorFlow takes seconds)."""
    import importlib.util

    missing = []
    for mod in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer", "tensorflow", "litert_lm"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):  # ValueError: a None entry in sys.modules
            found = False
        if not found:
            missing.append(mod)
    if missing:
        raise DependencyError(f"the LiteRT exporter needs {', '.join(missing)}", EXTRA_HINT)


def versions() -> str:
    """The exporter's identity for cache keys: torch, transformers, litert-torch, ai-edge-litert,
    ai-edge-quantizer."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("torch", "transformers", "litert-torch", "ai-edge-litert", "ai-edge-quantizer"):
        try:
            parts.append(f"{dist}-{version(dist)}")
        except PackageNotFoundError as exc:
            raise DependencyError(f"the LiteRT exporter needs {dist}", EXTRA_HINT) from exc
    return ".".join(parts)


def check_exportable(hf_dir: Path) -> None:
    """Refuse, from config.json alone (seconds), what export_hf cannot convert: a model that is
    not a transformers causal LM, whose attention takes no attention backend (export_hf swaps
    it for LiteRT's), or with dynamic/longrope RoPE (export_hf raises on those)."""
    import transformers
    from transformers import AutoConfig

    cfg_file = Path(hf_dir) / "config.json"
    raw = json.loads(cfg_file.read_text())
    arch = (raw.get("architectures") or ["this model"])[0]
    if not str(arch).endswith("ForCausalLM") or raw.get("is_encoder_decoder"):
        raise ModelError(f"the LiteRT exporter does not cover {arch}: it converts decoder-only "
                         "causal LMs (a *ForCausalLM architecture)",
                         "use a causal language model (Llama, Qwen2/3, Gemma, Mistral, Phi-3, "
                         "SmolLM3, ...)")
    try:
        config = AutoConfig.from_pretrained(hf_dir, trust_remote_code=False)
        cls = transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except (KeyError, ValueError, OSError) as exc:
        raise ModelError(f"the LiteRT exporter does not cover {arch}: transformers has no causal "
                         "LM class for it", "export_hf converts transformers causal LMs "
                         "(Llama, Qwen2/3, Gemma, Mistral, Phi-3, SmolLM3, ...); try --format "
                         "gguf") from exc
    if not getattr(cls, "_supports_attention_backend", False):
        raise ModelError(f"the LiteRT exporter does not cover {arch}: its attention takes no "
                         "attention backend, which export_hf replaces",
                         "try --format gguf for this architecture")
    if getattr(config, "num_key_value_heads", None) is None:
        raise ModelError(f"the LiteRT exporter does not cover {arch}: its config has no "
                         "num_key_value_heads, which export_hf's KV cache is shaped by",
                         "try --format gguf for this architecture")
    rope = (getattr(config, "rope_scaling", None) or {})
    rope_type = str(rope.get("rope_type") or rope.get("type") or "") if isinstance(rope, dict) \
        else ""
    if "dynamic" in rope_type or "longrope" in rope_type:
        raise ModelError(f"the LiteRT exporter does not cover {arch} with {rope_type} RoPE",
                         "export_hf supports default/linear/llama3 RoPE; try --format gguf")


def doctor_checks(ref: Any) -> list[Any]:
    """``edgesmith doctor``'s checks for the litert format (config only, seconds), which
    compress's preflight runs: can export_hf convert this model, are its tools installed?
    (A GGUF input is dequantized to an HF directory first.)"""
    from edgesmith.doctor import Check

    checks = []
    if ref.kind != "hf":
        arch = ref.architecture()
        ok = arch in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "mistral", "phi3")
        checks.append(Check("litert", "architecture", "ok" if ok else "warn",
                            f"{arch} GGUF: dequantized to transformers, then export_hf",
                            "" if ok else "convert the HF model instead"))
    else:
        try:
            check_exportable(Path(ref.path))
            checks.append(Check("litert", "architecture", "ok",
                                f"{ref.architecture()}: litert_torch export_hf converts it"))
        except ModelError as exc:
            checks.append(Check("litert", "architecture", "fail", exc.message, exc.hint))
    try:
        _require()
        checks.append(Check("litert", "exporter", "ok", versions()))
    except DependencyError as exc:
        checks.append(Check("litert", "exporter", "fail", exc.message, exc.hint))
    return checks


def copy_model_files(hf_dir: Path, dest: Path) -> None:
    """config.json, generation_config.json and the tokenizer files into the folder."""
    if not (hf_dir / "tokenizer.json").exists():
        raise ModelError(f"{hf_dir} has no tokenizer.json (a fast tokenizer)",
                         "LiteRT-LM packages tokenizer.json: save the model's fast tokenizer")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).exists():
            shutil.copy2(hf_dir / name, dest / name)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if not (dest / "generation_config.json").exists():
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def run_export_hf(hf_dir: Path, work: Path, prefill: int, cache: int, recipe: str | None,
                  threads: int | None, progress: Any = None, label: str = "",
                  keep_log: Path | None = None) -> dict[str, Any]:
    """export_hf in a child process (its stdout to a log, copied to ``keep_log`` on a
    failure), timed, its peak RSS measured."""
    work.mkdir(parents=True, exist_ok=True)
    log = work / "export_hf.log"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "edgesmith.export.litert", str(hf_dir), str(work), str(prefill),
           str(cache), recipe or ""]
    task = progress.add_task(label or "export LiteRT (litert_torch export_hf)", total=None) \
        if progress is not None else None
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if progress is not None:
                    progress.refresh()
                time.sleep(0.5)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if progress is not None:
        progress.update(task, total=1, completed=1)
    if proc.returncode != 0:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        err = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
                   lines[-1] if lines else f"exit code {proc.returncode}")
        if keep_log is not None:
            shutil.copy2(log, keep_log)
        raise ToolError(f"litert_torch export_hf failed for {hf_dir}: {err.strip()[:300]}",
                        f"the full log is {keep_log or log}; try --format gguf for this model")
    # ru_maxrss is in KiB on Linux
    return {"export_s": round(seconds, 2), "peak_rss_bytes": int(usage.ru_maxrss) * 1024}


def export_fp32(hf_dir: Path, dest: Path, cfg: LiteRTExportConfig, ctx: RunContext) \
        -> dict[str, Any]:
    """The fp32 folder (model.tflite, model.litertlm, tokenizer, configs) at ``dest``."""
    from edgesmith.export import litertlm

    _require()
    check_exportable(hf_dir)
    with atomic_dir(dest) as tmp:
        work = tmp / ".work"
        figures = run_export_hf(hf_dir, work, cfg.prefill_length, cfg.cache_length, None,
                                ctx.threads, ctx.progress,
                                keep_log=dest.with_name(dest.name + ".export_hf.log"))
        (work / "model.tflite").rename(tmp / "model.tflite")
        shutil.rmtree(work)
        copy_model_files(Path(hf_dir), tmp)
        meta = finish(tmp, Path(hf_dir), cfg, ctx)
    return {"type": "fp32", **figures, **meta, "prefill_length": cfg.prefill_length,
            "cache_length": cfg.cache_length, "exporter": versions(), "hf_dir": str(hf_dir),
            "litertlm_fixes": litertlm.FIXES}


def finish(folder: Path, hf_dir: Path, cfg: LiteRTExportConfig, ctx: RunContext) \
        -> dict[str, Any]:
    """Package ``folder/model.tflite`` into ``model.litertlm`` (and, for a SentencePiece
    tokenizer, MediaPipe's ``model.task``) and check each in LiteRT-LM."""
    from edgesmith.export import litertlm, mediapipe_task

    task = ctx.task("package .litertlm and check a chat answer in LiteRT-LM", total=None)
    tflite = folder / "model.tflite"
    litertlm.package(tflite, hf_dir, folder / "model.litertlm", cfg.cache_length)
    packages = {"litert-lm chat": folder / "model.litertlm"}
    extra: dict[str, Any] = {}
    if mediapipe_task.sentencepiece_model(hf_dir) is not None:
        dest = folder / mediapipe_task.TASK_FILE
        extra["task_metadata"] = mediapipe_task.build(tflite, hf_dir, dest)
        extra["task_bytes"] = dest.stat().st_size
        packages["litert-lm chat (.task)"] = dest
    checks = litertlm.chat_checks(packages, hf_dir, tflite) if cfg.chat_check else []
    ctx.progress.update(task, total=1, completed=1)
    for c in checks:
        if not c["passed"]:
            ctx.logger.warning("%s check failed: %s", c["name"], c["detail"])
    return {"checks": checks, "tflite_bytes": tflite.stat().st_size,
            "litertlm_bytes": (folder / "model.litertlm").stat().st_size, **extra}


class LiteRTExporter:
    """Exporter plug point: ``export(hf_dir, ctx, dest) -> Artifact`` (a folder)."""

    name = "litert"
    format = "litert"
    layout = "folder"
    Config = LiteRTExportConfig

    def __init__(self, config: LiteRTExportConfig | None = None) -> None:
        self.config = config or LiteRTExportConfig()

    @staticmethod
    def version() -> str:
        _require()
        return versions()

    def artifact_type(self) -> str:
        return self.config.dtype

    def cache_path(self, cache_dir: Path, hf_dir: Path, kind: str) -> Path:
        """Where an export of ``hf_dir`` is cached: keyed by the tools, prefill and cache
        lengths (shared by ``compress`` and ``export``)."""
        from edgesmith.export import litertlm

        c = self.config
        # CHECK_VERSION: a cached export carries its chat check, so a changed check re-runs it
        tag = hashlib.sha256(f"{versions()}|{c.chat_check}|{litertlm.CHECK_VERSION}".encode()
                             ).hexdigest()[:12]
        return Path(cache_dir) / (f"litert-{kind}.{Path(hf_dir).name}.p{c.prefill_length}"
                                  f".c{c.cache_length}.{tag}")

    @staticmethod
    def published_names(model_name: str, final_type: str) -> list[str]:
        """What a compress run writes into -o (flat; the model file first)."""
        return [*MODEL_FILES, *TOKENIZER_FILES]

    def export(self, hf_dir: Path, ctx: RunContext, dest: Path | None = None) -> Artifact:
        from edgesmith.compress import gptq_format
        from edgesmith.compress.litert_quantize import quantize
        from edgesmith.export.gguf import plain_dir

        source = Path(hf_dir)
        plain = plain_dir(source) if gptq_format.is_gptq_dir(source) else source
        q = self.config.dtype
        dest = Path(dest or ctx.cache_dir / f"litert-{q}")
        if q == "fp32":
            return Artifact(dest, "litert", export_fp32(plain, dest, self.config, ctx))
        fp32_cfg = self.config.model_copy(update={"dtype": "fp32"})
        fp32 = LiteRTExporter(fp32_cfg).cache_path(ctx.cache_dir, source, "fp32")
        meta = export_fp32(plain, fp32, fp32_cfg, ctx) if not (fp32 / "model.litertlm").exists() \
            else {"type": "fp32", "prefill_length": fp32_cfg.prefill_length,
                  "cache_length": fp32_cfg.cache_length, "hf_dir": str(plain)}
        return quantize(Artifact(fp32, "litert", meta), dest, q, ctx, plain,
                        chat=self.config.chat_check)


def _worker(argv: list[str]) -> None:
    """Child process: export_hf's generic route, fp32 (or a recipe: the direct-run anchor)."""
    from litert_torch.generative.export_hf import export as export_hf

    hf_dir, work, prefill, cache, recipe = argv
    # keep_temporary_files: everything lands in ``work`` itself (model.tflite, the tokenizer;
    # with a recipe also model_quantized.tflite and model.litertlm)
    export_hf.export(model=hf_dir, output_dir=work, prefill_lengths=[int(prefill)],
                     cache_length=int(cache), quantization_recipe=recipe,
                     bundle_litert_lm=bool(recipe), keep_temporary_files=True)


if __name__ == "__main__":
    _worker(sys.argv[1:])
