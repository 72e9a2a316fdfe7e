"""End to end on the real packaged SmolLM2-135M: `edgesmith export --format hf-gptq`, the
folder it publishes, the checkpoint loaded back against the fp32 model, and (when its venv is
there) onnxruntime-genai's model builder loading the same folder."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import hf_gptq_interop as interop

pytestmark = pytest.mark.e2e

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ENV = {**os.environ, "COLUMNS": "200"}


def _cli(watched, *args: str):  # type: ignore[no-untyped-def]
    return watched([sys.executable, "-m", "edgesmith.cli", "export", "builtin:smollm2-135m",
                    "--format", "hf-gptq", *args], env=ENV)


def _rtn_logprobs(src: Path, windows: list[list[int]], spec: Any) -> list[np.ndarray]:
    """The fp32 model with every decoder Linear rounded to nearest on the same grid."""
    import torch

    from edgesmith.compress import qweights as qw
    from edgesmith.models import load_hf

    model = load_hf(src)[0]
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and ".layers." in name:
                m.weight.copy_(qw.quantize_rtn(m.weight, spec, name).dequantize())
        return [torch.log_softmax(model(torch.tensor([w])).logits[0].float(), -1).numpy()
                for w in windows]


def test_group_128_does_not_divide_smollm2(tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    """SmolLM2-135M's hidden size is 576 = 4.5 x 128: the one-line error names the layer and the
    group sizes that work, and nothing is published."""
    out = tmp_path / "out"
    p = _cli(watched, "--bits", "4", "--group-size", "128", "-o", str(out))
    assert p.returncode == 2, p.stderr
    last = [ln for ln in p.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("error: ") and "model.layers.0.self_attn.q_proj" in last
    assert "576 input features" in last and "group_size in [32, 64]" in last
    assert not out.exists() or list(out.iterdir()) == []


def test_export_smollm2_hf_gptq(tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    from edgesmith import models
    from edgesmith.bench.quality import corpus
    from edgesmith.compress import gptq_format
    from edgesmith.compress import qweights as qw
    from edgesmith.models import load_hf

    out = tmp_path / "out"
    # 8 x 256 calibration tokens keep the test minutes shorter (32 x 512 is the default)
    p = _cli(watched, "--bits", "4", "--group-size", "64", "--samples", "8", "--seq-len", "256",
             "--json", "-o", str(out))
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["format"] == "hf-gptq" and result["type"] == "gptq-w4g64"
    man = json.loads((out / "manifest.json").read_text())
    listed = {f["path"] for f in man["files"]}
    assert all((out / f).is_file() for f in listed)
    assert {"config.json", "quantize_config.json", "tokenizer.json"} <= listed
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq", 4, 64, True, True)
    ckpt = gptq_format.GPTQCheckpoint(out)
    assert set(ckpt.weight_map.values()) | {"model.safetensors.index.json"} <= listed
    n_layers = json.loads((out / "config.json").read_text())["num_hidden_layers"]
    assert n_layers == 30
    assert ckpt.quantized_names() == sorted(
        f"model.layers.{i}.{n}" for i in range(n_layers) for n in LINEARS)
    assert ckpt.tensor("model.layers.0.self_attn.q_proj.qweight").shape == (576 // 8, 576)
    assert ckpt.tensor("model.layers.0.mlp.down_proj.scales").shape == (1536 // 64, 576)

    # loaded back (GPTQCheckpoint -> plain fp32 model), it is close to the fp32 model
    src = models.as_hf_dir(models.resolve("builtin:smollm2-135m"))
    tok = load_hf(src)[1]
    ids = tok(corpus("heldout"), add_special_tokens=False)["input_ids"]
    windows = [ids[i * 256:(i + 1) * 256] for i in range(4)]
    plain = gptq_format.dequantize_checkpoint(out, tmp_path / "plain")
    fp32 = interop.torch_logprobs(src, windows)
    ours = interop.torch_logprobs(plain, windows)
    kld = interop.mean_kld(fp32, ours)
    top1 = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1)
                                         for a, b in zip(fp32, ours, strict=True)])))
    meta = man["export"]["meta"]
    print(f"\nhf-gptq w4 g64 sym act-order on SmolLM2-135M: KLD vs fp32 {kld:.5f}, top-1 "
          f"{100 * top1:.1f}%, {result['size_bytes'] / 1e6:.1f} MB, GPTQ {meta['seconds']} s, "
          f"error {meta['error_total']:.4g} vs RTN {meta['rtn_error_total']:.4g}")
    # SmolLM2 is a dequantized Q4_1 (asymmetric group 32): a symmetric group-64 grid is off
    # its grid, so 4 bits cost more here than on a model trained in fp (measured 0.15; the
    # imatrix Q4_0 of llama.cpp, group 32: 0.138). GPTQ must beat round-to-nearest clearly.
    rtn = interop.mean_kld(fp32, _rtn_logprobs(src, windows, qw.QuantSpec(4, 64, True)))
    print(f"round-to-nearest at the same settings: KLD {rtn:.5f} ({kld / rtn:.2f}x)")
    assert 1e-4 < kld < 0.25 and kld < 0.7 * rtn and top1 > 0.7
    assert meta["error_total"] < meta["rtn_error_total"]

    python = interop.ortgenai_python()
    if python is None:
        pytest.skip(f"checkpoint checked; onnxruntime-genai part skipped: {interop.MISSING}")
    onnx_dir = tmp_path / "onnx"
    interop.ortgenai_build(python, out, onnx_dir, tmp_path / "og-cache", run=watched)
    theirs = interop.ortgenai_logprobs(python, onnx_dir, windows, tmp_path, run=watched)
    kld_og = interop.mean_kld(ours, theirs)
    print(f"onnxruntime-genai {interop.VERSION} builder + runtime vs ours: KLD {kld_og:.2e}; "
          f"vs fp32 {interop.mean_kld(fp32, theirs):.5f}")
    assert kld_og < 0.01 * kld
