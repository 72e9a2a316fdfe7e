"""Exact Q4_0/Q4_1/Q8_0 blocks from quantized weights, checked by gguf-py and by llama.cpp."""

from __future__ import annotations

import ctypes
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from edgesmith.bench.quality import kl_divergence  # noqa: E402
from edgesmith.bench.runners.llama_cpp import LlamaCppRunner  # noqa: E402
from edgesmith.bench.runners.torch import TorchRunner  # noqa: E402
from edgesmith.compress import qweights as qw  # noqa: E402
from edgesmith.context import RunContext, make_progress  # noqa: E402
from edgesmith.errors import ModelError  # noqa: E402
from edgesmith.export import gguf_blocks  # noqa: E402
from edgesmith.export.gguf import GGUFExportConfig, GGUFExporter  # noqa: E402
from edgesmith.gguf_file import read_header  # noqa: E402

SPECS = {"Q4_0": qw.QuantSpec(4, 32, True), "Q4_1": qw.QuantSpec(4, 32, False),
         "Q8_0": qw.QuantSpec(8, 32, True)}
TEXT = ("The Raspberry Pi 5 runs small language models locally. Quantization trades a little "
        "accuracy for a smaller, faster file: 4-bit weights, 32-value blocks, and scales.")


def _weight(rows: int = 48, cols: int = 256) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 0, rows)[:, None]
    w[0, :32] = 0.0  # an all-zero block: d = 0
    w[1, :32] = w[1, :32].abs()  # only positive values (asym: no negative, zero kept >= 1)
    w[2, :32] = -w[2, :32].abs()
    w[3, 5] = 7.0  # one outlier: the largest magnitude is positive
    w[4, 40] = -7.0
    return w


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_blocks_dequantize_bit_for_bit(qtype: str) -> None:
    w = _weight()
    q = qw.quantize_rtn(w, SPECS[qtype])
    assert q.gguf_type() == qtype
    data = gguf_blocks.blocks(q)
    assert data.dtype == np.uint8 and data.shape == (48, 256 // 32 * gguf_blocks.BLOCK_BYTES[qtype])
    assert data.shape == gguf.quant_shape_to_byte_shape((48, 256),
                                                        gguf.GGMLQuantizationType[qtype])
    back = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[qtype])
    assert back.dtype == np.float32 and back.shape == (48, 256)
    ours = gguf_blocks.dequantized(q)
    assert np.array_equal(back.view(np.uint32), ours.view(np.uint32))  # bit for bit
    torch_w = q.dequantize().numpy()
    if qtype == "Q4_1":  # m = fp16(-d * zero): the one rounding, far below a step d
        m = np.abs(q.scales.numpy() * q.zeros.numpy()).repeat(32, axis=1)
        assert np.all(np.abs(back - torch_w) <= m * 2.0**-11 + 1e-30)
        assert not np.array_equal(back, torch_w)  # the test sees that rounding
    else:
        assert np.array_equal(back.view(np.uint32), torch_w.view(np.uint32))
    # and the blocks hold the codes and the fp16 scales themselves
    d = data.reshape(48, 8, -1)[..., :2].copy().view(np.float16)[..., 0]
    assert np.array_equal(d.astype(np.float32), q.scales.numpy())


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_symmetric_grid_is_llama_cpp_grid(qtype: str) -> None:
    """llama.cpp's own quantizer (gguf-py's port of ggml's) maps our dequantized weight back to
    exactly our blocks: the grid is the same, so a GGUF reader sees what GPTQ chose."""
    q = qw.quantize_rtn(_weight(), SPECS[qtype])
    again = gguf.quants.quantize(q.dequantize().numpy(), gguf.GGMLQuantizationType[qtype])
    ours = gguf_blocks.blocks(q)
    # row 0 starts with an all-zero block, whose d is 0 with either sign
    assert np.array_equal(again[1:], ours[1:]) and np.array_equal(again[0, 2:], ours[0, 2:])


