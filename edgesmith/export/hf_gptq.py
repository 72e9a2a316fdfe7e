"""hf-gptq exporter: HF safetensors directory -> a standard GPTQ checkpoint folder.

The folder is what transformers+optimum/gptqmodel, vLLM and onnxruntime-genai's model builder
read (``quant_method: gptq``; layout in compress/gptq_format.py): ``qweight``/``qzeros``/
``scales``/``g_idx`` per quantized Linear, every other tensor as it was, config.json with its
``quantization_config`` and the tokenizer files.

The quantization is compress/gptq.py's GPTQ pass, streamed one decoder layer at a time from
the safetensors (``GPTQPass.run_dir``), on the builtin calibration text (or a .txt file). The
checkpoint is written into an owner-tagged temp folder beside ``dest`` and renamed into place
only when complete: a run killed at any point leaves no folder at ``dest``, and the next atomic
write in that directory sweeps the dead run's temp folder.

An input that already is a GPTQ checkpoint is copied when its settings (bits, group size,
symmetry, act-order, checkpoint format) are the ones asked for, and refused otherwise: its
weights are quantized already, and quantizing them again would only add error.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ModelError
from edgesmith.fsutil import atomic_dir


class HFGPTQExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bits: Literal[2, 3, 4, 8] = 4
    group_size: Literal[32, 64, 128] = 128
    sym: bool = True
    act_order: bool = Field(True, description="desc_act, with static groups (g_idx ordinal)")
    damp: float = Field(0.01, gt=0, le=1)
    calibration: str = Field("builtin:calibration", description="builtin:calibration or a .txt")
    samples: int = Field(32, ge=1, le=4096, description="calibration chunks")
    seq_len: int = Field(512, ge=16, le=8192, description="tokens per calibration chunk")
    checkpoint_format: Literal["gptq", "gptq_v2"] = Field(
        "gptq", description="gptq (v1): every loader; gptq_v2: gptqmodel, also asymmetric")

    def gptq_config(self) -> Any:
        from edgesmith.compress.gptq import GPTQConfig

        return GPTQConfig(bits=self.bits, group_size=self.group_size, sym=self.sym,
                          act_order=self.act_order, damp=self.damp, samples=self.samples,
                          seq_len=self.seq_len, checkpoint_format=self.checkpoint_format)


def _settings(qc: dict[str, Any]) -> dict[str, Any]:
    """The settings of a checkpoint's quantization_config that decide how its weights are
    stored: bits, group size and symmetry always; act-order and the checkpoint format too."""
    return {"bits": int(qc.get("bits", 0)), "group_size": int(qc.get("group_size", -1)),
            "sym": bool(qc.get("sym", True)), "act_order": bool(qc.get("desc_act", False)),
            "checkpoint_format": qc.get("checkpoint_format", "gptq")}


def _flags(s: dict[str, Any]) -> str:
    return f"--bits {s['bits']} --group-size {s['group_size']} {'--sym' if s['sym'] else '--asym'}"


def _tokenizer(hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{hf_dir} has no tokenizer that transformers loads ({exc})",
                         "GPTQ calibrates on tokenized text: put the model's tokenizer files "
                         "(tokenizer.json, tokenizer_config.json) beside its weights") from exc


def _readable(folder: Path) -> None:
    """Files as the umask allows (safetensors writes its shards 0600): the folder is for
    other tools, maybe another user's or a container's."""
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)


class HFGPTQExporter:
    """Exporter plug point: ``export(hf_dir, ctx, dest) -> Artifact`` (a folder)."""

    name = "hf-gptq"
    format = "hf-gptq"
    layout = "folder"
    Config = HFGPTQExportConfig

    def __init__(self, config: HFGPTQExportConfig | None = None) -> None:
        self.config = config or HFGPTQExportConfig()

    def artifact_type(self) -> str:
        c = self.config
        return f"gptq-w{c.bits}g{c.group_size}{'' if c.sym else '-asym'}"

    def default_name(self, model_name: str) -> str:
        return f"{model_name}.{self.artifact_type()}"

    def export(self, hf_dir: Path, ctx: RunContext, dest: Path | None = None) -> Artifact:
        from edgesmith.compress import gptq_format

        hf_dir = Path(hf_dir)
        dest = Path(dest) if dest is not None else ctx.cache_dir / self.default_name(hf_dir.name)
        if gptq_format.is_gptq_dir(hf_dir):
            return self._copy(hf_dir, dest)
        return self._quantize(hf_dir, ctx, dest)

    def _meta(self, dest: Path, extra: dict[str, Any]) -> dict[str, Any]:
        from edgesmith.compress import gptq_format

        ckpt = gptq_format.GPTQCheckpoint(dest)
        files = [f for f in dest.rglob("*") if f.is_file()]
        return {"type": self.artifact_type(), "layout": "folder",
                "settings": self.config.model_dump(mode="json"),
                "quantization_config": ckpt.qconfig,
                "quantized_tensors": ckpt.quantized_names(),
                "size_bytes": sum(f.stat().st_size for f in files), "files": len(files),
                **extra}

    def _copy(self, src: Path, dest: Path) -> Artifact:
        from edgesmith.compress import gptq_format

        c = self.config
        have = _settings(gptq_format.GPTQCheckpoint(src).qconfig)
        want = _settings({"bits": c.bits, "group_size": c.group_size, "sym": c.sym,
                          "desc_act": c.act_order, "checkpoint_format": c.checkpoint_format})
        # act-order and the format are compared only when asked for: the CLI sets neither,
        # and either way the checkpoint holds the bits, groups and symmetry that were asked
        asked = {"bits", "group_size", "sym"} | (c.model_fields_set & {"act_order",
                                                                       "checkpoint_format"})
        diff = ", ".join(f"{k} {have[k]} (asked {want[k]})" for k in have
                         if k in asked and have[k] != want[k])
        if diff:
            raise ModelError(
                f"{src} is already a GPTQ checkpoint with other settings: {diff}",
                f"export it with its own settings ({_flags(have)}), or start from the "
                "unquantized model: re-quantizing quantized weights only adds error")
        with atomic_dir(dest) as tmp:
            for f in sorted(src.iterdir()):
                if f.is_dir():
                    shutil.copytree(f, tmp / f.name)
                else:
                    shutil.copy2(f, tmp / f.name)
        return Artifact(dest, self.format, self._meta(dest, {"copied_from": str(src)}))

    def _quantize(self, hf_dir: Path, ctx: RunContext, dest: Path) -> Artifact:
        from edgesmith import models
        from edgesmith.compress import gptq_format
        from edgesmith.compress.gptq import GPTQPass
        from edgesmith.compress.imatrix import CalibrationConfig

        c = self.config
        calib = CalibrationConfig(source=c.calibration, samples=c.samples, seq_len=c.seq_len)
        calib.text()  # a missing calibration file is one line before any work
        # the pass reads its calibration and tokenizer from the context: this export's own,
        # never a recipe's or another model's that the caller's context may carry
        extras = {k: v for k, v in ctx.extras.items() if k not in ("tokenizer", "pass_reports")}
        extras["calibration"] = calib
        extras["tokenizer"] = _tokenizer(hf_dir)
        run_ctx = dataclasses.replace(ctx, calibration_text="", extras=extras)
        gptq = GPTQPass(c.gptq_config())
        if any(hf_dir.glob("*.safetensors")):  # streamed: one decoder layer in memory
            gptq.run_dir(hf_dir, dest, run_ctx)
        else:
            model, tok = models.load_hf(hf_dir)
            model = gptq.run(model, run_ctx)
            gptq_format.save_model(model, dest, tokenizer=tok)
        _readable(dest)
        rep = gptq.report
        ctx.extras.setdefault("pass_reports", []).append(rep)
        return Artifact(dest, self.format, self._meta(dest, {
            "calibration": calib.model_dump(mode="json"), "seconds": rep.get("seconds"),
            "error_total": rep.get("error_total"), "rtn_error_total": rep.get("rtn_error_total"),
        }))
