"""The Core ML exporter on a tiny Llama: the traced decoder equals transformers (stateless and
through its KV cache), the .mlpackage's spec, MIL program, interface and weights read back on
Linux, int8/int4/palettized compression, GPTQ codes carried bit for bit, the runner's
estimate, and the refusals (an architecture it does not cover, speed on Linux)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("coremltools")

from edgesmith.bench.quality import kl_divergence
from edgesmith.bench.runners import runner_for
from edgesmith.context import Artifact, RunContext, make_progress
from edgesmith.errors import DependencyError, ModelError
from edgesmith.export import coreml_package as pkgio
from edgesmith.export.coreml import CoreMLExportConfig, CoreMLExporter

CONTEXT = 128


def _ctx(tmp: Path) -> RunContext:
    return RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)


def _ids(n: int = 40, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.RandomState(seed).randint(3, 49152, n)]


def _hf_logprobs(hf_dir: Path, ids: list[int]) -> np.ndarray:
    from edgesmith.models import load_hf

    model, _ = load_hf(hf_dir)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).numpy()


@pytest.fixture(scope="module")
def exported(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Artifact]:
    from edgesmith.compress.coreml_compress import CoreMLCompressConfig, compress

    tmp = tmp_path_factory.mktemp("coreml")
    ctx = _ctx(tmp)
    fp16 = CoreMLExporter(CoreMLExportConfig(context=CONTEXT)).export(tiny_llama, ctx,
                                                                      tmp / "fp16")
    out = {"fp16": fp16}
    for mode in ("int8", "int4"):
        out[mode] = compress(fp16, tmp / mode, CoreMLCompressConfig(mode=mode), ctx)
    return out


def test_decoder_matches_transformers_with_and_without_cache(tiny_llama: Path) -> None:
    from edgesmith.export.coreml_llama import from_hf
    from edgesmith.models import load_hf

    ref, _ = load_hf(tiny_llama)
    ids = torch.tensor([_ids(24)])
    with torch.no_grad():
        want = ref(ids).logits[0]
        got = from_hf(tiny_llama, CONTEXT, stateful=False)(ids)[0]
        assert float((got - want).abs().max()) < 1e-4
        # the stateful form: 16 tokens, then 8 through the fp16 KV cache
        m = from_hf(tiny_llama, CONTEXT, stateful=True)
        first = m(ids[:, :16], torch.triu(torch.full((16, 16), -1e4), 1)[None, None])
        mask = torch.cat([torch.zeros(8, 16), torch.triu(torch.full((8, 8), -1e4), 1)], -1)
        second = m(ids[:, 16:], mask[None, None])
    both = torch.cat([first[0], second[0]])
    assert float((both - want).abs().max()) < 0.05 * float(want.abs().max())
    assert int((both.argmax(-1) != want.argmax(-1)).sum()) <= 1


def test_fp16_package_interface_and_weights(tiny_llama: Path,
                                            exported: dict[str, Artifact]) -> None:
    art = exported["fp16"]
    assert art.meta["kv_cache"] == "stateful" and art.meta["stateful"] is True
    assert art.meta["checks"] and all(c["passed"] for c in art.meta["checks"]), art.meta["checks"]
    spec, prog = pkgio.load_program(art.path / pkgio.PACKAGE)
    d = pkgio.describe(spec)
    assert [i["name"] for i in d["inputs"]] == ["input_ids", "causal_mask"]
    assert d["inputs"][0]["dtype"] == "INT32" and d["inputs"][0]["shape"][1] == [1, CONTEXT]
    assert [s["name"] for s in d["states"]] == ["key_cache", "value_cache"]
    assert d["states"][0]["shape"] == [[n, n] for n in (2, 1, 2, CONTEXT, 64)]
    assert [o["name"] for o in d["outputs"]] == ["logits"]
    # the tied embedding/head is one constant, read by the gather and by the head
    embs = [op for op in prog.functions["main"].operations
            if op.op_type == "const" and "embed_tokens" in op.name]
    assert len(embs) == 1
    assert sorted(c.op_type for c in embs[0].outputs[0].child_ops) == ["gather", "linear"]
    # the weights read back are the HF weights in fp16
    from edgesmith.export.coreml_llama import hf_tensors

    hf = hf_tensors(tiny_llama)
    got, _ = pkgio.weights(prog, list(hf))
    w = "model.layers.1.mlp.down_proj.weight"
    assert np.array_equal(got[w], hf[w].half().numpy())
    for f in ("config.json", "tokenizer.json", "generation_config.json"):
        assert (art.path / f).exists()


def test_runner_estimates_quality_from_the_package(tiny_llama: Path,
                                                   exported: dict[str, Artifact]) -> None:
    ids = _ids()
    ref = _hf_logprobs(tiny_llama, ids)
    klds = {}
    for name, art in exported.items():
        runner = runner_for(art.path)
        assert runner.name == "coreml" and "not run in Core ML" in runner.verified
        sess = runner.open(art.path, threads=2, n_ctx=CONTEXT)
        klds[name] = float(kl_divergence(ref, sess.logprobs(ids)).mean())
        with pytest.raises(DependencyError, match="macOS"):
            sess.generate(ids[:8], 4)
        sess.close()
    assert klds["fp16"] < 1e-4, klds  # fp16 weights only
    assert klds["fp16"] < klds["int8"] < klds["int4"], klds
    sizes = {k: sum(f.stat().st_size for f in a.path.rglob("*") if f.is_file())
             for k, a in exported.items()}
    # the int8 embedding is most of this tiny model, so int4 is only a little smaller
    assert sizes["int4"] < sizes["int8"] < 0.6 * sizes["fp16"], sizes


def test_compressed_weights_round_trip(exported: dict[str, Artifact]) -> None:
    for mode in ("int8", "int4"):
        art = exported[mode]
        assert all(c["passed"] for c in art.meta["checks"]), art.meta["checks"]
        _spec, prog = pkgio.load_program(art.path / pkgio.PACKAGE)
        ops = {op.name: op for op in prog.functions["main"].operations}
        q = next(op for n, op in ops.items() if n.startswith("model_layers_0_mlp_up_proj")
                 and op.op_type == "constexpr_blockwise_shift_scale")
        data, scale = q.inputs["data"].val, q.inputs["scale"].val
        assert scale.shape == ((768, 1) if mode == "int8" else (768, 256 // 32))
        # the dequantized weight is exactly what the constants say: scale * (data - offset)
        off = q.inputs["offset"].val.astype(np.float32) if "offset" in q.inputs else 0.0
        want = (np.repeat(scale.astype(np.float32), data.shape[1] // scale.shape[1], 1)
                * (data.astype(np.float32) - np.repeat(off, data.shape[1] // scale.shape[1], 1)
                   if mode == "int4" else data.astype(np.float32)))
        assert np.allclose(q.materialized_val_inference().astype(np.float32), want, atol=1e-3)
        types = {t["name"]: t["type"] for t in art.meta["tensors"]}
        assert types["model.embed_tokens.weight"] == "int8-per-channel"


def _gptq_checkpoint(tiny_llama: Path, dest: Path) -> Path:
    from edgesmith.compress import gptq_format, qweights
    from edgesmith.models import load_hf

    model, tok = load_hf(tiny_llama)
    spec = qweights.QuantSpec(bits=4, group_size=32, sym=False)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
            qweights.attach(model, name, qweights.quantize_rtn(mod.weight.data, spec, name))
    qweights.set_quantization_config(model, gptq_format.quantization_config(spec,
                                                                            desc_act=False))
    gptq_format.save_model(model, dest, tokenizer=tok)
    return dest


def test_gptq_codes_written_bit_for_bit(tiny_llama: Path, tmp_path: Path) -> None:
    from edgesmith.compress import gptq_format

    ckpt = _gptq_checkpoint(tiny_llama, tmp_path / "gptq")
    art = CoreMLExporter(CoreMLExportConfig(dtype="int4", context=CONTEXT)).export(
        ckpt, _ctx(tmp_path), tmp_path / "out")
    assert all(c["passed"] for c in art.meta["checks"]), art.meta["checks"]
    # the read-back is compared with the checkpoint's own values, and says so
    assert any(c["name"].startswith("GPTQ codes decompressed") for c in art.meta["checks"])
    assert len(art.meta["written"]) == 14 and not art.meta["not_written"]
    reader = gptq_format.GPTQCheckpoint(ckpt)
    _spec, prog = pkgio.load_program(art.path / pkgio.PACKAGE)
    ops = {op.name: op for op in prog.functions["main"].operations}
    for hf in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        q = reader.quantized(hf)
        op = ops[hf.replace(".", "_") + "_weight_to_fp16_gptq"]
        assert np.array_equal(op.inputs["data"].val.astype(np.uint8), q.codes.numpy())
        assert np.array_equal(op.inputs["offset"].val.astype(np.uint8), q.zeros.numpy())
        assert np.array_equal(op.inputs["scale"].val, q.scales.numpy().astype(np.float16))
    types = {t["name"]: t for t in art.meta["tensors"]}
    assert types["model.layers.0.mlp.up_proj.weight"]["from"] == "gptq codes"


def test_palettize_small(tiny_llama: Path, exported: dict[str, Artifact],
                         tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from edgesmith.compress.coreml_compress import CoreMLCompressConfig, compress

    art = compress(exported["fp16"], tmp_path / "pal", CoreMLCompressConfig(
        mode="palettize4", embedding="fp16"), _ctx(tmp_path))
    assert all(c["passed"] for c in art.meta["checks"]), art.meta["checks"]
    _spec, prog = pkgio.load_program(art.path / pkgio.PACKAGE)
    got, kinds = pkgio.weights(prog, ["model.layers.0.mlp.up_proj.weight"])
    assert kinds["model.layers.0.mlp.up_proj.weight"] == "constexpr_lut_to_dense"
    # 4-bit tables: at most 16 distinct values in each group of 16 output channels
    # (float32 first: numpy's float16 sort is wrong on some AVX512-FP16 CPUs, so np.unique of
    # a float16 array can list a value twice)
    w = got["model.layers.0.mlp.up_proj.weight"].astype(np.float32)
    assert all(len(np.unique(w[g : g + 16])) <= 16 for g in range(0, w.shape[0], 16))


def test_uncovered_architecture_refused_before_work(tiny_llama: Path, tmp_path: Path,
                                                    watched) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not cover"):
        CoreMLExporter().export(bad, _ctx(tmp_path), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    cfg["architectures"] = ["Qwen3ForCausalLM"]  # known to edgesmith, not to this exporter
    (bad / "config.json").write_text(json.dumps(cfg))
    r = watched([sys.executable, "-m", "edgesmith.cli", "export", str(bad), "--format",
                 "coreml", "-o", str(tmp_path / "o")])
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert lines and "does not cover" in lines[0] and "Qwen3ForCausalLM" in lines[0]


def test_missing_coremltools_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "coremltools", None)
    with pytest.raises(DependencyError, match=r"edgesmith\[coreml\]"):
        pkgio.require()


def test_bench_speed_refused(exported: dict[str, Artifact]) -> None:
    runner = runner_for(exported["int8"].path / pkgio.PACKAGE)
    with pytest.raises(DependencyError, match="needs macOS"):
        runner.check_speed()


def _layer_bytes(art: Artifact) -> int:
    """Bytes of the package's weight file (the embedding is the same in every mode)."""
    return sum(f.stat().st_size for f in (art.path / pkgio.PACKAGE).rglob("weight.bin"))


