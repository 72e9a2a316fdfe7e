"""Unstructured pruning: the sparsity reached per Linear, N:M patterns, lm_head and embeddings
untouched, Wanda's mask from the real inputs, SparseGPT's lower output error, and the report's
size warning."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.compress.prune import SPARSITY_WARNING, PruneConfig, PrunePass
from edgesmith.compress.prune_unstructured import nm_mask, row_mask, sparsegpt
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ModelError


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


@pytest.fixture(scope="module")
def model(tok: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
        max_position_embeddings=256, tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _run(model: Any, tok: Any, tmp: Path, **kw: Any) -> tuple[Any, dict[str, Any]]:
    ctx = RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)
    ctx.extras["calibration"] = CalibrationConfig(samples=4, seq_len=64)
    ctx.extras["tokenizer"] = tok
    out = PrunePass(PruneConfig(**kw)).run(copy.deepcopy(model), ctx)
    return out, ctx.extras["pass_reports"][-1]


def _decoder_linears(m: Any) -> dict[str, torch.Tensor]:
    return {n: mod.weight for n, mod in m.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in n}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("how", [{"sparsity": 0.5}, {"pattern": "2:4"}], ids=["50pct", "2of4"])
def test_sparsity_reached_and_reported(model: Any, tok: Any, tmp_path: Path, method: str,
                                       how: dict[str, Any]) -> None:
    pruned, rep = _run(model, tok, tmp_path, method=method, **how)
    weights = _decoder_linears(pruned)
    assert len(rep["layers"]) == len(weights) == 14
    for e in rep["layers"]:
        w = weights[e["name"]]
        assert e["sparsity"] == pytest.approx(float((w == 0).float().mean()), abs=1e-4)
        assert 0.5 <= e["sparsity"] < 0.52
        if "pattern" in how:  # at least 2 zeros in every group of 4 inputs of every row
            assert int((w.reshape(w.shape[0], -1, 4) == 0).sum(-1).min()) >= 2
    # lm_head and embeddings untouched
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)
    assert torch.equal(pruned.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert rep["untouched"] == ["lm_head", "model.embed_tokens"]
    zeroed = sum(w.numel() // 2 for w in weights.values())
    assert rep["params_after"] == rep["params_before"]  # the same dense shapes
    assert rep["nonzero_before"] - rep["nonzero_after"] == pytest.approx(zeroed, rel=0.02)
    assert SPARSITY_WARNING in rep["warnings"]


def test_magnitude_global_and_named_lm_head(model: Any, tok: Any, tmp_path: Path) -> None:
    pruned, rep = _run(model, tok, tmp_path, method="magnitude", sparsity=0.3, scope="global",
                       modules=["lm_head"])
    per = {e["name"]: e["sparsity"] for e in rep["layers"]}
    assert per["lm_head"] > 0.2 and len({round(v, 2) for v in per.values()}) > 1
    total = sum(e["params"] for e in rep["layers"])
    assert sum(e["sparsity"] * e["params"] for e in rep["layers"]) / total == \
        pytest.approx(0.3, abs=1e-3)
    assert rep["untouched"] == ["model.embed_tokens"]
    assert not torch.equal(pruned.lm_head.weight, model.lm_head.weight)


def test_wanda_mask_from_the_inputs(model: Any, tok: Any, tmp_path: Path) -> None:
    """Layer 0's q_proj: the mask is the lowest half per row of |W| * ||x|| over the very
    calibration tokens, computed here with a hook on the whole original model."""
    from edgesmith.bench.quality import corpus

    ids = tok(corpus("calibration"), add_special_tokens=False)["input_ids"][:4 * 64]
    xs: list[torch.Tensor] = []
    q = model.model.layers[0].self_attn.q_proj
    h = q.register_forward_pre_hook(lambda _m, a: xs.append(a[0].detach()))
    with torch.no_grad():
        model(torch.tensor(ids).reshape(4, 64))
    h.remove()
    norm = torch.cat(xs).reshape(-1, 128).pow(2).sum(0).sqrt()
    want = row_mask(q.weight.detach().abs() * norm, 0.5)
    pruned, _ = _run(model, tok, tmp_path, method="wanda", sparsity=0.5)
    got = pruned.model.layers[0].self_attn.q_proj.weight == 0
    assert (got == want).float().mean() > 0.999
    assert not torch.equal(got, row_mask(q.weight.detach().abs(), 0.5))  # not magnitude's


def test_sparsegpt_error_below_mask_only() -> None:
    """On correlated inputs, SparseGPT's updated weights reproduce W x better than keeping the
    same fraction of weights by Wanda's score without an update, both at 50% and 2:4."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(2048, 64, generator=g) @ mix  # correlated columns
    w = torch.randn(32, 64, generator=g)
    H = 2 * x.T @ x / len(x)
    wanda_score = w.abs() * x.pow(2).sum(0).sqrt()
    for nm, mask in ((None, row_mask(wanda_score, 0.5)), ((2, 4), nm_mask(wanda_score, 2, 4))):
        new = sparsegpt(w, H, 0.5, nm, block_size=32)
        assert float((new == 0).float().mean()) == 0.5
        if nm:
            assert int((new.reshape(32, -1, 4) == 0).sum(-1).min()) == 2
        err_sgpt = ((x @ (w - new).T) ** 2).mean()
        err_mask = ((x @ (w * ~mask).T) ** 2).mean()
        assert err_sgpt < 0.7 * err_mask, (nm, err_sgpt, err_mask)


