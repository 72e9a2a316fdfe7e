"""End to end on the real packaged SmolLM2-135M: the Raspberry Pi 5 GPTQ Q4_0 recipe."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def test_pi5_gptq_q4_0(tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "out"
    p = watched([sys.executable, "-m", "edgesmith.cli", "compress", "builtin:smollm2-135m",
                 "--recipe", "raspberry-pi-5-gptq-q4_0", "-o", str(out), "--threads", "2"],
                env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    man = json.loads((out / "manifest.json").read_text())
    art = man["artifacts"][0]
    assert art["path"] == "smollm2-135m.Q4_0.gguf" and man["gates"]["passed"]
    types = {t["name"]: t["type"] for t in art["tensors"]}
    n_layers = sum(1 for n in types if n.endswith(".attn_q.weight"))
    assert n_layers == 30
    gptq = {f"blk.{i}.{n}.weight" for i in range(n_layers) for n in LINEARS}
    assert all(types[n] == "Q4_0" for n in gptq)
    assert {e["tensor"] for e in art["exact_tensors"]} == gptq == set(art["copied_tensors"])
    assert art["requantized_tensors"] == [] and man["warnings"] == []
    rep = man["passes"][0]
    assert rep["pass"] == "gptq" and len(rep["layers"]) == len(gptq)
    assert rep["error_total"] < rep["rtn_error_total"]
    q = art["quality"]
    assert q["tokens_scored"] > 0 and 0 < q["kld_mean"] < man["gates"]["limits"]["max_kld"]
    assert q["top1_agreement"] > 0.5
    print(f"\nGPTQ Q4_0: KLD {q['kld_mean']:.5f} p99 {q['kld_p99']:.4f} top1 "
          f"{q['top1_agreement']:.3f} ppl {q['ppl']:.3f} ({q['ppl_increase_pct']:+.2f}%) "
          f"size {art['size_bytes'] / 1e6:.1f} MB; baseline {man['baseline']['type']} KLD "
          f"{man['baseline']['quality']['kld_mean']:.5f}; GPTQ error {rep['error_total']:.4g} "
          f"vs RTN {rep['rtn_error_total']:.4g}; timings {man['timings_s']}")
