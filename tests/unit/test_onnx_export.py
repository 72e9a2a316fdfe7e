"""The ONNX exporter on a tiny Llama: exact fp32 graph with its KV cache, exact MatMulNBits
packing (onnxruntime's int4 logits equal the fake-quantized torch model's), GPTQ codes carried
bit for bit, the embedding/head choices, the CLI and the compress pipeline for the browser."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgesmith.bench.quality import kl_divergence
from edgesmith.bench.runners.onnxruntime import OnnxSession
from edgesmith.context import RunContext, make_progress
from edgesmith.export.onnx import OnnxExportConfig, OnnxExporter

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _ctx(tmp: Path) -> RunContext:
    return RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)


def _ids(n: int = 40, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.RandomState(seed).randint(3, 49152, n)]


def _torch_logprobs(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).numpy()


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("onnx")
    ctx = _ctx(tmp)
    out = {"fp32": OnnxExporter(OnnxExportConfig(dtype="fp32")).export(tiny_llama, ctx,
                                                                        tmp / "fp32").path}
    for emb, head in (("int8", "tied"), ("fp16", "tied"), ("int8", "int4")):
        cfg = OnnxExportConfig(dtype="q4", embedding=emb, head=head)
        out[f"q4-{emb}-{head}"] = OnnxExporter(cfg).export(tiny_llama, ctx,
                                                           tmp / f"q4-{emb}-{head}").path
    return out


def test_fp32_export_matches_pytorch_with_and_without_cache(tiny_llama: Path,
                                                            exported: dict[str, Path]) -> None:
    from edgesmith.models import load_hf

    model, _ = load_hf(tiny_llama)
    ids = _ids()
    sess = OnnxSession(exported["fp32"], threads=2)
    kld = kl_divergence(_torch_logprobs(model, ids), sess.logprobs(ids))
    assert kld.mean() < 1e-6, kld.mean()
    # the KV path: prefill 8 tokens, then one at a time through the cache
    gen = sess.generate(ids[:8], 12).generated_tokens
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids[:8]]), max_new_tokens=12, do_sample=False,
                             min_new_tokens=12)[0, 8:].tolist()
    assert gen == ref
    names = [i.name for i in sess.sess.get_inputs()]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:5] == ["past_key_values.0.key", "past_key_values.0.value"]
    kv = sess.sess.get_inputs()[3]
    assert kv.shape[0] == "batch_size" and kv.shape[1] == 2 and kv.shape[3] == 64
    assert [o.name for o in sess.sess.get_outputs()][:2] == ["logits", "present.0.key"]


def _fake_quantized(tiny_llama: Path, emb_bits: int | None,
                    head_bits: int | None) -> torch.nn.Module:
    """The torch model with every Linear on the exporter's RTN grid (asymmetric, block 32),
    the embedding (and the tied head) on its int8 grid."""
    from edgesmith.export.onnx_quant import _rtn
    from edgesmith.models import load_hf

    model, _ = load_hf(tiny_llama)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name != "lm_head":
                q = _rtn(mod.weight.numpy(), 4, 32, name, search=False)
                mod.weight.copy_(q.dequantize())
        emb = model.get_input_embeddings().weight
        if emb_bits:
            emb.copy_(_rtn(emb.detach().numpy(), emb_bits, 32, "emb").dequantize())
        if head_bits and head_bits != emb_bits:
            raise AssertionError("tied models only")
    return model


def test_q4_matmulnbits_equals_the_fake_quantized_model(tiny_llama: Path,
                                                        exported: dict[str, Path]) -> None:
    # int8 embedding, head tied to it (8-bit MatMulNBits on the same codes): onnxruntime's
    # result is the torch model with exactly those weights, so the packing is exact
    ref = _fake_quantized(tiny_llama, 8, 8)
    ids = _ids(48, 1)
    lp = OnnxSession(exported["q4-int8-tied"], threads=2).logprobs(ids)
    kld = kl_divergence(_torch_logprobs(ref, ids), lp).mean()
    assert kld < 1e-5, kld
    # ... and it is really quantized: far from the fp32 model
    from edgesmith.models import load_hf

    fp32, _ = load_hf(tiny_llama)
    assert kl_divergence(_torch_logprobs(fp32, ids), lp).mean() > 100 * kld


def test_embedding_and_head_choices_change_size_and_storage(exported: dict[str, Path]) -> None:
    import onnx

    def info(path: Path) -> tuple[int, dict[str, int]]:
        m = onnx.load(str(path / "onnx" / "model_q4.onnx"), load_external_data=False)
        ops: dict[str, int] = {}
        for n in m.graph.node:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
        size = sum(f.stat().st_size for f in (path / "onnx").iterdir())
        return size, ops

    s_int8, ops_int8 = info(exported["q4-int8-tied"])
    s_fp16, ops_fp16 = info(exported["q4-fp16-tied"])
    s_int4, _ = info(exported["q4-int8-int4"])
    # 2 layers x 7 Linears + the tied 8-bit head
    assert ops_int8["MatMulNBits"] == 15 and "MatMul" in ops_int8  # attention's own MatMuls
    assert ops_fp16["MatMulNBits"] == 14
    vocab, hidden = 49152, 256
    # int8 table (one byte per weight) is shared by the head; fp16 is two bytes per weight
    assert s_int8 < vocab * hidden * 1.3 < s_fp16
    # an untied int4 head adds its own half-byte table
    assert s_int4 > s_int8 + vocab * hidden * 0.45
    for p in exported.values():
        assert {"config.json", "tokenizer.json", "tokenizer_config.json",
                "generation_config.json"} <= {f.name for f in p.iterdir()}


def test_gptq_codes_are_written_bit_for_bit(tiny_llama: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from edgesmith.compress import gptq_format
    from edgesmith.compress.gptq import GPTQConfig, GPTQPass
    from edgesmith.compress.imatrix import CalibrationConfig

    ctx = _ctx(tmp_path)
    ctx.extras["calibration"] = CalibrationConfig(samples=4, seq_len=64)
    ctx.extras["pass_reports"] = []
    ckpt = tmp_path / "gptq"
    GPTQPass(GPTQConfig(bits=4, group_size=32, sym=False, act_order=True, samples=4,
                        seq_len=64)).run_dir(tiny_llama, ckpt, ctx)
    art = OnnxExporter(OnnxExportConfig(dtype="q4")).export(ckpt, ctx, tmp_path / "web")
    reader = gptq_format.GPTQCheckpoint(ckpt)
    assert sorted(art.meta["written"]) == reader.quantized_names()
    model = onnx.load(str(art.path / "onnx" / "model_q4.onnx"))
    inits = {i.name: i for i in model.graph.initializer}
    for name in reader.quantized_names():
        q = reader.quantized(name)
        packed = numpy_helper.to_array(inits[f"{name}.qweight"])  # [N, blocks, 16]
        lo, hi = packed & 0x0F, packed >> 4
        codes = np.stack([lo, hi], -1).reshape(q.out_features, q.in_features)
        assert np.array_equal(codes, q.codes.numpy()), name
        scales = numpy_helper.to_array(inits[f"{name}.scales"])
        assert np.array_equal(scales, q.scales.numpy()), name


def test_an_architecture_the_exporter_does_not_cover_is_refused(tiny_llama: Path,
                                                                tmp_path: Path) -> None:
    from edgesmith.errors import ModelError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not cover MambaForCausalLM"):
        OnnxExporter().export(bad, _ctx(tmp_path), tmp_path / "out")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True)


def test_cli_export_writes_the_transformers_js_layout(tiny_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "web"
    r = _cli("export", str(tiny_llama), "--format", "onnx", "--dtype", "q4", "-o", str(out),
             "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    paths = {f["path"] for f in res["files"]}
    assert {"onnx/model_q4.onnx", "onnx/model_q4.onnx_data", "config.json",
            "tokenizer.json"} <= paths
    sess = OnnxSession(out, threads=2)
    assert sess.path.name == "model_q4.onnx"
    assert np.isfinite(sess.logprobs(_ids(16))).all()
    again = _cli("export", str(tiny_llama), "--format", "onnx", "--dtype", "q4", "-o", str(out))
    assert again.returncode == 2 and "already exists" in again.stderr
    wrong = _cli("export", str(tiny_llama), "--format", "onnx", "--bits", "4", "-o", str(out))
    assert wrong.returncode == 2 and "--bits does not apply to --format onnx" in wrong.stderr


def test_compress_for_the_browser_verifies_in_onnxruntime(tiny_llama: Path,
                                                          tmp_path: Path) -> None:
    model = tmp_path / "tiny"
    shutil.copytree(tiny_llama, model)  # its own cache entry
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: web-test\ntarget: webgpu-browser\n"
        "calibration: {source: builtin:calibration, samples: 4, seq_len: 64}\n"
        "eval: {ctx: 128, windows: 2}\n"
        "steps:\n  - export: {format: onnx, dtype: fp32}\n"
        "  - onnx_quantize: {dtype: q4, embedding: int8, head: tied}\n"
        "gates: {max_kld: 5.0}\n")
    out = tmp_path / "out"
    r = _cli("compress", str(model), "--recipe", str(recipe), "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    man = json.loads(r.stdout)
    art = man["artifacts"][0]
    assert art["format"] == "onnx" and art["runtime"] == "onnxruntime"
    assert art["path"] == "onnx/model_q4.onnx" and (out / art["path"]).exists()
    assert man["baseline"]["format"] == "onnx" and man["baseline"]["type"] == "fp32"
    # the fp32 baseline is the model (fp16 reference rounding only), the q4 artifact is not
    assert man["baseline"]["quality"]["kld_mean"] < 1e-3
    assert art["quality"]["kld_mean"] > 10 * man["baseline"]["quality"]["kld_mean"]
    assert "onnxruntime" in (out / "report.md").read_text()
    listed = {f["path"] for f in man["files"]}
    assert {"onnx/model_q4.onnx", "onnx/model_q4.onnx_data", "tokenizer.json",
            "report.md"} <= listed
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(recipe.read_text().replace("onnx_quantize: {dtype: q4, embedding: int8, "
                                                "head: tied}", "gguf_quantize: {type: Q4_0}"))
    bad = _cli("compress", str(model), "--recipe", str(mixed), "-o", str(tmp_path / "o2"))
    assert bad.returncode == 2 and "gguf_quantize works on gguf files" in bad.stderr


def test_doctor_refuses_a_model_over_the_browsers_buffers(tiny_llama: Path) -> None:
    from edgesmith import doctor_onnx, models
    from edgesmith.targets import profile

    target = profile.load("webgpu-browser")
    ref = models.resolve(str(tiny_llama))
    # an 8B-class shape: 32 layers of 4096 x 14336 MLPs and a 128k x 4096 embedding
    big = {"model.embed_tokens.weight": [128256, 4096], "lm_head.weight": [128256, 4096]}
    for i in range(32):
        for n, s in (("gate_proj", [14336, 4096]), ("up_proj", [14336, 4096]),
                     ("down_proj", [4096, 14336]), ("q_proj", [4096, 4096])):
            big[f"model.layers.{i}.mlp.{n}.weight"] = s
    fit = {c.name: c for c in doctor_onnx.checks(ref, target, big)}["browser fit"]
    assert fit.status == "fail" and "exceed one ArrayBuffer" in fit.detail
    small = {"model.embed_tokens.weight": [49152, 576], "lm_head.weight": [49152, 576]}
    assert {c.name: c for c in doctor_onnx.checks(ref, target, small)}["browser fit"].status \
        == "ok"


def test_an_onnx_file_onnxruntime_refuses_is_one_clear_error(exported: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from edgesmith.errors import ModelError

    bad = tmp_path / "bad"
    shutil.copytree(exported["q4-int8-tied"], bad)
    f = bad / "onnx" / "model_q4.onnx"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelError, match="onnxruntime refused"):
        OnnxSession(bad, threads=1)
    r = _cli("bench", str(bad), "--json")
    assert r.returncode == 2 and "onnxruntime refused" in r.stderr


def test_targets_fit_reports_the_browsers_limits(tiny_llama: Path) -> None:
    r = _cli("targets", "fit", str(tiny_llama), "--target", "webgpu-browser", "--json")
    assert r.returncode == 0, r.stderr
    b = json.loads(r.stdout)["browser"]
    # 49152 x 256 int8 embedding + 2 layers of int4 Linears
    assert 49152 * 256 < b["q4_bytes"] < 49152 * 256 * 1.6
    assert b["fits_array_buffer"] and b["fits_gpu_buffer"] and b["shader_f16"] is False


def test_int8_layers_and_the_range_search(tiny_llama: Path, exported: dict[str, Path],
                                          tmp_path: Path) -> None:
    from edgesmith.context import Artifact
    from edgesmith.export import onnx_quant
    from edgesmith.models import load_hf

    base = Artifact(exported["fp32"], "onnx", {})
    ctx = _ctx(tmp_path)
    mixed = onnx_quant.quantize(base, tmp_path / "mixed", onnx_quant.QuantOptions(
        int8_layers=("mlp.down_proj",)), ctx)
    types = {t["name"]: t["type"] for t in mixed.meta["tensors"]}
    assert types["model.layers.0.mlp.down_proj"] == "int8-b32"
    assert types["model.layers.0.mlp.up_proj"] == "int4-b32"
    searched = onnx_quant.quantize(base, tmp_path / "search", onnx_quant.QuantOptions(
        search=True), ctx)
    fp32, _ = load_hf(tiny_llama)
    ids = _ids(48, 2)
    ref = _torch_logprobs(fp32, ids)
    kld = {name: kl_divergence(ref, OnnxSession(p, threads=2).logprobs(ids)).mean()
           for name, p in (("q4", exported["q4-int8-tied"]), ("mixed", mixed.path),
                           ("search", searched.path))}
    assert kld["mixed"] < kld["q4"], kld  # 8-bit down_proj: closer to the model
    # the search minimizes each block's weight error: the model moves less than plain RTN's
    assert kld["search"] < kld["q4"] * 1.05, kld
