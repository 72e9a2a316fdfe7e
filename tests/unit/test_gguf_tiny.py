"""GGUF export and quantization on tiny random Llama/Qwen2 models (hidden 256: k-quants apply)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from edgesmith.bench.quality import kl_divergence
from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
from edgesmith.bench.runners.torch import TorchRunner
from edgesmith.compress import gguf_quantize, imatrix
from edgesmith.context import RunContext, make_progress
from edgesmith.export.gguf import GGUFExportConfig, GGUFExporter
from edgesmith.models import load_hf

TEXT = ("The Raspberry Pi 5 runs small language models locally. Quantization trades a little "
        "accuracy for a smaller, faster file: 4-bit weights, 256-value blocks, and scales.")


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    d = tmp_path_factory.mktemp("gguf")
    return RunContext(out_dir=d, cache_dir=d, progress=make_progress(quiet=True), threads=2)


# Qwen2 is covered up to the converter (imatrix names below): transformers 5 gives every
# Qwen2 model Qwen's own pre-tokenizer, and with the borrowed SmolLM2 vocabulary of a random
# test model that tokenizer is one llama.cpp's converter does not recognize (it identifies
# pre-tokenizers by a hash of their output). Real Qwen2 tokenizers are recognized.
@pytest.fixture(scope="module", params=["tiny_llama"])
def exported(request: pytest.FixtureRequest, ctx: RunContext) -> tuple[Path, Path]:
    hf_dir = request.getfixturevalue(request.param)
    art = GGUFExporter(GGUFExportConfig(outtype="f16")).export(
        hf_dir, ctx, ctx.out_dir / f"{request.param}.F16.gguf")
    return hf_dir, art.path


def test_f16_matches_transformers(exported: tuple[Path, Path]) -> None:
    hf_dir, gguf = exported
    ref = TorchRunner().open(hf_dir)
    ids = ref.tokenize(TEXT)
    sess = LlamaCppRunner().open(gguf, n_ctx=128, logits_all=True)
    lp, ref_lp = sess.logprobs(ids), ref.logprobs(ids)
    assert lp.shape == ref_lp.shape == (len(ids) - 1, 49152)
    kld = kl_divergence(ref_lp, lp).mean()
    assert kld < 1e-3, kld
    # and it is a real comparison: a different input gives a very different distribution
    assert kl_divergence(ref_lp, sess.logprobs(list(reversed(ids)))).mean() > 10 * kld


def test_tokenizer_round_trip(exported: tuple[Path, Path]) -> None:
    hf_dir, gguf = exported
    _, tok = load_hf(hf_dir)
    sess = LlamaCppRunner().open(gguf, n_ctx=128)
    ids = sess.tokenize(TEXT)
    assert ids == tok(TEXT, add_special_tokens=False)["input_ids"]
    assert sess.detokenize(ids) == TEXT == tok.decode(ids)


def test_q4_k_m_with_imatrix(exported: tuple[Path, Path], ctx: RunContext) -> None:
    hf_dir, gguf = exported
    model, tok = load_hf(hf_dir)
    imx = imatrix.compute(model, tok, imatrix.CalibrationConfig(samples=2, seq_len=128))
    # 7 matmuls per layer x 2 layers, plus the tied output (token_embd)
    assert len(imx.data) == 15 and imx.tokens == 256
    assert imx.data["blk.0.ffn_down.weight"].shape == (768,)
    assert all(np.all(v >= 0) and v.sum() > 0 for v in imx.data.values())
    plain = gguf_quantize.quantize(gguf, gguf.with_suffix(".q4.gguf"), "Q4_K_M", None, ctx)
    withi = gguf_quantize.quantize(gguf, gguf.with_suffix(".q4i.gguf"), "Q4_K_M", imx, ctx)
    types = Counter(t["type"] for t in withi["tensors"])
    assert types["Q4_K"] > 0 and withi["fallbacks"] == []  # rows of 256/768: no fallback
    assert withi["imatrix_entries"] == 15 and plain["imatrix_entries"] == 0
    # the importance matrix changes the rounding, not the layout
    assert [t["type"] for t in plain["tensors"]] == [t["type"] for t in withi["tensors"]]
    assert gguf.with_suffix(".q4.gguf").read_bytes() != gguf.with_suffix(".q4i.gguf").read_bytes()
    sess = LlamaCppRunner().open(gguf.with_suffix(".q4i.gguf"), n_ctx=64)
    assert len(sess.generate(sess.tokenize(TEXT)[:16], 4).generated_tokens) == 4


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_0"])
def test_other_types(exported: tuple[Path, Path], ctx: RunContext, qtype: str) -> None:
    _, gguf = exported
    info = gguf_quantize.quantize(gguf, gguf.with_suffix(f".{qtype}.gguf"), qtype, None, ctx)
    main = {"Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_M": "Q5_K", "Q4_0": "Q4_0"}[qtype]
    assert Counter(t["type"] for t in info["tensors"])[main] > 0


def test_qwen2_imatrix_uses_gguf_tensor_names(tiny_qwen2: Path) -> None:
    model, tok = load_hf(tiny_qwen2)
    imx = imatrix.compute(model, tok, imatrix.CalibrationConfig(samples=1, seq_len=64))
    expected = {f"blk.{i}.{n}.weight" for i in range(2) for n in (
        "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    assert set(imx.data) == expected | {"token_embd.weight"}
    assert imx.data["blk.1.ffn_down.weight"].shape == (768,)


@pytest.mark.parametrize("fp32", [True, False])
def test_imatrix_matches_a_full_forward(tiny_llama: Path, fp32: bool,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's entry comes from the decoder's output without computing the logits: it
    must equal what the head sees in a full forward pass, as must every other entry."""
    import torch

    monkeypatch.setenv("EDGESMITH_IMATRIX_FP32", "1" if fp32 else "0")
    model, tok = load_hf(tiny_llama)
    calib = imatrix.CalibrationConfig(samples=2, seq_len=64)
    imx = imatrix.compute(model, tok, calib)
    seen: dict[str, list[torch.Tensor]] = {"token_embd.weight": [], "blk.1.ffn_down.weight": []}
    mods = {"token_embd.weight": model.lm_head,
            "blk.1.ffn_down.weight": model.model.layers[1].mlp.down_proj}
    hooks = [m.register_forward_pre_hook(
        lambda _m, i, k=k: seen[k].append(i[0].reshape(-1, i[0].shape[-1])))
        for k, m in mods.items()]
    ids = tok(calib.text(), add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        for i in range(2):
            model(torch.tensor([ids[i * 64 : (i + 1) * 64]]), use_cache=False)
    for h in hooks:
        h.remove()
    for key, xs in seen.items():
        x = torch.cat(xs)
        want = ((x * x).sum(0) / x.shape[0]).numpy()
        rel = np.abs(imx.data[key] - want).max() / np.abs(want).max()
        assert rel < (1e-5 if fp32 else 2e-2), (key, rel)  # bf16 activations: within 2%
