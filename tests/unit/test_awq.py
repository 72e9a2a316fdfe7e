"""AWQ: exact folding (Llama, GQA, Gemma's 1 + w norms), KLD below RTN's on a trained tiny
Llama, the exporters' grid, and the errors (group size, unknown structure)."""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from edgesmith.bench.quality import corpus, kl_divergence
from edgesmith.compress import awq
from edgesmith.compress import qweights as qw
from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ModelError
from edgesmith.models import load_hf

TRAIN_STEPS = 600  # about 30 s on one CPU core, once: the result is cached
VOCAB = 1024  # a small vocabulary learns context in that time (held-out loss 4.6, unigram 6.0)


def _train_tiny_mha(dest: Path) -> None:
    """A Llama (hidden 128, 2 layers, 4 heads each with its own k/v head, so the v -> o scaling
    is taken) with its own 1024-token BPE tokenizer, both trained on the calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    text = corpus("calibration")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    config = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, head_dim=32, vocab_size=VOCAB,
        max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is faster on a shared CPU, and exact
    try:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        seq = 64
        chunks = ids[: len(ids) // seq * seq].reshape(-1, seq)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0,
                                betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=TRAIN_STEPS,
                                                    pct_start=0.1)
        g = torch.Generator().manual_seed(0)
        for _ in range(TRAIN_STEPS):
            batch = chunks[torch.randint(0, len(chunks), (8,), generator=g)]
            model(input_ids=batch, labels=batch).loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
    finally:
        torch.set_num_threads(threads)
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)


@pytest.fixture(scope="session")
def tiny_trained_mha() -> Path:
    """A tiny multi-head Llama trained on the calibration text, cached in the test cache."""
    dest = Path(os.environ["EDGESMITH_CACHE"]) / f"tiny-trained-llama-mha-{VOCAB}-{TRAIN_STEPS}"
    if not (dest / "config.json").exists():
        _train_tiny_mha(dest)
    return dest


def _ids(tok: Any, n: int = 8, seq_len: int = 128) -> torch.Tensor:
    return awq.calibration_ids(tok, CalibrationConfig(samples=n, seq_len=seq_len))


def _random(arch: str, kv_heads: int = 2, hidden: int = 64, **extra: Any) -> Any:
    """A small random model whose norm weights are far from their init (so a fold that
    mishandles them shows), in fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        arch, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=hidden // 4,
        vocab_size=256, max_position_embeddings=256, **extra)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.normal_(0.3, 0.4)
    return model


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def _norm_weights(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "layernorm" in n}


