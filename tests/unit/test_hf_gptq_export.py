"""The hf-gptq exporter on tiny Llamas: the checkpoint's tensors and quantization_config, its
weights and logits against the GPTQ pass's fake-quantized model, copies and refusals of GPTQ
inputs, group-size errors, a kill -9 mid-write, and onnxruntime-genai's model builder loading
it (its own venv: skipped with the reason when it is not there)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from edgesmith.compress import gptq, gptq_format
from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ModelError
from edgesmith.export import EXPORTERS
from edgesmith.export.hf_gptq import HFGPTQExportConfig, HFGPTQExporter
from edgesmith.fsutil import is_temp_name, sweep_stale
from edgesmith.models import load_hf

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import hf_gptq_interop as interop

CALIB = dict(samples=8, seq_len=64)
TEXT = "The quick brown fox jumps over the lazy dog, and the small board runs the model."
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _ctx(tmp: Path) -> RunContext:
    return RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)


def _fake_quantized(model_dir: Path, cfg: HFGPTQExportConfig, tmp: Path) -> Any:
    """The GPTQ pass run in memory on the same model and calibration: the reference."""
    ctx = _ctx(tmp)
    ctx.extras["calibration"] = CalibrationConfig(samples=cfg.samples, seq_len=cfg.seq_len)
    model, tok = load_hf(model_dir)
    ctx.extras["tokenizer"] = tok
    return gptq.GPTQPass(cfg.gptq_config()).run(model, ctx)


def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits.float()


SETTINGS = [
    pytest.param(dict(), id="default-w4g128sym-act"),
    pytest.param(dict(bits=3, group_size=64, sym=False, act_order=False), id="w3g64asym"),
    pytest.param(dict(bits=8, group_size=32), id="w8g32sym-act"),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_checkpoint_tensors_weights_and_logits(tiny_llama: Path, tmp_path: Path,
                                               settings: dict[str, Any]) -> None:
    cfg = HFGPTQExportConfig(**settings, **CALIB)
    dest = tmp_path / "out" / "tiny.gptq"
    art = EXPORTERS["hf-gptq"](cfg).export(tiny_llama, _ctx(tmp_path), dest)
    assert art.path == dest and art.format == "hf-gptq" and dest.is_dir()
    assert [p.name for p in dest.parent.iterdir()] == ["tiny.gptq"]  # no temp folder left
    ckpt = gptq_format.GPTQCheckpoint(dest)
    qc = json.loads((dest / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((dest / "quantize_config.json").read_text()) == art.meta[
        "quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["desc_act"]) == (
        "gptq", cfg.bits, cfg.group_size, cfg.sym, cfg.act_order)
    assert qc["checkpoint_format"] == "gptq" and qc["damp_percent"] == cfg.damp
    names = [f"model.layers.{i}.{n}" for i in range(2) for n in LINEARS]
    assert ckpt.quantized_names() == sorted(names) == sorted(art.meta["quantized_tensors"])

    ref = _fake_quantized(tiny_llama, cfg, tmp_path)
    src = dict(ref.state_dict())
    per_word = 32 // cfg.bits if cfg.bits != 3 else None
    for name in names:
        out_f, in_f = src[f"{name}.weight"].shape
        n_groups = in_f // cfg.group_size
        t = {k: ckpt.tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        packed_in = in_f // per_word if per_word else in_f * 3 // 32
        packed_out = out_f // per_word if per_word else out_f * 3 // 32
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (packed_in, out_f)
        assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (n_groups, packed_out)
        assert t["scales"].dtype == torch.float16 and t["scales"].shape == (n_groups, out_f)
        assert t["g_idx"].dtype == torch.int32 and torch.equal(
            t["g_idx"], torch.arange(in_f, dtype=torch.int32) // cfg.group_size)
        assert f"{name}.weight" not in ckpt.weight_map
        # the checkpoint's integers are the pass's: dequantized, they are its weights exactly
        assert torch.equal(ckpt.quantized(name).dequantize(), src[f"{name}.weight"])
    # every other tensor is the source model's, unchanged
    orig = dict(load_hf(tiny_llama)[0].state_dict())
    for key in ckpt.weight_map:
        if key.rpartition(".")[0] not in names:
            assert torch.equal(ckpt.tensor(key), orig[key]), key
    assert (dest / "tokenizer.json").exists()
    assert all(os.stat(f).st_mode & 0o044 == 0o044 for f in dest.iterdir())  # readable by all
    # the model loaded back from the checkpoint computes what the fake-quantized model does
    plain, tok = load_hf(gptq_format.dequantize_checkpoint(dest, tmp_path / "plain"))
    ids = tok(TEXT)["input_ids"]
    ours, want = _logits(plain, ids), _logits(ref, ids)
    assert torch.equal(ours, want)
    assert not torch.equal(ours, _logits(load_hf(tiny_llama)[0], ids))  # it is quantized
    assert art.meta["error_total"] < art.meta["rtn_error_total"]
    assert art.meta["calibration"] == {"source": "builtin:calibration", **CALIB}


def test_config_defaults_and_validation() -> None:
    c = HFGPTQExportConfig()
    assert (c.bits, c.group_size, c.sym, c.act_order, c.damp) == (4, 128, True, True, 0.01)
    default_calib = CalibrationConfig()  # the recipes' builtin:calibration
    assert (c.samples, c.seq_len) == (default_calib.samples, default_calib.seq_len) == (32, 512)
    assert HFGPTQExporter.name == HFGPTQExporter.format == "hf-gptq"
    assert HFGPTQExporter.layout == "folder" and EXPORTERS["hf-gptq"] is HFGPTQExporter
    for bad in (dict(bits=5), dict(group_size=48), dict(damp=0), dict(outtype="f16"),
                dict(samples=0)):
        with pytest.raises(ValidationError):
            HFGPTQExportConfig(**bad)


def test_group_size_that_does_not_divide_names_the_layer(tmp_path: Path,
                                                         tiny_llama: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", hidden_size=96, intermediate_size=192, num_hidden_layers=1,
        num_attention_heads=3, num_key_value_heads=1, head_dim=32, vocab_size=49152,
        tie_word_embeddings=True)
    src = tmp_path / "w96"
    AutoModelForCausalLM.from_config(config).save_pretrained(src, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / f, src / f)
    out = tmp_path / "out"
    with pytest.raises(ModelError) as err:
        HFGPTQExporter(HFGPTQExportConfig(group_size=64, **CALIB)).export(
            src, _ctx(tmp_path), out / "w96.gptq")
    msg = str(err.value)
    assert "model.layers.0.self_attn.q_proj" in msg and "96 input features" in msg
    assert "group_size in [32]" in msg
    assert not out.exists() or list(out.iterdir()) == []  # nothing left, not even a temp


def test_gptq_input_is_copied_with_its_settings_and_refused_with_others(
        tiny_llama: Path, tmp_path: Path) -> None:
    cfg = HFGPTQExportConfig(group_size=64, **CALIB)
    first = HFGPTQExporter(cfg).export(tiny_llama, _ctx(tmp_path), tmp_path / "a")
    copy = HFGPTQExporter(cfg).export(first.path, _ctx(tmp_path), tmp_path / "b")
    assert copy.meta["copied_from"] == str(first.path)
    files = sorted(f.name for f in first.path.iterdir())
    assert sorted(f.name for f in copy.path.iterdir()) == files
    for f in files:
        assert (first.path / f).read_bytes() == (copy.path / f).read_bytes()
    # other settings: a clear refusal naming what differs and the flags that would work
    # act-order counts only when asked for (the CLI has no flag for it)
    qc_file = copy.path / "config.json"
    cfg_json = json.loads(qc_file.read_text())
    cfg_json["quantization_config"]["desc_act"] = False
    qc_file.write_text(json.dumps(cfg_json))
    again = HFGPTQExporter(cfg).export(copy.path, _ctx(tmp_path), tmp_path / "b2")
    assert again.meta["quantization_config"]["desc_act"] is False
    for other, words in ((dict(group_size=128), "group_size 64 (asked 128)"),
                         (dict(group_size=64, sym=False), "sym True (asked False)"),
                         (dict(group_size=64, bits=8), "bits 4 (asked 8)"),
                         (dict(group_size=64, act_order=False), "act_order True (asked False)")):
        with pytest.raises(ModelError) as err:
            HFGPTQExporter(HFGPTQExportConfig(**other, **CALIB)).export(
                first.path, _ctx(tmp_path), tmp_path / "c")
        assert "already a GPTQ checkpoint" in str(err.value) and words in str(err.value)
        assert "--bits 4 --group-size 64 --sym" in err.value.hint
        assert not (tmp_path / "c").exists()


def test_kill_mid_write_leaves_no_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    """kill -9 after the first shard is written: no folder at dest, only an owner-tagged temp
    folder that the next sweep removes."""
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "tiny.gptq"
    script = (
        "import sys; from pathlib import Path\n"
        "from edgesmith.context import RunContext, make_progress\n"
        "from edgesmith.export.hf_gptq import HFGPTQExportConfig, HFGPTQExporter\n"
        "ctx = RunContext(out_dir=Path(sys.argv[2]), cache_dir=Path(sys.argv[2]), "
        "progress=make_progress(quiet=True), threads=1)\n"
        "HFGPTQExporter(HFGPTQExportConfig(samples=32, seq_len=256)).export("
        "Path(sys.argv[1]), ctx, Path(sys.argv[3]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tiny_llama), str(tmp_path),
                             str(dest)], start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # a safety net against a hang, not a speed check
        while not list(out.glob(".*/model-00001.safetensors")):
            assert proc.poll() is None, "the export ended before its first shard was seen"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    left = list(out.iterdir())
    assert not dest.exists() and len(left) == 1 and is_temp_name(left[0].name)
    assert not (left[0] / "config.json").exists()  # nothing there looks finished
    assert sweep_stale(out) == left and list(out.iterdir()) == []


@pytest.mark.skipif(interop.ortgenai_python() is None, reason=interop.MISSING)
@pytest.mark.parametrize("settings", [
    pytest.param(dict(), id="w4g128sym-act"),
    pytest.param(dict(group_size=32, sym=False, act_order=False), id="w4g32asym"),
])
def test_onnxruntime_genai_builder_loads_the_checkpoint(  # type: ignore[no-untyped-def]
        tiny_llama: Path, tmp_path: Path, settings: dict[str, Any], watched) -> None:
    """onnxruntime-genai 0.18's model builder reads the checkpoint's qweight/qzeros/scales/g_idx
    into MatMulNBits (int4, CPU); its logits are our fake-quantized model's (fp32 activations;
    lm_head and embeddings left unquantized so only GPTQ's weights differ from fp32)."""
    cfg = HFGPTQExportConfig(**settings, **CALIB)
    art = HFGPTQExporter(cfg).export(tiny_llama, _ctx(tmp_path), tmp_path / "ckpt")
    python = interop.ortgenai_python()
    assert python is not None
    onnx_dir = tmp_path / "onnx"
    interop.ortgenai_build(python, art.path, onnx_dir, tmp_path / "og-cache", run=watched)
    graph = (onnx_dir / "model.onnx").read_bytes()
    assert b"MatMulNBits" in graph
    plain, tok = load_hf(gptq_format.dequantize_checkpoint(art.path, tmp_path / "plain"))
    ids = tok(TEXT)["input_ids"]
    theirs = interop.ortgenai_logprobs(python, onnx_dir, [ids], tmp_path, run=watched)[0]
    ours = torch.log_softmax(_logits(plain, ids), -1)[0].numpy()
    fp32 = torch.log_softmax(_logits(load_hf(tiny_llama)[0], ids), -1)[0].numpy()
    kld = float(interop.kld(ours, theirs).mean())
    quant = float(interop.kld(fp32, ours).mean())
    print(f"\nonnxruntime-genai vs ours: KLD {kld:.2e}; ours vs fp32 {quant:.4f}")
    assert quant > 1e-3  # the quantization is visible...
    assert kld < 1e-3 * quant  # ...and onnxruntime-genai computes exactly our weights
    assert np.array_equal(theirs.argmax(-1), ours.argmax(-1))