def test_signed_scale_uses_all_sixteen_levels() -> None:
    w = torch.tensor([[1.0] + [0.1] * 31, [-1.0] + [0.1] * 31])
    q = qw.quantize_rtn(w, SPECS["Q4_0"])
    assert q.scales[0, 0] < 0 < q.scales[1, 0]  # d = max / -8 keeps the sign of the max
    assert q.codes[:, 0].tolist() == [0, 0]  # the largest magnitude is code 0 (-8 d) both ways
    assert torch.equal(q.dequantize()[:, 0], w[:, 0])  # nothing clipped


def test_blocks_refuse_inexact_types() -> None:
    q = qw.quantize_rtn(_weight(), qw.QuantSpec(4, 64, True))
    assert q.gguf_type() is None
    with pytest.raises(ModelError, match="not exactly"):
        gguf_blocks.blocks(q)
    with pytest.raises(ModelError, match="not exactly"):
        gguf_blocks.blocks(qw.quantize_rtn(_weight(), SPECS["Q4_0"]), "Q8_0")


def test_match_rows_finds_a_permutation_and_refuses_a_change() -> None:
    q = qw.quantize_rtn(_weight(), SPECS["Q4_0"])
    w16 = q.dequantize().numpy().astype(np.float16)
    perm = np.random.default_rng(0).permutation(48)
    got = gguf_blocks.match_rows(w16[perm], q)
    assert got is not None and np.array_equal(got, perm)
    changed = w16[perm].copy()
    changed[3, 7] = np.float16(changed[3, 7] * 2 + 1)
    assert gguf_blocks.match_rows(changed, q) is None
    assert gguf_blocks.match_rows(w16[:, :128], q) is None


# --- in a real GGUF, through llama.cpp -------------------------------------------------------
@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory) -> RunContext:
    d = tmp_path_factory.mktemp("blocks")
    return RunContext(out_dir=d, cache_dir=d, progress=make_progress(quiet=True), threads=2)


def _linears(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n]


@pytest.fixture(scope="module")
def fake_quantized(tiny_llama: Path, ctx: RunContext) -> tuple[Path, dict[str, qw.QuantizedLinear]]:
    """The tiny Llama with every decoder Linear RTN-quantized (Q4_0 grid; down_proj Q8_0),
    saved plainly (fake-quantized weights) for llama.cpp's converter."""
    from edgesmith.models import load_hf

    model, tok = load_hf(tiny_llama)
    quantized = {}
    for name in _linears(model):
        spec = SPECS["Q8_0"] if name.endswith("down_proj") else SPECS["Q4_0"]
        q = qw.quantize_rtn(model.get_submodule(name).weight, spec, name)
        qw.attach(model, name, q)
        quantized[name] = q
    dest = ctx.out_dir / "fq"
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest, quantized