def test_sparse_modes_store_the_zeros_as_a_mask(tiny_llama: Path,
                                                tmp_path: Path) -> None:
    """A magnitude-pruned model (50% of each decoder Linear zero): ``sparse`` keeps the values
    exactly, ``sparse_int8`` quantizes only the non-zeros, both smaller than their dense form."""
    from edgesmith.compress.coreml_compress import CoreMLCompressConfig, compress
    from edgesmith.models import load_hf

    model, tok = load_hf(tiny_llama)
    names = []
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and name.startswith("model.layers."):
                w = mod.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
                names.append(f"{name}.weight")
    pruned = tmp_path / "pruned"
    model.save_pretrained(pruned)
    tok.save_pretrained(pruned)
    ctx = _ctx(tmp_path)
    fp16 = CoreMLExporter(CoreMLExportConfig(context=CONTEXT)).export(pruned, ctx,
                                                                      tmp_path / "fp16")
    arts = {m: compress(fp16, tmp_path / m, CoreMLCompressConfig(mode=m, embedding="fp16"), ctx)
            for m in ("int8", "sparse", "sparse_int8")}
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for mode in ("sparse", "sparse_int8"):
        art = arts[mode]
        assert all(c["passed"] for c in art.meta["checks"]), art.meta["checks"]
        assert "sparse mask" in art.meta["checks"][-1]["name"]
        types = {t["name"]: t for t in art.meta["tensors"]}
        assert all(types[n]["type"].startswith("sparse-") and types[n]["sparsity"] >= 0.49
                   for n in names), types
        _spec, prog = pkgio.load_program(art.path / pkgio.PACKAGE)
        got, kinds = pkgio.weights(prog, names)
        assert set(kinds.values()) == {"constexpr_sparse_to_dense"}
        for n in names:
            assert np.array_equal(got[n] == 0, state[n] == 0), n
            if mode == "sparse":  # fp16 values, nothing else lost
                assert np.allclose(got[n].astype(np.float32), state[n], atol=2e-3, rtol=1e-3)
    # the runner's logits: sparse is the fp16 model exactly, sparse_int8 close to it
    ids = _ids()
    lp = {}
    for name, art in (("fp16", fp16), *arts.items()):
        sess = runner_for(art.path).open(art.path, threads=2, n_ctx=CONTEXT)
        lp[name] = sess.logprobs(ids)
        sess.close()
    assert np.array_equal(lp["sparse"], lp["fp16"])
    kld = float(kl_divergence(lp["fp16"], lp["sparse_int8"]).mean())
    assert 0 < kld < 0.05, kld
    # 16 x 0.5 + 1 bits beats 16; 8 x 0.5 + 1 beats int8's 8
    b = {m: _layer_bytes(a) for m, a in arts.items()}
    b["fp16"] = _layer_bytes(fp16)
    assert b["sparse"] < b["fp16"] and b["sparse_int8"] < b["int8"], b
    # a sparse mode on a dense model: nothing reaches min_sparsity, and the check says so
    dense = compress(CoreMLExporter(CoreMLExportConfig(context=CONTEXT)).export(
        tiny_llama, ctx, tmp_path / "dense-fp16"), tmp_path / "dense",
        CoreMLCompressConfig(mode="sparse"), ctx)
    last = dense.meta["checks"][-1]
    assert not last["passed"] and "unstructured prune" in last["detail"]
