"""compress with a GPTQ recipe through the CLI on a tiny Llama: GPTQ's codes reach the GGUF as
the exact Q4_0 blocks, llama.cpp's quantizer copies them, the manifest records the pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

RECIPE = """name: tiny-gptq-q4_0
target: raspberry-pi-5
calibration: {samples: 4, seq_len: 128}
eval: {ctx: 128, windows: 2}
steps:
  - gptq: {bits: 4, group_size: 32, sym: true, act_order: true, damp: 0.01}
  - export: {format: gguf, outtype: f16}
  - gguf_quantize: {type: Q4_0, imatrix: true}
gates:
  max_ppl_increase_pct: 1000
  max_kld: 10
  max_size_mb: 100
"""

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=900)


@pytest.fixture(scope="module")
def compressed(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # type: ignore[type-arg]
    d = tmp_path_factory.mktemp("gptq")
    (d / "r.yaml").write_text(RECIPE)
    p = run("compress", str(tiny_llama), "--recipe", str(d / "r.yaml"), "-o", str(d / "out"),
            "--threads", "2")
    assert p.returncode == 0, p.stderr
    man = json.loads((d / "out" / "manifest.json").read_text())
    man["_out"] = str(d / "out")
    return man


def _checkpoint(tiny_llama: Path) -> Path:
    from edgesmith import models
    from edgesmith.compress import gptq_format
    from edgesmith.fsutil import cache_root

    cache = cache_root() / "runs" / models.resolve(str(tiny_llama)).fingerprint()
    found = [p for p in cache.glob("hf-*") if p.is_dir() and gptq_format.is_gptq_dir(p)]
    assert len(found) == 1, found
    return found[0]


def test_gptq_linears_are_q4_0_and_the_rest_quantized(compressed: dict) -> None:  # type: ignore[type-arg]
    art = compressed["artifacts"][0]
    assert art["path"] == "tiny-llama.Q4_0.gguf"
    types = {t["name"]: t["type"] for t in art["tensors"]}
    gguf_names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    for layer in (0, 1):
        for n in gguf_names:
            assert types[f"blk.{layer}.{n}.weight"] == "Q4_0"
    exact = {e["tensor"] for e in art["exact_tensors"]}
    assert exact == {f"blk.{i}.{n}.weight" for i in (0, 1) for n in gguf_names}
    assert set(art["copied_tensors"]) == exact and art["requantized_tensors"] == []
    assert compressed["warnings"] == []
    # the tied embedding is no GPTQ tensor: llama.cpp quantized it from F16
    assert types["token_embd.weight"] != "F16"
    assert art["imatrix"] is True


def test_gguf_blocks_are_the_checkpoint_codes(compressed: dict, tiny_llama: Path) -> None:  # type: ignore[type-arg]
    """The published GGUF's bytes of unpermuted Linears equal gguf_blocks.blocks() of the
    checkpoint's codes; the rope-permuted q/k rows are a row permutation of them."""
    import gguf

    from edgesmith.compress import gptq_format
    from edgesmith.export import gguf_blocks

    ckpt = gptq_format.GPTQCheckpoint(_checkpoint(tiny_llama))
    reader = gguf.GGUFReader(str(Path(compressed["_out"]) / compressed["artifacts"][0]["path"]))
    tensors = {t.name: t for t in reader.tensors}
    for hf, name in (("mlp.down_proj", "ffn_down"), ("self_attn.v_proj", "attn_v"),
                     ("mlp.gate_proj", "ffn_gate")):
        q = ckpt.quantized(f"model.layers.1.{hf}")
        got = np.asarray(tensors[f"blk.1.{name}.weight"].data)
        assert np.array_equal(got, gguf_blocks.blocks(q, "Q4_0")), hf
    q = ckpt.quantized("model.layers.0.self_attn.q_proj")
    got = np.asarray(tensors["blk.0.attn_q.weight"].data)
    want = gguf_blocks.blocks(q, "Q4_0")
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))


def test_passes_report_and_gates(compressed: dict) -> None:  # type: ignore[type-arg]
    passes = compressed["passes"]
    assert [p["pass"] for p in passes] == ["gptq"]
    rep = passes[0]
    assert rep["settings"]["group_size"] == 32 and rep["settings"]["act_order"] is True
    assert len(rep["layers"]) == 2 * len(LINEARS)
    assert all(e["error"] >= 0 and e["rtn_error"] >= 0 for e in rep["layers"])
    assert rep["error_total"] < rep["rtn_error_total"]  # GPTQ's Hessian-weighted error is lower
    assert sorted(rep["tensors"]) == sorted(f"model.layers.{i}.{n}" for i in (0, 1)
                                            for n in LINEARS)
    assert compressed["gates"]["passed"] is True
    q = compressed["artifacts"][0]["quality"]
    assert q["tokens_scored"] == 2 * 63 and q["kld_mean"] > 0
    # the reference is the original model, not the GPTQ one: the F16+Q4_0 export differs from it
    assert compressed["baseline"]["type"] == "F16+Q4_0"
    assert compressed["baseline"]["quality"]["kld_mean"] > 1e-4
    assert "gptq" in compressed["recipe"]["as_run"]["steps"][0]