def test_gguf_holds_the_codes_and_llama_cpp_runs_them(
        fake_quantized: tuple[Path, dict[str, qw.QuantizedLinear]], ctx: RunContext) -> None:
    hf_dir, quantized = fake_quantized
    f16 = GGUFExporter(GGUFExportConfig(outtype="f16")).export(hf_dir, ctx, ctx.out_dir / "f.gguf")
    out = ctx.out_dir / "q.gguf"
    res = gguf_blocks.write_quantized(f16.path, out, quantized)
    assert res["not_written"] == []
    assert len(res["written"]) == len(quantized) == 14
    types = {t.name: t.type for t in read_header(out).tensors}
    assert types["blk.0.attn_q.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["token_embd.weight"] == "F16"
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    src_fields = gguf.GGUFReader(str(f16.path)).fields
    assert {k for k in src_fields if not k.startswith("GGUF.")} == \
        {k for k in reader.fields if not k.startswith("GGUF.")}  # every key copied
    assert reader.fields["tokenizer.ggml.tokens"].contents() == \
        src_fields["tokenizer.ggml.tokens"].contents()
    # each GGUF tensor is exactly the blocks of the codes, rows in the converter's order
    by_name = {t.name: t for t in reader.tensors}
    permuted = 0
    for t in res["written"]:
        q = quantized[t["hf"]]
        stored = np.asarray(by_name[t["tensor"]].data)
        rows = gguf.quants.dequantize(stored, gguf.GGMLQuantizationType[t["type"]])
        ref = q.dequantize().numpy()
        perm = gguf_blocks.match_rows(ref.astype(np.float16), q)  # identity on the HF side
        assert perm is not None
        idx = [np.flatnonzero((ref == r).all(axis=1))[0] for r in rows]
        assert sorted(idx) == list(range(q.out_features))
        permuted += idx != list(range(q.out_features))
    assert permuted == 4  # Llama's q/k rows are permuted by the converter, in both layers
    # llama.cpp computes the fake-quantized torch model's logits
    ref_sess = TorchRunner().open(hf_dir)
    ids = ref_sess.tokenize(TEXT)
    sess = LlamaCppRunner().open(out, n_ctx=128, logits_all=True)
    kld = kl_divergence(ref_sess.logprobs(ids), sess.logprobs(ids)).mean()
    sess.close()
    assert kld < 1e-3, kld
    # a weight rewritten with its rows left in HF order breaks this: the permutation matters
    wrong = ctx.out_dir / "wrong.gguf"
    shutil.copy(out, wrong)
    t = by_name["blk.0.attn_q.weight"]
    with open(wrong, "r+b") as f:
        f.seek(t.data_offset)
        f.write(gguf_blocks.blocks(quantized["model.layers.0.self_attn.q_proj"]).tobytes())
    bad = LlamaCppRunner().open(wrong, n_ctx=128, logits_all=True)
    assert kl_divergence(ref_sess.logprobs(ids), bad.logprobs(ids)).mean() > 10 * kld
    bad.close()


def test_llama_cpp_quantizer_keeps_the_blocks(
        fake_quantized: tuple[Path, dict[str, qw.QuantizedLinear]], ctx: RunContext) -> None:
    """llama_model_quantize copies a tensor whose type equals its target; with tensor-type
    overrides pinning the written tensors, a Q4_K_M pass re-quantizes only the others."""
    import llama_cpp

    hf_dir, quantized = fake_quantized
    f16 = GGUFExporter(GGUFExportConfig(outtype="f16")).export(hf_dir, ctx, ctx.out_dir / "g.gguf")
    src = ctx.out_dir / "g.q.gguf"
    res = gguf_blocks.write_quantized(f16.path, src, quantized)
    overrides = gguf_blocks.keep_overrides(res["written"])
    arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
    keep = []
    for i, (pattern, qtype) in enumerate(overrides):
        b = pattern.encode()
        keep.append(b)
        arr[i].pattern = b
        arr[i].type = getattr(llama_cpp, f"GGML_TYPE_{qtype}")
    arr[len(overrides)].pattern = None

    def run(dest: Path, with_overrides: bool) -> int:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
        params.nthread = 2
        if with_overrides:
            params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(
                llama_cpp.llama_model_tensor_override))
        return int(llama_cpp.llama_model_quantize(str(src).encode(), str(dest).encode(),
                                                  ctypes.byref(params)))

    # without overrides llama.cpp refuses to requantize the Q4_0 tensors (allow_requantize off)
    assert run(ctx.out_dir / "r0.gguf", False) != 0
    assert run(ctx.out_dir / "r1.gguf", True) == 0
    before = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    after = {t.name: t for t in gguf.GGUFReader(str(ctx.out_dir / "r1.gguf")).tensors}
    for t in res["written"]:
        a, b = before[t["tensor"]], after[t["tensor"]]
        assert b.tensor_type == a.tensor_type and np.array_equal(np.asarray(a.data),
                                                                 np.asarray(b.data))
    assert after["token_embd.weight"].tensor_type not in (gguf.GGMLQuantizationType.F16,
                                                          gguf.GGMLQuantizationType.Q4_0)
