"""GPTQ on tiny Llamas: error below RTN's, groups, act-order, the checkpoint, and the GGUF."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from edgesmith.compress import gptq, gptq_format, layerwise
from edgesmith.compress import qweights as qw
from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ModelError
from edgesmith.models import load_hf

TRAIN_STEPS = 150  # about 30-60 s on two CPU cores, once: the result is cached


def _train_tiny(dest: Path) -> None:
    """A Llama (hidden 128, 2 layers) with its own 4096-token BPE tokenizer, both trained on
    the calibration text: trained weights off any quantization grid, in under a minute."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from edgesmith.bench.quality import corpus

    torch.manual_seed(0)
    text = corpus("calibration")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([text], trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>")
    config = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=4096,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
    seq = 64
    chunks = ids[: len(ids) // seq * seq].reshape(-1, seq)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(TRAIN_STEPS):
        batch = chunks[torch.randint(0, len(chunks), (8,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        opt.step()
        opt.zero_grad()
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, dest)


@pytest.fixture(scope="session")
def tiny_trained_llama() -> Path:
    """A tiny Llama trained on the calibration text, cached in the test cache."""
    dest = Path(os.environ["EDGESMITH_CACHE"]) / f"tiny-trained-llama-{TRAIN_STEPS}"
    if not (dest / "config.json").exists():
        _train_tiny(dest)
    return dest


@pytest.fixture(params=["tiny_llama", "tiny_trained_llama"])
def model_dir(request: pytest.FixtureRequest) -> Path:
    return Path(request.getfixturevalue(request.param))


def _ctx(tmp: Path, model_dir: Path, samples: int = 8, seq_len: int = 64) -> RunContext:
    ctx = RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)
    ctx.extras["calibration"] = CalibrationConfig(samples=samples, seq_len=seq_len)
    ctx.extras["tokenizer"] = load_hf(model_dir)[1]
    return ctx


def _input_hessians(model: Any, tok: Any, samples: int = 8, seq_len: int = 64) \
        -> dict[str, torch.Tensor]:
    """``2 X X^T / n`` of every decoder Linear's inputs in ``model``, on the calibration chunks
    the pass used, computed here with forward hooks on one whole-model forward (independently
    of the pass's layer-by-layer machinery)."""
    from edgesmith.bench.quality import corpus

    ids = tok(corpus("calibration"), add_special_tokens=False)["input_ids"]
    batch = torch.tensor(ids[: samples * seq_len]).reshape(samples, seq_len)
    xs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and ".layers." in name:
            hooks.append(m.register_forward_pre_hook(
                lambda _m, a, name=name: xs.setdefault(name, []).append(a[0].reshape(
                    -1, a[0].shape[-1]).double())))
    with torch.inference_mode():
        model(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    out = {}
    for name, parts in xs.items():
        x = torch.cat(parts)
        out[name] = (2.0 * x.T @ x / x.shape[0]).float()
    return out


SETTINGS = [
    pytest.param(dict(bits=4, group_size=128, sym=True), id="w4g128sym"),
    pytest.param(dict(bits=4, group_size=32, sym=True, act_order=True), id="w4g32sym-act"),
    pytest.param(dict(bits=3, group_size=64, sym=False), id="w3g64asym"),
    pytest.param(dict(bits=8, group_size=32, sym=True), id="w8g32sym"),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_gptq_layer_error_below_rtn(model_dir: Path, settings: dict[str, Any],
                                    tmp_path: Path) -> None:
    """Per Linear, GPTQ's Hessian-weighted error is below RTN's on the same grid.

    The Hessian of a Linear is that of the inputs it gets with everything before it in the
    forward already quantized (true-sequential): exactly the inputs it has in the final
    fake-quantized model, where this test collects them with one plain forward."""
    ctx = _ctx(tmp_path, model_dir)
    model, tok = load_hf(model_dir)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and ".layers." in n}
    p = gptq.GPTQPass(gptq.GPTQConfig(**settings))
    p.run(model, ctx)
    quantized = qw.attached(model)
    assert sorted(quantized) == sorted(original) == sorted(p.report["tensors"])
    hessians = _input_hessians(model, tok)
    spec = p.config.spec()
    rec = {e["name"]: e for e in p.report["layers"]}
    total_gptq = total_rtn = 0.0
    for name, w in original.items():
        q = quantized[name]
        assert (q.bits, q.group_size, q.sym) == (spec.bits, spec.group_size, spec.sym)
        assert torch.equal(model.get_submodule(name).weight, q.dequantize())
        e_gptq = qw.weighted_error(w - q.dequantize(), hessians[name])
        e_rtn = qw.weighted_error(w - qw.quantize_rtn(w, spec).dequantize(), hessians[name])
        assert e_gptq < e_rtn, (name, e_gptq, e_rtn)
        # the manifest's per-layer numbers are these
        assert rec[name]["error"] == pytest.approx(e_gptq, rel=1e-3)
        assert rec[name]["rtn_error"] == pytest.approx(e_rtn, rel=1e-3)
        total_gptq += e_gptq
        total_rtn += e_rtn
    assert total_gptq < 0.85 * total_rtn, (total_gptq, total_rtn)


def test_true_sequential_groups_and_act_order_static_groups(tiny_trained_llama: Path,
                                                            tmp_path: Path) -> None:
    ctx = _ctx(tmp_path, tiny_trained_llama)
    plain = gptq.GPTQPass(gptq.GPTQConfig(bits=4, group_size=32))
    act = gptq.GPTQPass(gptq.GPTQConfig(bits=4, group_size=32, act_order=True))
    m_plain = plain.run(load_hf(tiny_trained_llama)[0], ctx)
    m_act = act.run(load_hf(tiny_trained_llama)[0], ctx)
    assert act.report["quantization_config"]["modules_in_block_to_quantize"] == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    qc = act.report["quantization_config"]
    assert qc["desc_act"] is True and qc["static_groups"] is True
    differ = 0
    for name, q in qw.attached(m_act).items():
        assert q.ordinal and q.gguf_type() == "Q4_0"  # static groups: still llama.cpp blocks
        differ += not torch.equal(q.codes, qw.attached(m_plain)[name].codes)
    assert differ == len(qw.attached(m_act))  # the column order changed every result


def test_group_size_that_does_not_divide_names_the_layer(tmp_path: Path,
                                                         tiny_trained_llama: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=96, intermediate_size=192, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=1, head_dim=32, vocab_size=4096,
        tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    ctx = _ctx(tmp_path, tiny_trained_llama)
    with pytest.raises(ModelError) as err:
        gptq.GPTQPass(gptq.GPTQConfig(group_size=64)).run(model, ctx)
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "96 input features" in msg
    assert "group_size in [32]" in msg
    assert qw.attached(model) == {}  # refused before any layer was changed
    with pytest.raises(ValidationError):
        gptq.GPTQConfig(group_size=48)
    with pytest.raises(ValidationError):
        gptq.GPTQConfig(bits=5)


def test_gptq_quantize_is_not_rtn_and_handles_dead_columns() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g)
    # correlated inputs (activations are): what one column's rounding error can be made up for
    x = torch.randn(512, 32, generator=g) @ torch.randn(32, 128, generator=g) \
        + 0.1 * torch.randn(512, 128, generator=g)
    x[:, 5] = 0.0  # a column no token uses
    h = 2 * x.T @ x / 512
    spec = qw.QuantSpec(4, 32, True)
    q = gptq.gptq_quantize(w, h, spec)
    rtn = qw.quantize_rtn(w, spec)
    assert not torch.equal(q.codes, rtn.codes)
    assert qw.weighted_error(w - q.dequantize(), h) < 0.7 * qw.weighted_error(
        w - rtn.dequantize(), h)
    assert torch.all(q.dequantize()[:, 5] == 0)  # a dead column costs nothing: set to 0
    assert torch.isfinite(q.scales).all()


def test_checkpoint_streams_and_loads_back(tiny_trained_llama: Path, tmp_path: Path) -> None:
    """run_dir (layer by layer from the safetensors) writes a GPTQ checkpoint whose tensors load
    back, through GPTQCheckpoint, equal to the in-memory pass's fake-quantized weights."""
    ctx = _ctx(tmp_path, tiny_trained_llama)
    cfg = gptq.GPTQConfig(bits=4, group_size=32, sym=False, act_order=True)
    out = gptq.GPTQPass(cfg).run_dir(tiny_trained_llama, tmp_path / "ckpt", ctx)
    mem = gptq.GPTQPass(cfg).run(load_hf(tiny_trained_llama)[0], ctx)
    ckpt = gptq_format.GPTQCheckpoint(out)
    assert ckpt.quantized_names() == sorted(qw.attached(mem))
    cfg_json = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg_json["quant_method"] == "gptq" and cfg_json["checkpoint_format"] == "gptq"
    assert (cfg_json["bits"], cfg_json["group_size"], cfg_json["sym"], cfg_json["desc_act"]) \
        == (4, 32, False, True)
    for name in ckpt.quantized_names():
        qweight = ckpt.tensor(f"{name}.qweight")
        w = mem.get_submodule(name).weight
        assert qweight.dtype == torch.int32 and qweight.shape == (w.shape[1] // 8, w.shape[0])
        assert ckpt.tensor(f"{name}.scales").dtype == torch.float16
        assert torch.equal(ckpt.tensor(f"{name}.g_idx"),
                           torch.arange(w.shape[1], dtype=torch.int32) // 32)
        assert torch.equal(ckpt.quantized(name).dequantize(), w)
    assert not any(k.endswith("_proj.weight") for k in ckpt.weight_map)
    # the plain model it dequantizes to computes what the fake-quantized model computes
    plain = gptq_format.dequantize_checkpoint(out, tmp_path / "plain")
    m2, tok = load_hf(plain)
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.")["input_ids"]])
    with torch.inference_mode():
        assert torch.equal(m2(ids).logits, mem(ids).logits)
    # and an in-memory model saves to the same checkpoint layout
    saved = gptq_format.GPTQCheckpoint(
        gptq_format.save_model(mem, tmp_path / "saved", tokenizer=tok))
    for name in ckpt.quantized_names():
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            assert torch.equal(saved.tensor(f"{name}.{k}"), ckpt.tensor(f"{name}.{k}"))


def test_gptq_q4_0_gguf_matches_the_fake_quantized_model(tiny_llama: Path,
                                                         tmp_path: Path) -> None:
    """GPTQ's codes reach the GGUF as Q4_0 blocks: llama.cpp's logits are the fake-quantized
    torch model's (mean KLD < 1e-3); the exporter path: checkpoint -> plain -> F16 -> blocks."""
    from edgesmith.bench.quality import kl_divergence
    from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
    from edgesmith.bench.runners.torch import TorchRunner
    from edgesmith.export import gguf_blocks
    from edgesmith.export.gguf import GGUFExportConfig, GGUFExporter
    from edgesmith.gguf_file import read_header

    ctx = _ctx(tmp_path, tiny_llama)
    ckpt_dir = gptq.GPTQPass(gptq.GPTQConfig(bits=4, group_size=32, act_order=True)).run_dir(
        tiny_llama, tmp_path / "ckpt", ctx)
    plain = gptq_format.dequantize_checkpoint(ckpt_dir, tmp_path / "plain")
    f16 = GGUFExporter(GGUFExportConfig(outtype="f16")).export(plain, ctx, tmp_path / "f.gguf")
    ckpt = gptq_format.GPTQCheckpoint(ckpt_dir)
    res = gguf_blocks.write_quantized(f16.path, tmp_path / "q.gguf",
                                      gguf_blocks.checkpoint_sources(ckpt))
    assert res["not_written"] == [] and len(res["written"]) == 14
    types = {t.name: t.type for t in read_header(tmp_path / "q.gguf").tensors}
    matmuls = {n for n in types if n.startswith("blk.") and "norm" not in n}
    assert {w["tensor"] for w in res["written"]} == matmuls
    assert {types[n] for n in matmuls} == {"Q4_0"} and types["token_embd.weight"] == "F16"
    ref = TorchRunner().open(plain)
    text = "Quantized weights on a small board: the codes GPTQ chose, written as blocks."
    ids = ref.tokenize(text)
    sess = LlamaCppRunner().open(tmp_path / "q.gguf", n_ctx=128, logits_all=True)
    lp = sess.logprobs(ids)
    sess.close()
    kld = float(kl_divergence(ref.logprobs(ids), lp).mean())
    assert kld < 1e-3, kld
    # and that is not true of the unquantized model: the GGUF carries the quantization
    orig = TorchRunner().open(tiny_llama)
    assert float(kl_divergence(orig.logprobs(ids), lp).mean()) > 10 * kld
    assert np.isfinite(lp).all()


def test_layerwise_dir_source_holds_one_layer(tiny_trained_llama: Path, tmp_path: Path) -> None:
    """The streaming source builds the model on the meta device and materializes one layer."""
    source = layerwise.DirSource(tiny_trained_llama, torch.device("cpu"))
    assert all(p.is_meta for p in source.skeleton.parameters())
    tok = load_hf(tiny_trained_llama)[1]
    batches = layerwise.calibration_batches(
        tok, "one two three four five six seven eight nine ten " * 20, 4, 32, 2)
    inputs = source.capture(batches)
    assert [h.shape for h in inputs.hidden] == [(2, 32, 128)] * 2
    model = load_hf(tiny_trained_llama)[0]
    with torch.inference_mode():
        ref = model.model.layers[0](inputs.hidden[0], **inputs.kwargs)
    layer = source.load(0)
    assert not any(p.is_meta for p in layer.parameters())
    assert torch.equal(inputs.run(layer)[0], ref[0] if isinstance(ref, tuple) else ref)
    source.release(0, layer)
    assert all(p.is_meta for p in layer.parameters())


def _autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's QuantLinear.pack loop (the reference layout every GPTQ loader reads)."""
    iw = intweight.astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // 32 * bits, iw.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= iw[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: 32 values in 3 words, 2 values straddling words
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i))
            i += 10
            qweight[row] |= iw[i] << 30
            row += 1
            qweight[row] |= (iw[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= iw[i] << 31
            row += 1
            qweight[row] |= (iw[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= iw[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_is_autogptq_layout(bits: int) -> None:
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(64, 128, generator=g)
    q = qw.quantize_rtn(w, qw.QuantSpec(bits, 32, bits != 3))
    t = gptq_format.to_tensors(q)
    assert np.array_equal(t["qweight"].numpy(), _autogptq_pack(q.codes.numpy().T, bits))
    zm1 = ((q.zeros.numpy().astype(np.int64) - 1) & ((1 << bits) - 1)).T  # [groups, out]
    assert np.array_equal(t["qzeros"].numpy(), _autogptq_pack(zm1.T, bits).T)
    for v2 in (False, True):
        back = gptq_format.from_tensors(gptq_format.to_tensors(q, v2), bits, 32, q.sym, v2)
        assert torch.equal(back.codes, q.codes) and torch.equal(back.zeros, q.zeros)
        assert torch.equal(back.scales, q.scales) and back.g_idx is None
    # v2 stores the zero, not zero - 1
    assert not torch.equal(gptq_format.to_tensors(q, True)["qzeros"], t["qzeros"])


@pytest.mark.skipif(not os.environ.get("EDGESMITH_GPTQMODEL_PATH"),
                    reason="set EDGESMITH_GPTQMODEL_PATH to a folder holding gptqmodel 7.x and "
                           "its pure-Python dependencies (its pins conflict with this venv's)")
def test_gptqmodel_loads_the_checkpoint(tiny_trained_llama: Path, tmp_path: Path) -> None:
    """Another tool loads the checkpoint: gptqmodel's own kernels compute our model's logits."""
    import subprocess
    import sys

    ctx = _ctx(tmp_path, tiny_trained_llama)
    results = {}
    for name, cfg in {"sym-act": dict(bits=4, group_size=32, act_order=True),
                      "asym-v2": dict(bits=4, group_size=128, sym=False,
                                      checkpoint_format="gptq_v2")}.items():
        d = gptq.GPTQPass(gptq.GPTQConfig(**cfg)).run_dir(tiny_trained_llama, tmp_path / name, ctx)
        plain, tok = load_hf(gptq_format.dequantize_checkpoint(d, tmp_path / f"{name}-plain"))
        ids = tok("The quick brown fox jumps over the lazy dog.")["input_ids"]
        with torch.inference_mode():
            ours = torch.log_softmax(plain(torch.tensor([ids])).logits.float(), -1)
            orig = torch.log_softmax(load_hf(tiny_trained_llama)[0](
                torch.tensor([ids])).logits.float(), -1)
        script = (
            "import sys, torch; from gptqmodel import GPTQModel, BACKEND\n"
            "m = GPTQModel.load(sys.argv[1], device='cpu', backend=BACKEND.TORCH, "
            "dtype=torch.bfloat16)\n"
            "assert any(type(x).__module__.startswith('gptqmodel.nn_modules') "
            "for x in m.model.modules())\n"
            "ids = torch.tensor([[int(i) for i in sys.argv[2].split(',')]])\n"
            "with torch.inference_mode():\n"
            "    torch.save(torch.log_softmax(m.model(ids).logits.float(), -1), sys.argv[3])\n")
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2",
               "PYTHONPATH": os.environ["EDGESMITH_GPTQMODEL_PATH"]}
        subprocess.run([sys.executable, "-c", script, str(d), ",".join(map(str, ids)),
                        str(tmp_path / f"{name}.pt")], check=True, env=env)
        theirs = torch.load(tmp_path / f"{name}.pt")
        kld = float((ours.exp() * (ours - theirs)).sum(-1).mean())
        quant = float((orig.exp() * (orig - ours)).sum(-1).mean())
        results[name] = (kld, quant)
        assert kld < 0.2 * quant, results  # bf16 noise only, well below the quantization's own
