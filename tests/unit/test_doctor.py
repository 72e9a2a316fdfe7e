"""edgesmith doctor: header-only answers per target format, and the models it must refuse."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgesmith import doctor, recipe


def _by_name(rep: doctor.Report) -> dict[str, doctor.Check]:
    return {f"{c.section}:{c.name}": c for c in rep.checks}


def test_smollm2_dir_is_ready_with_the_kquant_fallback_named(smollm2_hf_dir: Path) -> None:
    rep = doctor.run(str(smollm2_hf_dir), recipe=recipe.load("raspberry-pi-5-q4km"))
    checks = _by_name(rep)
    assert not rep.failures, [c.line() for c in rep.failures]
    assert checks["gguf:converter"].status == "ok" and "'llama'" in checks["gguf:converter"].detail
    assert checks["gguf:pre-tokenizer"].status == "ok"
    assert "'smollm'" in checks["gguf:pre-tokenizer"].detail
    # hidden 576 is not a multiple of 256: named, with llama.cpp's fallback type
    kq = checks["gguf:k-quant rows"]
    assert kq.status == "warn" and "576" in kq.detail and "Q4_K->Q5_0" in kq.detail
    assert "mlp.down_proj" not in kq.detail  # its rows are 1536 = 6 x 256
    assert checks["gguf:fits RAM"].status == "ok"
    assert checks["model:chat template"].status == "ok"


def test_tiny_llama_rows_of_256_take_kquants(tiny_llama: Path) -> None:
    rep = doctor.run(str(tiny_llama), target_name="raspberry-pi-4")
    assert _by_name(rep)["gguf:k-quant rows"].status == "ok"
    assert not rep.failures


def test_unrecognised_bpe_pre_tokenizer_is_refused(tiny_llama: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}  # a different split: a different hash
    (d / "tokenizer.json").write_text(json.dumps(tj))
    rep = doctor.run(str(d), target_name="raspberry-pi-5")
    fail = _by_name(rep)["gguf:pre-tokenizer"]
    assert fail.status == "fail" and "does not recognise" in fail.detail
    with pytest.raises(doctor.ModelError, match="pre-tokenizer"):
        doctor.preflight(str(d), recipe.for_target("raspberry-pi-5"), ref=_ref(d))


def _ref(path: Path):  # type: ignore[no-untyped-def]
    from edgesmith import models

    return models.resolve(str(path))


def test_a_context_that_does_not_fit_fails(tiny_llama: Path) -> None:
    rep = doctor.run(str(tiny_llama), target_name="raspberry-pi-4", ctx=2_000_000)
    fit = _by_name(rep)["gguf:fits RAM"]
    assert fit.status == "fail" and "ctx 2000000" in fit.detail


def test_the_phone_targets_run_their_exporters_checks(tiny_llama: Path) -> None:
    for target, fmt in (("iphone-15", "coreml"), ("android-midrange", "litert")):
        rep = doctor.run(str(tiny_llama), target_name=target)
        assert rep.failures == []
        assert _by_name(rep)[f"{fmt}:architecture"].status == "ok"


def test_the_browser_target_checks_the_onnx_exporter_and_the_browser_fit(tiny_llama: Path) -> None:
    checks = _by_name(doctor.run(str(tiny_llama), target_name="webgpu-browser"))
    assert checks["onnx:exporter"].status == "ok"
    assert checks["onnx:browser fit"].status == "ok"
    assert "GB" in checks["onnx:browser fit"].detail


def test_group_size_that_does_not_divide_a_layer_names_it_and_the_sizes_that_work() -> None:
    linears = [doctor._Linear("model.layers.0.self_attn.q_proj", 576, 576),
               doctor._Linear("model.layers.0.mlp.down_proj", 1536, 576)]
    (c,) = doctor._group_sizes(linears, [("gptq", 128)])
    assert c.status == "fail" and "model.layers.0.self_attn.q_proj has 576 inputs" in c.detail
    assert c.fix == "use group_size 32 or 64"
    (ok,) = doctor._group_sizes(linears, [("gptq", 64)])
    assert ok.status == "ok"


def test_recipe_types_and_groups_are_read_from_steps() -> None:
    steps = [SimpleNamespace(kind="torch", name="gptq", config=SimpleNamespace(group_size=32)),
             SimpleNamespace(kind="export", name="gguf", config=SimpleNamespace(outtype="f16")),
             SimpleNamespace(kind="format", name="gguf_quantize",
                             config=SimpleNamespace(type="Q4_0"))]
    assert doctor._recipe_types(SimpleNamespace(steps=steps)) == (["Q4_0"], [("gptq", 32)])


def test_gguf_input_reads_the_header_only(tmp_path: Path) -> None:
    rep = doctor.run("builtin:smollm2-135m", target_name="raspberry-pi-5")
    checks = _by_name(rep)
    assert checks["model:architecture"].detail.startswith("llama")
    assert checks["model:chat template"].status == "ok"
    assert "gguf:converter" not in checks  # already GGUF: nothing to convert
    assert rep.seconds < 30  # a hang guard, not a speed assertion


def _cli(*args: str):  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600)


def test_cli_doctor_json_and_exit_codes(tiny_llama: Path, tmp_path: Path) -> None:
    ok = _cli("doctor", str(tiny_llama), "--target", "raspberry-pi-5", "--json")
    assert ok.returncode == 0, ok.stderr
    rep = json.loads(ok.stdout)
    assert rep["ok"] is True and rep["recipe"] == "raspberry-pi-5-q4km"
    assert {c["name"] for c in rep["checks"]} >= {"converter", "pre-tokenizer", "fits RAM"}
    table = _cli("doctor", str(tiny_llama), "--target", "iphone-15")
    assert table.returncode == 0, table.stderr
    assert "format gguf" in table.stderr and "format coreml" in table.stderr
    web = _cli("doctor", str(tiny_llama), "--target", "webgpu-browser")
    assert web.returncode == 0 and "format onnx" in web.stderr
    assert "format gguf" not in web.stderr


def test_compress_stops_at_once_with_the_doctors_line(tiny_llama: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    tj = json.loads((d / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (d / "tokenizer.json").write_text(json.dumps(tj))
    p = _cli("compress", str(d), "--target", "raspberry-pi-5", "-o", str(tmp_path / "out"))
    assert p.returncode == 2
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "pre-tokenizer" in errors[0] and "edgesmith doctor" in errors[0]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_llama_cpp_quirks_found_while_testing_each_architecture(tmp_path: Path) -> None:
    gemma = tmp_path / "gemma"
    gemma.mkdir()
    (gemma / "config.json").write_text(json.dumps(
        {"hidden_size": 256, "num_attention_heads": 4, "head_dim": 64,
         "query_pre_attn_scalar": 256}))
    (c,) = doctor._llama_cpp_quirks(gemma, "Gemma3ForCausalLM")
    assert c.status == "warn" and "query_pre_attn_scalar 256 differs from head_dim 64" in c.detail
    (gemma / "config.json").write_text(json.dumps({"head_dim": 64, "query_pre_attn_scalar": 64}))
    assert doctor._llama_cpp_quirks(gemma, "Gemma3ForCausalLM") == []
    phi = tmp_path / "phi"
    phi.mkdir()
    (phi / "config.json").write_text("{}")
    (phi / "tokenizer_config.json").write_text("{}")
    (phi / "tokenizer.json").write_text(json.dumps(
        {"model": {"type": "BPE", "vocab": {"<s>": 0, "</s>": 1, "a": 2}}, "added_tokens": []}))
    fails = doctor._llama_cpp_quirks(phi, "Phi3ForCausalLM")
    assert [c.status for c in fails] == ["fail", "fail"]
    assert "tokenizer_class" in fails[0].detail and "<unk>, <|endoftext|>" in fails[1].detail
