"""Structured pruning on tiny Llamas: the smaller model computes exactly what the original does
with the removed heads/channels silenced, GQA stays consistent, the refit lowers the error, the
most input-like layer goes, and the result goes through transformers, llama.cpp's converter,
the quantizer and llama.cpp (compress through the CLI)."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.compress.prune import PruneConfig, PrunePass
from edgesmith.context import RunContext, make_progress
from edgesmith.models import load_hf


@pytest.fixture(scope="module")
def tok(smollm2_hf_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_hf_dir)


def _model(tok: Any, layers: int = 4) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=512, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=2, vocab_size=len(tok),
        max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    return model


def _ctx(tmp: Path, tok: Any) -> RunContext:
    ctx = RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)
    ctx.extras["calibration"] = CalibrationConfig(samples=4, seq_len=64)
    ctx.extras["tokenizer"] = tok
    return ctx


def _ids(tok: Any) -> torch.Tensor:
    from edgesmith.bench.quality import corpus

    return torch.tensor(tok(corpus("heldout")[:3000])["input_ids"][:128]).reshape(2, 64)


def _prune(model: Any, tmp: Path, tok: Any, **kw: Any) -> tuple[Any, dict[str, Any]]:
    ctx = _ctx(tmp, tok)
    out = PrunePass(PruneConfig(method="structured", **kw)).run(model, ctx)
    return out, ctx.extras["pass_reports"][-1]


def test_heads_and_channels_equal_silenced_original(tmp_path: Path, tok: Any) -> None:
    """Without the refit, the pruned model is the original with the removed query heads' and
    FFN channels' columns of o_proj/down_proj zeroed (and removed KV groups' heads with them)."""
    orig = _model(tok)
    pruned, rep = _prune(copy.deepcopy(orig), tmp_path, tok, ffn_keep=0.5, heads_keep=0.5,
                         kv_groups_keep=0.5, update=False, multiple_of=64)
    cfg = pruned.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
            cfg.intermediate_size, cfg.num_hidden_layers) == (2, 1, 16, 256, 4)
    silenced = copy.deepcopy(orig)
    for rec, layer in zip(rep["layers"], silenced.model.layers, strict=True):
        (group,) = rec["kv_groups_kept"]
        heads = rec["heads_kept"]
        assert len(heads) == 2 and all(h // 4 == group for h in heads)  # GQA: its own group's
        with torch.no_grad():
            for h in set(range(8)) - set(heads):
                layer.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    # channels: which of the original up_proj rows each kept row is
    for p_layer, s_layer in zip(pruned.model.layers, silenced.model.layers, strict=True):
        up_o, up_p = s_layer.mlp.up_proj.weight, p_layer.mlp.up_proj.weight
        kept = [int((up_o - r).abs().sum(1).argmin()) for r in up_p]
        assert len(set(kept)) == 256
        with torch.no_grad():
            drop = sorted(set(range(512)) - set(kept))
            s_layer.mlp.down_proj.weight[:, drop] = 0
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, silenced(ids).logits, atol=1e-4, rtol=1e-4)
        assert (pruned(ids).logits - orig(ids).logits).abs().max() > 1e-2


def test_config_saved_and_reloaded_by_transformers(tmp_path: Path, tok: Any) -> None:
    pruned, rep = _prune(_model(tok), tmp_path, tok, ffn_keep=0.75, kv_groups_keep=0.5,
                         drop_layers=1, multiple_of=128)
    pruned.save_pretrained(tmp_path / "out", safe_serialization=True)
    tok.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"]) == (3, 4, 1, 16, 384)
    again, _ = load_hf(tmp_path / "out")  # every weight from the files, shapes from config
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, pruned(ids).logits)
    n = sum(p.numel() for p in again.parameters())
    assert rep["params_after"] == n < rep["params_before"]
    layer = 128 * 64 + 2 * 128 * 16 + 64 * 128 + 3 * 128 * 384 + 2 * 128  # attn + mlp + norms
    assert n == 3 * layer + len(tok) * 128 + 128
    assert [i for i, _ in enumerate(again.model.layers)] == [0, 1, 2]
    assert [m.self_attn.layer_idx for m in again.model.layers] == [0, 1, 2]


def test_refit_lowers_the_error(tmp_path: Path, tok: Any) -> None:
    orig = _model(tok)
    ids = _ids(tok)
    errs = {}
    for update in (False, True):
        m, _ = _prune(copy.deepcopy(orig), tmp_path, tok, ffn_keep=0.5, heads_keep=0.5,
                      update=update)
        with torch.no_grad():
            errs[update] = torch.nn.functional.kl_div(
                m(ids).logits.log_softmax(-1), orig(ids).logits.log_softmax(-1),
                log_target=True, reduction="batchmean").item()
    assert errs[True] < 0.8 * errs[False], errs


def test_drops_the_layer_that_changes_its_input_least(tmp_path: Path, tok: Any) -> None:
    orig = _model(tok)
    with torch.no_grad():  # layer 2 becomes the identity: its residual branches write nothing
        orig.model.layers[2].self_attn.o_proj.weight.zero_()
        orig.model.layers[2].mlp.down_proj.weight.zero_()
    pruned, rep = _prune(copy.deepcopy(orig), tmp_path, tok, drop_layers=1)
    assert rep["dropped_layers"] == [2] and rep["block_influence"][2] < 1e-6
    assert min(rep["block_influence"][i] for i in (0, 1, 3)) > 1e-3
    ids = _ids(tok)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, orig(ids).logits, atol=1e-4, rtol=1e-4)


def test_config_errors() -> None:
    with pytest.raises(ValidationError, match="nothing to remove"):
        PruneConfig(method="structured")
    with pytest.raises(ValidationError, match="sparsity do not apply to method structured"):
        PruneConfig(method="structured", ffn_keep=0.5, sparsity=0.5)
    with pytest.raises(ValidationError, match="ffn_keep do not apply to method wanda"):
        PruneConfig(method="wanda", ffn_keep=0.5)


RECIPE = """name: tiny-pruned-q4km
target: raspberry-pi-4
calibration: {samples: 4, seq_len: 128}
eval: {ctx: 128, windows: 2}
steps:
  - prune: {method: structured, ffn_keep: 0.5, kv_groups_keep: 0.5, drop_layers: 1,
            multiple_of: 128}
  - export: {format: gguf, outtype: f16}
  - gguf_quantize: {type: Q4_K_M, imatrix: true}
