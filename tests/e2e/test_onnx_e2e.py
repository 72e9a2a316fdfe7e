"""End to end: `edgesmith compress builtin:smollm2-135m --target webgpu-browser` through the CLI
a user runs: the transformers.js folder, verified in onnxruntime against the reference model
with the same evaluator and gates as a GGUF, then benchmarked with `edgesmith bench`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("onnxruntime")


def test_compress_smollm2_for_the_browser(tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "web"
    r = watched([sys.executable, "-m", "edgesmith.cli", "compress", "builtin:smollm2-135m",
                 "--target", "webgpu-browser", "-o", str(out), "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads(r.stdout)
    art = man["artifacts"][0]
    assert man["recipe"]["name"] == "webgpu-browser-q4" and man["gates"]["passed"]
    assert art["format"] == "onnx" and art["runtime"] == "onnxruntime"
    # the fp32 export is the model (the reference is stored as fp16: rounding only)
    assert man["baseline"]["quality"]["kld_mean"] < 1e-3
    q = art["quality"]
    assert 0 < q["kld_mean"] <= man["gates"]["limits"]["max_kld"]
    assert q["top1_agreement"] > 0.7
    # int4 body + int8 embedding shared by the head: about a fifth of the fp32 export
    assert art["size_bytes"] < 0.3 * man["baseline"]["size_bytes"]
    types = {t["type"] for t in art["tensors"]}
    assert "int4-b32" in types and "int8-b32 (tied)" in types
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "onnx/model_q4.onnx", "onnx/model_q4.onnx_data",
                 "manifest.json", "report.md"):
        assert (out / name).is_file(), name
    b = watched([sys.executable, "-m", "edgesmith.cli", "bench", str(out), "--threads", "2",
                 "--prompt-tokens", "32", "--gen-tokens", "16", "--repeat", "1", "--warmup", "0",
                 "--json"])
    assert b.returncode == 0, b.stderr[-3000:]
    res = json.loads(b.stdout)
    assert res["settings"]["runtime"] == "onnxruntime" and res["artifact"]["format"] == "onnx"
    assert res["metrics"]["decode_tps"]["median"] > 0