def _rtn(model: Any, spec: qw.QuantSpec) -> Any:
    """``model`` with every decoder Linear rounded to nearest on ``spec``'s grid."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                mod.weight.copy_(qw.quantize_rtn(mod.weight, spec, name).dequantize())
    return m


def _heldout_kld(ref: Any, model: Any, tok: Any, windows: int = 8, ctx: int = 256) -> float:
    ids = tok(corpus("heldout"), add_special_tokens=False)["input_ids"][: windows * ctx]
    batch = torch.tensor(ids).reshape(windows, ctx)
    ref_lp = torch.log_softmax(_logits(ref, batch), -1).numpy()
    lp = torch.log_softmax(_logits(model, batch), -1).numpy()
    return float(np.mean(kl_divergence(ref_lp, lp)))


# --- (a) folding is exact ---------------------------------------------------------------------
def test_folded_model_equals_original_trained(tiny_trained_mha: Path) -> None:
    model, tok = load_hf(tiny_trained_mha)
    ids = _ids(tok)
    before, norms = _logits(model, ids), _norm_weights(model)
    report = awq.awq(model, ids, awq.AWQConfig(group_size=32, clip=False, n_grid=8))
    assert [g["group"] for g in report["layers"][0]["groups"]] == ["qkv", "o", "gate_up", "down"]
    diff = float((_logits(model, ids) - before).abs().max())
    assert diff < 1e-4, diff
    # ... and the scales are not all 1: the weights moved
    moved = max(float((p - norms[n]).abs().max()) for n, p in _norm_weights(model).items())
    assert moved > 1e-2, moved
    # the scale search never does worse than no scaling (s = 1 is one of its candidates)
    for layer in report["layers"]:
        for g in layer["groups"]:
            assert g["loss"] <= g["loss_plain"], g


@pytest.mark.parametrize("arch,kv,extra", [
    pytest.param("llama", 2, {}, id="llama-gqa"),
    pytest.param("mistral", 4, {}, id="mistral"),
    pytest.param("qwen2", 2, {}, id="qwen2-bias"),
    pytest.param("qwen3", 4, {}, id="qwen3-qk-norm"),
    pytest.param("gemma", 4, {}, id="gemma-1+w"),
    pytest.param("gemma2", 2, {}, id="gemma2-1+w"),
    pytest.param("gemma3_text", 4, {"sliding_window": 16}, id="gemma3-1+w-sliding"),
])
def test_folded_model_equals_original(arch: str, kv: int, extra: dict[str, Any]) -> None:
    model = _random(arch, kv, **extra)
    if arch == "qwen2":  # q/k/v biases: v's is divided when v -> o is folded
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.bias is not None:
                    m.bias.normal_(0, 0.5)
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(0))
    before, norms = _logits(model, ids), _norm_weights(model)
    report = awq.awq(model, ids, awq.AWQConfig(group_size=32, clip=False, n_grid=4))
    diff = float((_logits(model, ids) - before).abs().max())
    assert diff < 1e-4, diff
    assert max(float((p - norms[n]).abs().max()) for n, p in _norm_weights(model).items()) > 1e-2
    groups = [g["group"] for g in report["layers"][0]["groups"]]
    assert groups == (["qkv", "o", "gate_up", "down"] if kv == 4 else ["qkv", "gate_up", "down"])


# --- (c) Gemma's (1 + w) norms ----------------------------------------------------------------
def test_gemma_norm_offset_is_found_and_folded_as_one_plus_w() -> None:
    gemma, llama = _random("gemma", 4), _random("llama", 4)
    g_layer, l_layer = gemma.model.layers[0], llama.model.layers[0]
    assert awq.norm_offset(g_layer.input_layernorm) == 1.0
    assert awq.norm_offset(l_layer.input_layernorm) == 0.0
    assert awq.norm_offset(torch.nn.LayerNorm(64)) is None  # a bias: not a pure scale
    group = awq.layer_groups(gemma, 0, g_layer)[0]
    assert (group.name, group.prev, group.offset) == ("qkv", "input_layernorm", 1.0)
    s = torch.linspace(0.5, 2.0, 64)
    w = g_layer.input_layernorm.weight.detach().clone()
    awq.fold(g_layer, group, s)
    assert torch.allclose(g_layer.input_layernorm.weight, (1 + w) / s - 1, atol=1e-6)
    # folding it as a plain weight (w / s) would change the output: the check catches that
    bad = copy.deepcopy(gemma.model.layers[1])
    plain = awq.Group("qkv", "input_layernorm", 0.0, group.linears, "self_attn")
    x = torch.randn(1, 16, 64)
    pos = torch.arange(16)[None]
    kw = {"position_embeddings": gemma.model.rotary_emb(x, pos), "position_ids": pos,
          "attention_mask": None}
    assert awq.check_folding(bad, [plain], kw, x) > 1e-2
    assert awq.check_folding(bad, [group], kw, x) < 1e-5


# --- (b) AWQ + RTN below plain RTN ------------------------------------------------------------
def _with_outlier_channels(model: Any, factor: float = 20.0) -> Any:
    """The same function with the activation outliers of large LLMs: two channels of every norm
    scaled up by ``factor`` and the weight columns that read them scaled down by it."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in m.model.layers:
            for norm, readers in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                ch = torch.randperm(norm.weight.numel(), generator=g)[:2]
                norm.weight[ch] *= factor
                parent = layer.self_attn if readers[0] == "q_proj" else layer.mlp
                for r in readers:
                    getattr(parent, r).weight[:, ch] /= factor
    return m


def _kld_rtn_and_awq(ref: Any, tok: Any, model: Any, group_size: int, sym: bool) \
        -> tuple[float, float]:
    spec = qw.QuantSpec(4, group_size, sym)
    rtn = _heldout_kld(ref, _rtn(model, spec), tok)
    scaled = copy.deepcopy(model)
    awq.awq(scaled, _ids(tok, 16), awq.AWQConfig(bits=4, group_size=group_size, sym=sym))
    return rtn, _heldout_kld(ref, _rtn(scaled, spec), tok)