def test_nm_needs_a_multiple_width() -> None:
    with pytest.raises(ModelError, match="cannot be pruned 2:4"):
        nm_mask(torch.rand(4, 10), 2, 4)


def test_config_refusals() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="N:M with 0 < N < M"):
        PruneConfig(method="wanda", pattern="4:2")
    with pytest.raises(ValidationError, match="method magnitude only"):
        PruneConfig(method="sparsegpt", modules=["lm_head"])
    with pytest.raises(ValidationError, match="scope: global applies to method magnitude"):
        PruneConfig(method="wanda", scope="global")


def test_compress_warns_that_a_sparse_gguf_is_not_smaller(tiny_llama, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import shutil
    import subprocess
    import sys

    model = tmp_path / "tiny"
    shutil.copytree(tiny_llama, model)  # its own cache entry
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: sparse\ntarget: raspberry-pi-5\n"
        "calibration: {source: builtin:calibration, samples: 2, seq_len: 64}\n"
        "eval: {ctx: 128, windows: 2}\n"
        "steps:\n  - prune: {method: magnitude, sparsity: 0.5}\n"
        "  - export: {format: gguf, outtype: f16}\n  - gguf_quantize: {type: Q8_0}\n"
        "gates: {max_kld: 50}\n")
    r = subprocess.run([sys.executable, "-m", "edgesmith.cli", "compress", str(model),
                        "--recipe", str(recipe), "-o", str(tmp_path / "out"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads(r.stdout)
    size_mb = man["artifacts"][0]["size_bytes"] / 1e6
    warned = [w for w in man["warnings"] if w.startswith(SPARSITY_WARNING)]
    assert len(warned) == 1 and f"{size_mb:.1f} MB" in warned[0]


def test_sparsity_warning_only_where_the_format_stores_every_zero(tmp_path: Path) -> None:
    from edgesmith import recipe as recipe_mod
    from edgesmith.context import Artifact
    from edgesmith.pipeline import _sparsity_warnings

    r = recipe_mod.load("iphone-15-sparse-int8")
    assert _sparsity_warnings(r, Artifact(tmp_path, "coreml", {"type": "sparse_int8"}), 1) == []
    for fmt, typ in (("coreml", "int8"), ("gguf", "Q8_0"), ("onnx", "q4"),
                     ("litert", "dynamic_wi8_afp32")):
        (w,) = _sparsity_warnings(r, Artifact(tmp_path, fmt, {"type": typ}), 2_000_000)
        assert w.startswith(SPARSITY_WARNING) and f"this {fmt} artifact: 2.0 MB" in w
    # a structured prune makes no zeros to warn about
    assert _sparsity_warnings(recipe_mod.load("raspberry-pi-4-pruned-q4km"),
                              Artifact(tmp_path, "gguf", {"type": "Q4_K_M"}), 1) == []
