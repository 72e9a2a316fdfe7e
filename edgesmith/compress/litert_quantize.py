"""Format-side pass: the fp32 LiteRT export's weights quantized with an ai_edge_quantizer recipe.

The LiteRT counterpart of ``gguf_quantize``: it takes the fp32 folder (the cached export, the
baseline) and writes a new folder with ``model.tflite`` quantized by the recipe (5-10 s on
SmolLM2-135M: the export itself takes minutes, so it runs once and every variant is derived),
its ``model.litertlm`` and the tokenizer files, checked in LiteRT-LM like the export.

Recipes (measured on SmolLM2-135M in LiteRT's interpreter against PyTorch fp32; figures from
benchmarks/mobile_vs_anchors.py):
- ``dynamic_wi8c_hr_afp32`` (default): int8 per-channel weights and activations quantized on
  the fly for int8 matmuls, as export_hf's own default, but with each Linear's input rotated by
  a Hadamard matrix first (its weights rotated offline), which spreads the activation outliers
  that per-token int8 rounds badly: KLD 0.0038 against export_hf's default's 0.0179 on
  SmolLM2-135M, at the same decode speed and 1% more bytes;
- ``dynamic_wi8_afp32`` (export_hf's own default): the same without the rotation;
- ``weight_only_wi8_afp32``: int8 weights dequantized to fp32: closer to fp32, slower;
- ``dynamic_wi4b32_afp32``: int4 blocks of 32, round-to-nearest: unusable on a 135M model
  (the manifest carries a warning), offered for larger models.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgesmith.compress.format_pass import FormatPass
from edgesmith.context import Artifact, RunContext
from edgesmith.errors import DependencyError, ModelError
from edgesmith.fsutil import atomic_dir

Recipe = Literal["dynamic_wi8c_hr_afp32", "dynamic_wi8_afp32", "weight_only_wi8_afp32",
                 "dynamic_wi4b32_afp32"]
WARNINGS = {
    "dynamic_wi4b32_afp32": "dynamic_wi4b32_afp32 is round-to-nearest int4: on SmolLM2-135M it "
                            "lost KL 0.58 / top-1 63%; check the quality figures before shipping",
}


class LiteRTQuantizeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    recipe: Recipe = "dynamic_wi8c_hr_afp32"
    # run the .litertlm in LiteRT-LM and compare a greedy chat answer with transformers'
    chat_check: bool = True


def quantize_tflite(src: Path, dest: Path, recipe: str) -> float:
    """``src`` (fp32 .tflite) quantized with the ai_edge_quantizer recipe into ``dest``;
    returns the seconds it took."""
    try:
        from ai_edge_quantizer import quantizer as quantizer_lib
        from ai_edge_quantizer import recipe as recipe_lib
    except ImportError as exc:
        raise DependencyError(f"the LiteRT quantizer is not installed ({exc})",
                              "pip install 'edgesmith[litert]'") from exc
    import contextlib
    import sys

    t0 = time.perf_counter()
    # the quantizer prints its summary to stdout, which is compress --json's: to stderr
    with contextlib.redirect_stdout(sys.stderr):
        qt = quantizer_lib.Quantizer(str(src))
        qt.load_quantization_recipe(getattr(recipe_lib, recipe)())
        qt.quantize().export_model(str(dest), overwrite=True)
    return time.perf_counter() - t0


def quantize(src: Artifact, dest: Path, recipe: str, ctx: RunContext, hf_dir: Path | None = None,
             chat: bool = True) -> Artifact:
    """A folder at ``dest`` like ``src``'s with model.tflite quantized by ``recipe``."""
    from edgesmith.export.litert import TOKENIZER_FILES, LiteRTExportConfig, finish

    src_dir = Path(src.path)
    if not (src_dir / "model.tflite").is_file():
        raise ModelError(f"{src_dir} holds no model.tflite", "export it with `export: litert`")
    # the model the chat check compares against: the HF directory beside the run
    hf = Path(hf_dir) if hf_dir is not None else Path(src.meta.get("hf_dir") or src_dir)
    meta_in = dict(src.meta)
    cfg = LiteRTExportConfig(cache_length=int(meta_in.get("cache_length", 1024)),
                             prefill_length=int(meta_in.get("prefill_length", 256)),
                             chat_check=chat)
    task = ctx.task(f"quantize LiteRT ({recipe})", total=None)
    with atomic_dir(dest) as tmp:
        seconds = quantize_tflite(src_dir / "model.tflite", tmp / "model.tflite", recipe)
        for name in TOKENIZER_FILES:
            if (src_dir / name).exists():
                shutil.copy2(src_dir / name, tmp / name)
        ctx.progress.update(task, total=1, completed=1)
        meta = finish(tmp, hf if (hf / "config.json").exists() else tmp, cfg, ctx)
    warnings = [WARNINGS[recipe]] if recipe in WARNINGS else []
    for w in warnings:
        ctx.logger.warning(w)
    out: dict[str, Any] = {
        "type": recipe, "recipe": recipe, "quantize_s": round(seconds, 2),
        "source": src_dir.name, "warnings": warnings, **meta,
        **{k: meta_in[k] for k in ("prefill_length", "cache_length", "exporter", "hf_dir",
                                   "litertlm_fixes") if k in meta_in}}
    return Artifact(Path(dest), "litert", out)


class LiteRTQuantizePass(FormatPass):
    """Format-side Pass plug point: ``run(artifact, ctx) -> Artifact``."""

    name = "litert_quantize"
    Config = LiteRTQuantizeConfig
    formats = ("litert",)
    type_field = "recipe"

    def run(self, artifact: Artifact, ctx: RunContext) -> Artifact:
        return quantize(artifact, self.dest(artifact, ctx), self.config.recipe, ctx,
                        chat=self.config.chat_check)
