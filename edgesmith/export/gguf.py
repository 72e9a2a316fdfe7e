"""GGUF exporter: HF safetensors directory -> F16/BF16/F32 GGUF through llama.cpp's converter.

The converter is llama.cpp's own convert_hf_to_gguf.py from the sdist of the installed
llama-cpp-python (see llamacpp_src), run in a subprocess: it loads tensors lazily, so peak
memory stays near one tensor, and its output is exactly what this llama.cpp expects.

A GPTQ checkpoint (compress/gptq_format.py) is converted from its dequantized plain directory
(``plain_dir``), then its quantized Linears are written into the GGUF as the exact llama.cpp
blocks of their codes and scales (export/gguf_blocks.py): Q4_0, Q4_1 or Q8_0. A Linear no block
type holds exactly stays as the converter wrote it and is listed in ``not_written``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Literal

import psutil
from pydantic import BaseModel, ConfigDict

from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ToolError
from edgesmith.export import llamacpp_src
from edgesmith.fsutil import atomic_path, disk_full_error

_TENSOR_LINE = re.compile(r"INFO:hf-to-gguf:(\S+),\s+torch\.\w+ --> (\w+), shape")


class GGUFExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    outtype: Literal["f16", "bf16", "f32"] = "f16"


def _count_tensors(hf_dir: Path) -> int:
    total = 0
    for shard in hf_dir.glob("*.safetensors"):
        with open(shard, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            total += sum(1 for k in json.loads(f.read(n)) if k != "__metadata__")
    return total


def convert(hf_dir: Path, dest: Path, outtype: str, ctx: RunContext) -> dict[str, float]:
    """Run the converter into ``dest`` atomically. Returns the converter's peak memory."""
    script = llamacpp_src.convert_script(ctx.progress)
    total = _count_tensors(hf_dir)
    task = ctx.task(f"convert to {outtype.upper()} GGUF (llama.cpp converter)", total=total)
    with atomic_path(dest) as tmp:
        cmd = [sys.executable, str(script), str(hf_dir), "--outfile", str(tmp),
               "--outtype", outtype]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        peak = {"rss": 0, "anon": 0}

        def sample() -> None:
            # anon = RSS less file-backed pages: the converter mmaps the safetensors, and those
            # pages count in RSS but are page cache the kernel can drop under pressure.
            try:
                p = psutil.Process(proc.pid)
                while proc.poll() is None:
                    mi = p.memory_info()
                    peak["rss"] = max(peak["rss"], mi.rss)
                    peak["anon"] = max(peak["anon"], mi.rss - mi.shared)
                    time.sleep(0.02)
            except psutil.Error:
                pass

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        lines: list[str] = []
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if _TENSOR_LINE.search(line):
                ctx.progress.advance(task)
        rc = proc.wait()
        sampler.join()
        if rc != 0:
            if any("No space left on device" in ln for ln in lines):
                raise disk_full_error(dest)
            msg = next((ln for ln in reversed(lines) if "Error" in ln or "error" in ln),
                       lines[-1] if lines else "no output")
            raise ToolError(f"llama.cpp's converter failed on {hf_dir}: {msg.strip()}",
                            "check that the model's architecture is supported by llama.cpp")
    ctx.progress.update(task, completed=total)
    return {"peak_rss_bytes": float(peak["rss"]), "peak_anon_bytes": float(peak["anon"])}


def plain_dir(checkpoint: Path) -> Path:
    """The dequantized plain HF directory beside a GPTQ checkpoint (made once, atomically)."""
    from edgesmith.compress import gptq_format

    plain = checkpoint.with_name(checkpoint.name + "-plain")
    if not (plain / "config.json").exists():
        gptq_format.dequantize_checkpoint(checkpoint, plain)
    return plain


def _export_gptq(checkpoint: Path, dest: Path, outtype: str, ctx: RunContext) -> dict[str, Any]:
    from edgesmith.compress import gptq_format
    from edgesmith.export import gguf_blocks

    plain = plain_dir(checkpoint)
    converted = dest.with_name(dest.name + ".converted.gguf")
    stats = convert(plain, converted, outtype, ctx)
    try:
        ckpt = gptq_format.GPTQCheckpoint(checkpoint)
        res = gguf_blocks.write_quantized(converted, dest, gguf_blocks.checkpoint_sources(ckpt),
                                          ctx.progress)
    finally:
        converted.unlink(missing_ok=True)
    kinds = sorted({w["type"] for w in res["written"]})
    label = "+".join([outtype.upper(), *kinds])
    return {"type": label, **stats, "written": res["written"],
            "not_written": res["not_written"], "gptq": True}


class GGUFExporter:
    """Exporter plug point: ``export(hf_dir, ctx) -> Artifact``."""

    name = "gguf"
    format = "gguf"
    layout = "file"
    Config = GGUFExportConfig

    def __init__(self, config: GGUFExportConfig | None = None) -> None:
        self.config = config or GGUFExportConfig()

    def artifact_type(self) -> str:
        return self.config.outtype.upper()

    @staticmethod
    def version() -> str:
        from edgesmith.export import llamacpp_src

        return f"llama-cpp-{llamacpp_src.installed_version()}"

    @staticmethod
    def published_names(model_name: str, final_type: str) -> list[str]:
        """What a compress run writes into -o (the artifact first)."""
        return [f"{model_name}.{final_type}.gguf"]

    def export(self, hf_dir: Path, ctx: RunContext, dest: Path | None = None) -> Artifact:
        outtype = self.config.outtype
        dest = dest or ctx.cache_dir / f"model.{outtype.upper()}.gguf"
        from edgesmith.compress import gptq_format

        if gptq_format.is_gptq_dir(hf_dir):
            return Artifact(dest, "gguf", _export_gptq(hf_dir, dest, outtype, ctx))
        stats = convert(hf_dir, dest, outtype, ctx)
        return Artifact(dest, "gguf", {"type": outtype.upper(), **stats})