@pytest.mark.parametrize("group_size,sym", [(32, False), (128, False), (32, True)],
                         ids=["w4g32-asym-Q4_1", "w4g128-asym", "w4g32-sym-Q4_0"])
def test_awq_then_rtn_beats_rtn_on_heldout(tiny_trained_mha: Path, group_size: int,
                                           sym: bool) -> None:
    """On the trained model as it is (no salient channels to speak of: the gain is small)."""
    ref, tok = load_hf(tiny_trained_mha)
    rtn, with_awq = _kld_rtn_and_awq(ref, tok, ref, group_size, sym)
    print(f"\nheld-out KLD w4 g{group_size} {'sym' if sym else 'asym'}: RTN {rtn:.6f}, "
          f"AWQ + RTN {with_awq:.6f} ({with_awq / rtn:.3f}x)")
    assert with_awq < rtn, (with_awq, rtn)


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_recovers_what_outlier_channels_cost_rtn(tiny_trained_mha: Path,
                                                     group_size: int) -> None:
    """Where activations have outlier channels (as in large LLMs), RTN loses those channels'
    small weights and AWQ's scales give them back: KLD below half of RTN's."""
    ref, tok = load_hf(tiny_trained_mha)
    outliers = _with_outlier_channels(ref)
    diff = float((_logits(outliers, _ids(tok, 2)) - _logits(ref, _ids(tok, 2))).abs().max())
    assert diff < 1e-3, diff  # the same function
    rtn, with_awq = _kld_rtn_and_awq(ref, tok, outliers, group_size, False)
    print(f"\nheld-out KLD w4 g{group_size} asym, outlier channels: RTN {rtn:.6f}, "
          f"AWQ + RTN {with_awq:.6f} ({with_awq / rtn:.3f}x)")
    assert with_awq < 0.5 * rtn, (with_awq, rtn)


def test_search_grid_is_the_exporters_grid() -> None:
    """What AWQ's searches round to is what qweights' RTN writes (Q4_1/Q4_0 at group 32)."""
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(0))
    for bits, gs, sym in [(4, 32, False), (4, 32, True), (3, 64, False), (8, 128, True)]:
        spec = qw.QuantSpec(bits, gs, sym)
        assert torch.equal(awq.fake_quant(w, spec), qw.quantize_rtn(w, spec).dequantize())
    assert awq.AWQConfig().spec() == qw.QuantSpec(4, 128, False)  # asymmetric, as AWQ


def test_clip_search_never_worse_than_no_clip() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    w[:, 7] *= 8  # an outlier column: clipping it helps the other 31 of its group
    x = torch.randn(600, 128, generator=g)
    spec = qw.QuantSpec(4, 32, False)
    max_val = awq.search_clip(w, x, spec, n_grid=20)
    assert max_val.shape == (64, 4)
    lin = torch.nn.Linear(128, 64, bias=False).requires_grad_(False)
    lin.weight.copy_(w)
    awq.apply_clip(lin, max_val, 32)
    err_clip = float((x @ (awq.fake_quant(lin.weight, spec) - w).T).pow(2).mean())
    err_plain = float((x @ (awq.fake_quant(w, spec) - w).T).pow(2).mean())
    assert err_clip < err_plain
    assert bool((max_val < w.abs().reshape(64, 4, 32).amax(-1)).any())


