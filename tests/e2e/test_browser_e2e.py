"""SmolLM2-135M exported by the CLI (`export --format onnx --dtype q4`) runs in headless
chromium: wasm and WebGPU (SwiftShader) against Python onnxruntime, and `bench --runtime
browser` writes a results file. WebGPU keeps to a 16-token prompt and 4 tokens (SwiftShader
spends seconds per decode step)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgesmith.bench.runners.base import log_softmax

pytest.importorskip("playwright")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.e2e
EXE = str(Path(sys.executable).parent / "edgesmith")


@pytest.fixture(scope="module")
def smollm2_web(tmp_path_factory: pytest.TempPathFactory, watched: Any) -> Path:
    out = tmp_path_factory.mktemp("e2e-web") / "web"
    r = watched([EXE, "export", "builtin:smollm2-135m", "--format", "onnx", "--dtype", "q4",
                 "-o", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    found = list(out.rglob("model_q4.onnx"))
    assert len(found) == 1, list(out.rglob("*"))
    return found[0].parent.parent


def kld(ref: np.ndarray, got: np.ndarray) -> float:
    p, q = log_softmax(ref).astype(np.float64), log_softmax(got).astype(np.float64)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def test_smollm2_q4_in_chromium_matches_python_onnxruntime(smollm2_web: Path) -> None:
    from edgesmith.bench.runners.onnxruntime import OnnxSession
    from edgesmith.bench.speed import prompt_ids
    from edgesmith.web.browser import Harness

    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "onnx/model_q4.onnx", "onnx/model_q4.onnx_data"):
        assert (smollm2_web / name).exists(), name
    ref = OnnxSession(smollm2_web, threads=2, dtype="q4")
    prompt = prompt_ids(ref, 32)
    try:
        with Harness(smollm2_web, smollm2_web / "onnx" / "model_q4.onnx") as h:
            h.load("wasm", 2)
            want, _ = ref.step(prompt, ref.empty_cache(), 0)
            assert kld(want, h.logits(prompt)) < 1e-4
            assert h.generate(prompt, 16)["tokens"] == ref.generate(prompt, 16).generated_tokens
            h.load("webgpu", 0)
            short = prompt[:16]
            want, _ = ref.step(short, ref.empty_cache(), 0)
            assert kld(want, h.logits(short)) < 1e-4
            assert h.generate(short, 4)["tokens"] == ref.generate(short, 4).generated_tokens
    finally:
        ref.close()


def test_bench_runtime_browser_on_smollm2(smollm2_web: Path, tmp_path: Path,
                                          watched: Any) -> None:
    out = tmp_path / "chromium-wasm.json"
    r = watched([EXE, "bench", str(smollm2_web), "--runtime", "browser", "--browser-backend",
                 "wasm", "--threads", "2", "--prompt-tokens", "32", "--gen-tokens", "16",
                 "--repeat", "1", "--warmup", "0", "-o", str(out)])
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["settings"]["runtime"] == "chromium-wasm"
    assert data["artifact"]["n_params"] > 100e6  # SmolLM2-135M's weights, counted from ONNX
    assert data["metrics"]["decode_tps"]["median"] > 0
