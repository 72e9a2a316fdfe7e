"""The LiteRT exporter on a tiny Llama, run in LiteRT's own interpreter and LiteRT-LM: the fp32
.tflite reproduces PyTorch through prefill -> decode (the cache hand-off), greedy generation
equals transformers', int8 variants derived from the one export lose a little and shrink, the
.litertlm answers a chat like transformers in LiteRT-LM, and bad inputs are refused early."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")

from edgesmith.bench.quality import kl_divergence
from edgesmith.bench.runners import for_format, runner_for
from edgesmith.bench.runners.litert import LiteRTSession
from edgesmith.compress.litert_quantize import quantize
from edgesmith.context import Artifact, RunContext, make_progress
from edgesmith.errors import EdgesmithError, ModelError
from edgesmith.export import litertlm
from edgesmith.export.litert import LiteRTExportConfig, LiteRTExporter, check_exportable

PREFILL, CACHE = 32, 256


def _ctx(tmp: Path) -> RunContext:
    return RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True), threads=2)


def _ids(n: int, seed: int = 0) -> list[int]:
    return [int(x) for x in np.random.RandomState(seed).randint(3, 49152, n)]


@pytest.fixture(scope="module")
def tiny_chat(tiny_llama: Path, smollm2_hf_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with SmolLM2's chat template (for the LiteRT-LM chat check)."""
    dest = tmp_path_factory.mktemp("tiny-chat") / "tiny-llama"
    shutil.copytree(tiny_llama, dest)
    shutil.copy(smollm2_hf_dir / "chat_template.jinja", dest / "chat_template.jinja")
    return dest


@pytest.fixture(scope="module")
def exported(tiny_chat: Path, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    tmp = tmp_path_factory.mktemp("litert")
    cfg = LiteRTExportConfig(prefill_length=PREFILL, cache_length=CACHE)
    return LiteRTExporter(cfg).export(tiny_chat, _ctx(tmp), tmp / "fp32")


@pytest.fixture(scope="module")
def torch_model(tiny_llama: Path) -> torch.nn.Module:
    from edgesmith.models import load_hf

    return load_hf(tiny_llama)[0]


def _torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_fp32_reproduces_pytorch_through_prefill_and_decode(exported: Artifact,
                                                            torch_model: torch.nn.Module) -> None:
    ids = _ids(90)
    ref = _torch_logits(torch_model, ids)
    sess = for_format("litert").open(exported.path, threads=2, n_ctx=CACHE)
    assert isinstance(sess, LiteRTSession) and sess.prefill_len == PREFILL
    # start=45: one full prefill chunk of 32 + a padded one of 13, then 44 decode steps
    lp = sess.logprobs(ids, start=45)
    ref_lp = torch.log_softmax(torch.tensor(ref[45:-1]), -1).numpy()
    assert lp.shape == ref_lp.shape
    assert kl_divergence(ref_lp, lp).mean() < 1e-6
    # the raw logits, one decode step after a prefill (the hand-off), as the issue measured
    sess.reset()
    pos = sess.prefill(ids[:40])
    logits = sess.decode(ids[40], pos)
    assert np.abs(logits - ref[40]).max() < 2e-3, np.abs(logits - ref[40]).max()
    # decode only (start=0) agrees too
    lp0 = sess.logprobs(ids[:20], start=0)
    ref0 = torch.log_softmax(torch.tensor(ref[:19]), -1).numpy()
    assert kl_divergence(ref0, lp0).mean() < 1e-6
    sess.close()


def test_greedy_generation_equals_transformers(exported: Artifact,
                                               torch_model: torch.nn.Module) -> None:
    prompt = _ids(37, seed=1)
    sess = runner_for(exported.path).open(exported.path, threads=2, n_ctx=CACHE)
    gen = sess.generate(prompt, 12)
    with torch.no_grad():
        ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                   min_new_tokens=12)[0, 37:].tolist()
    assert gen.generated_tokens == ref
    assert gen.decode_tps > 0 and gen.prompt_tokens == 37


def test_context_past_the_cache_is_refused(exported: Artifact) -> None:
    with pytest.raises(ModelError, match="KV cache"):
        for_format("litert").open(exported.path, threads=2, n_ctx=CACHE + 1)
    sess = LiteRTSession(exported.path, threads=2)
    with pytest.raises(ModelError, match="KV cache"):
        sess.logprobs(_ids(CACHE + 2))