# --- the plug point, and the errors ---------------------------------------------------------
def test_pass_runs_from_a_recipe_step(tiny_trained_mha: Path, tmp_path: Path) -> None:
    model, tok = load_hf(tiny_trained_mha)
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path, progress=make_progress(quiet=True))
    ctx.extras["tokenizer"] = tok
    ctx.extras["calibration"] = CalibrationConfig(samples=4, seq_len=64)
    before = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    out = awq.AWQPass(awq.AWQConfig(n_grid=4)).run(model, ctx)
    assert out is model
    (report,) = ctx.extras["pass_reports"]
    assert report["pass"] == "awq" and report["settings"]["group_size"] == 128
    assert report["tokens"] == 256
    assert "model.layers.1.post_attention_layernorm.weight" in report["changed"]
    assert "model.layers.0.self_attn.v_proj.weight" in report["changed"]  # o's scales: its rows
    assert len(report["layers"]) == 2 and report["layers"][1]["clipped"] == [
        "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert not torch.equal(model.model.layers[0].mlp.down_proj.weight, before)
    with pytest.raises(ValidationError):
        awq.AWQConfig(group_size=48)
    with pytest.raises(ValidationError):
        awq.AWQConfig(bits=5)
    with pytest.raises(ValidationError):
        awq.AWQConfig(alpha=0.5)  # type: ignore[call-arg]
    del ctx.extras["tokenizer"]
    with pytest.raises(ModelError, match="tokenizer"):
        awq.AWQPass().run(model, ctx)


def test_group_size_that_does_not_divide_names_the_layer() -> None:
    model = _random("llama", 1, hidden=96)  # 96 input columns: only group 32 divides them
    norms = _norm_weights(model)
    with pytest.raises(ModelError) as err:
        awq.awq(model, torch.zeros(2, 16, dtype=torch.long), awq.AWQConfig(group_size=64))
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "96 input features" in msg
    assert "group_size in [32]" in msg
    assert all(torch.equal(p, norms[n]) for n, p in _norm_weights(model).items())


@pytest.mark.parametrize("arch", ["phi3", "gpt2"])
def test_unknown_structure_is_refused_before_any_work(arch: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch == "phi3":  # fused qkv_proj and gate_up_proj
        config = AutoConfig.for_model(arch, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=256, pad_token_id=0,
                                      bos_token_id=0, eos_token_id=0)
    else:  # no model.layers
        config = AutoConfig.for_model(arch, n_embd=64, n_layer=1, n_head=4, vocab_size=256)
    model = AutoModelForCausalLM.from_config(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ModelError, match="AWQ does not know the structure"):
        awq.awq(model, torch.zeros(2, 16, dtype=torch.long), awq.AWQConfig(group_size=32))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_every_layer_gets_its_own_mask_and_rotary_embeddings() -> None:
    """Gemma 3 alternates sliding-window layers (local rotary base) and global ones: the inputs
    the searches see are the model's own only if each layer is run with its own arguments."""
    model = _random("gemma3_text", 4, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    layers = awq.decoder_layers(model)
    x, kwargs_of = awq._capture(model, layers, ids)
    with torch.no_grad():
        want = model.model(input_ids=ids, use_cache=False).last_hidden_state
        h = x
        for layer, kw in zip(layers, kwargs_of, strict=True):
            h = layer(h, **kw)  # kwargs of one chunk, broadcast over the batch
        assert float((model.model.norm(h) - want).abs().max()) < 1e-5
        h = x
        for layer in layers:  # layer 0's arguments everywhere: not the model
            h = layer(h, **kwargs_of[0])
        assert float((model.model.norm(h) - want).abs().max()) > 1e-3


def test_awq_then_gptq_composes(tiny_trained_mha: Path, tmp_path: Path) -> None:
    """AWQ hands GPTQ an ordinary model: the composed passes attach codes to every Linear and
    give a held-out KLD below plain RTN's at the same settings."""
    from edgesmith.compress import gptq

    ref, tok = load_hf(tiny_trained_mha)
    model = copy.deepcopy(ref)
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path, progress=make_progress(quiet=True))
    ctx.extras["tokenizer"] = tok
    ctx.extras["calibration"] = CalibrationConfig(samples=16, seq_len=128)
    model = awq.AWQPass(awq.AWQConfig(group_size=32, sym=True, clip=False)).run(model, ctx)
    model = gptq.GPTQPass(gptq.GPTQConfig(bits=4, group_size=32, sym=True)).run(model, ctx)
    assert [r["pass"] for r in ctx.extras["pass_reports"]] == ["awq", "gptq"]
    assert len(qw.attached(model)) == 14
    composed = _heldout_kld(ref, model, tok)
    rtn = _heldout_kld(ref, _rtn(ref, qw.QuantSpec(4, 32, True)), tok)
    print(f"\nheld-out KLD w4 g32 sym: RTN {rtn:.6f}, AWQ + GPTQ {composed:.6f}")
    assert composed < rtn, (composed, rtn)