gates:
  max_ppl_increase_pct: 100000
  max_kld: 100
"""


def test_compress_pruned_tiny_llama_through_llama_cpp(tiny_llama: Path, copy_model: Any,
                                                      tmp_path: Path, watched: Any) -> None:
    """The pruned model goes through the converter, the imatrix, the quantizer and llama.cpp;
    the GGUF has the pruned structure; the manifest has the pass's report."""
    import gguf

    model = copy_model(tiny_llama)  # its own cache entry
    (tmp_path / "r.yaml").write_text(RECIPE)
    p = watched([sys.executable, "-m", "edgesmith.cli", "compress", str(model), "--recipe",
                 str(tmp_path / "r.yaml"), "-o", str(tmp_path / "out"), "--threads", "2"],
                env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    (rep,) = man["passes"]
    assert rep["pass"] == "prune" and rep["method"] == "structured"
    assert rep["structure_after"]["num_hidden_layers"] == 1
    assert rep["params_after"] < rep["params_before"]
    art = man["artifacts"][0]
    reader = gguf.GGUFReader(str(tmp_path / "out" / art["path"]))
    meta = {f.name: f.parts[f.data[0]].tolist() for f in reader.fields.values()
            if f.name.startswith("llama.") and f.data}
    assert meta["llama.block_count"] == [1]
    assert meta["llama.feed_forward_length"] == [384]
    assert meta["llama.attention.head_count"] == [2]
    assert meta["llama.attention.head_count_kv"] == [1]
    shapes = {t.name: list(t.shape) for t in reader.tensors}
    assert shapes["blk.0.ffn_down.weight"][0] == 384 and "blk.1.attn_q.weight" not in shapes
    # llama.cpp ran it: real quality numbers against the unpruned reference
    assert art["quality"]["tokens_scored"] == 2 * 63 and art["quality"]["kld_mean"] > 0
    assert man["baseline"]["quality"]["kld_mean"] > 1e-3  # the pruned F16 differs from the input
    assert man["warnings"] == []