def test_folder_layout_and_litertlm_chat_in_litert_lm(exported: Artifact,
                                                      tiny_llama: Path) -> None:
    names = {p.name for p in exported.path.iterdir()}
    assert {"model.tflite", "model.litertlm", "tokenizer.json", "config.json"} <= names
    assert names <= set(LiteRTExporter.published_names("m", "fp32"))
    (check,) = exported.meta["checks"]
    # a random model's greedy answer is gibberish, but the same gibberish in both runtimes:
    # a doubled start token or a wrong template changes it
    assert check["name"] == "litert-lm chat" and check["passed"], check["detail"]
    # and the fp32 export answers what transformers answers
    assert check["matches_transformers"], check["detail"]


def test_chat_check_catches_a_doubled_start_token(exported: Artifact, tiny_chat: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """litert_torch's old metadata: <|im_start|> as start token, which LiteRT-LM prepends to a
    prompt whose template writes it already: the answer changes and the check says so."""
    monkeypatch.setattr(litertlm, "adds_bos", lambda tok: True)
    bad = tmp_path / "bad.litertlm"
    litertlm.package(exported.path / "model.tflite", tiny_chat, bad, CACHE)
    check = litertlm.chat_check(bad, tiny_chat, exported.path / "model.tflite")
    assert not check["passed"], check["detail"]


def test_quantized_variants_derived_from_the_export(exported: Artifact, tmp_path: Path,
                                                    torch_model: torch.nn.Module) -> None:
    ids = _ids(70, seed=2)
    ref_lp = torch.log_softmax(torch.tensor(_torch_logits(torch_model, ids)[35:-1]), -1).numpy()
    fp32_size = (exported.path / "model.tflite").stat().st_size
    klds = {}
    for recipe in ("dynamic_wi8c_hr_afp32", "dynamic_wi8_afp32", "weight_only_wi8_afp32"):
        art = quantize(exported, tmp_path / recipe, recipe, _ctx(tmp_path), chat=False)
        assert art.meta["type"] == recipe and art.meta["cache_length"] == CACHE
        assert (art.path / "model.litertlm").is_file()
        assert (art.path / "model.tflite").stat().st_size < 0.4 * fp32_size
        sess = LiteRTSession(art.path, threads=2)
        klds[recipe] = float(kl_divergence(ref_lp, sess.logprobs(ids, start=35)).mean())
        sess.close()
    # int8 weights lose something, not everything
    assert all(0 < k < 0.5 for k in klds.values()), klds


def test_tolerant_template_renders_strings_and_parts_alike(smollm2_hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    original = str(tok.chat_template)
    fixed = litertlm.tolerant_template(original)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in msgs]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   chat_template=original)
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                   chat_template=fixed) == want
    assert tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True,
                                   chat_template=fixed) == want
    with pytest.raises(Exception):  # noqa: B017 - the original fails on parts (the bug)
        tok.apply_chat_template(parts, tokenize=False, add_generation_prompt=True,
                                chat_template=original)
    # SmolLM2 never prepends its BOS, so the package must not declare a start token
    assert not litertlm.adds_bos(tok)


def test_unconvertible_architecture_refused_before_work(tmp_path: Path,
                                                        copy_model) -> None:  # type: ignore[no-untyped-def]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({
        "architectures": ["BertModel"], "model_type": "bert", "hidden_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 128}))
    with pytest.raises(ModelError, match="does not cover BertModel"):
        check_exportable(bert)


def test_cli_refuses_an_encoder_in_one_line(tmp_path: Path) -> None:
    from edgesmith import models

    src = models.resolve("builtin:minilm-l6").path
    r = subprocess.run([sys.executable, "-m", "edgesmith.cli", "export", str(src), "--format",
                        "litert", "-o", str(tmp_path / "out")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    last = r.stderr.strip().splitlines()[-1]  # one line (torchao's import warnings above it)
    assert last.startswith("error:") and "does not cover BertModel" in last
    assert "export LiteRT" not in r.stderr  # refused before the export started


def test_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgesmith.export import litert

    monkeypatch.setitem(sys.modules, "litert_torch", None)  # as if not installed
    with pytest.raises(EdgesmithError, match=r"edgesmith\[litert\]"):
        litert._require()


def test_bench_cli_runs_the_folder(exported: Artifact, tmp_path: Path) -> None:
    folder = tmp_path / "android"
    shutil.copytree(exported.path, folder)
    r = subprocess.run([sys.executable, "-m", "edgesmith.cli", "bench", str(folder), "--runtime",
                        "litert", "--threads", "2", "--prompt-tokens", "40", "--gen-tokens", "8",
                        "--repeat", "1", "--warmup", "0", "--json"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["settings"]["runtime"] == "litert" and res["artifact"]["format"] == "litert"
    assert res["metrics"]["decode_tps"]["median"] > 0
