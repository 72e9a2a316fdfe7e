"""compress with an AWQ step through the CLI on a tiny Llama (the in-memory torch-pass path):
the folded model reaches llama.cpp, the manifest records the pass, the reference stays the
original model, and AWQ then GPTQ composes in one recipe."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

RECIPE = """name: tiny-awq
target: raspberry-pi-5
calibration: {{samples: 2, seq_len: 128}}
eval: {{ctx: 128, windows: 2}}
steps:
{steps}
gates:
  max_ppl_increase_pct: 1000
  max_kld: 10
  max_size_mb: 100
"""


def _compress(model: Path, d: Path, steps: str) -> dict:  # type: ignore[type-arg]
    (d / "r.yaml").write_text(RECIPE.format(steps=steps))
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", "compress", str(model),
                        "--recipe", str(d / "r.yaml"), "-o", str(d / "out"), "--threads", "2"],
                       capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"},
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((d / "out" / "manifest.json").read_text())


def _copy(tiny_llama: Path, tmp_path: Path) -> Path:
    """A copy of the tiny Llama: its own cache entry, so the other tests of tiny_llama find
    only their own quantized files and checkpoints in its cache."""
    model = tmp_path / "tiny-llama-copy"
    shutil.copytree(tiny_llama, model)
    return model


def test_awq_then_q4_k_m(tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path)
    man = _compress(model, tmp_path, "  - awq: {bits: 4, group_size: 32, clip: false}\n"
                    "  - export: {format: gguf, outtype: f16}\n"
                    "  - gguf_quantize: {type: Q4_K_M, imatrix: true}")
    (rep,) = man["passes"]
    assert rep["pass"] == "awq"
    art = man["artifacts"][0]
    assert {t["type"] for t in art["tensors"]} >= {"Q4_K"}
    # the folded model is the original function: its F16 export still matches the reference
    assert man["baseline"]["quality"]["kld_mean"] < 1e-3
    assert art["quality"]["kld_mean"] > man["baseline"]["quality"]["kld_mean"]


def test_awq_then_gptq_composes(tiny_llama: Path, tmp_path: Path) -> None:
    model = _copy(tiny_llama, tmp_path)
    man = _compress(model, tmp_path, "  - awq: {bits: 4, group_size: 32, sym: true, "
                    "clip: false}\n  - gptq: {bits: 4, group_size: 32, sym: true}\n"
                    "  - export: {format: gguf, outtype: f16}\n"
                    "  - gguf_quantize: {type: Q4_0, imatrix: true}")
    assert [r["pass"] for r in man["passes"]] == ["awq", "gptq"]
    art = man["artifacts"][0]
    assert art["exact_tensors"] and not art["requantized_tensors"]
    assert {t["type"] for t in art["tensors"] if t["name"].startswith("blk.")
            and t["name"].endswith(("attn_q.weight", "ffn_down.weight"))} == {"Q4_0"}


