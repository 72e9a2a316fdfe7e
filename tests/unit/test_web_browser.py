"""The model in a real headless chromium (onnxruntime-web on WebGPU and wasm), checked against
Python onnxruntime; the f16 trap; `bench --runtime browser`; the `serve-web` chat page.

The tiny Llama of conftest goes through the real ONNX exporter (q4: MatMulNBits, block 32).
WebGPU is SwiftShader here (no GPU): slow, so its prompts stay at 16 tokens.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgesmith.bench.runners.base import log_softmax
from edgesmith.errors import ModelError

pytest.importorskip("playwright")
pytest.importorskip("onnxruntime")

EXE = str(Path(sys.executable).parent / "edgesmith")


@pytest.fixture(scope="module")
def web_model(tiny_llama: Path, smollm2_hf_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama exported to a q4 ONNX folder (transformers.js layout)."""
    from edgesmith.context import RunContext, make_progress
    from edgesmith.export.onnx import OnnxExportConfig, OnnxExporter

    root = tmp_path_factory.mktemp("web")
    with make_progress() as progress:
        ctx = RunContext(out_dir=root, cache_dir=root / "cache", progress=progress, threads=1)
        OnnxExporter(OnnxExportConfig(dtype="q4")).export(tiny_llama, ctx, root / "q4")
    assert (root / "q4" / "onnx" / "model_q4.onnx").exists()
    # a chat template, as an instruct model has (the tiny model's tokenizer files have none)
    shutil.copy(smollm2_hf_dir / "chat_template.jinja", root / "q4" / "chat_template.jinja")
    return root / "q4"


@pytest.fixture(scope="module")
def harness(web_model: Path):  # type: ignore[no-untyped-def]
    from edgesmith.web.browser import Harness

    with Harness(web_model, web_model / "onnx" / "model_q4.onnx") as h:
        yield h


@pytest.fixture(scope="module")
def python_ort(web_model: Path):  # type: ignore[no-untyped-def]
    from edgesmith.bench.runners.onnxruntime import OnnxSession

    s = OnnxSession(web_model, threads=1, dtype="q4")
    yield s
    s.close()


def kld(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    p, q = log_softmax(ref_logits).astype(np.float64), log_softmax(logits).astype(np.float64)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


PROMPT = [int(t) for t in np.random.default_rng(0).integers(3, 49152, 16)]


def test_chromium_offers_a_webgpu_adapter_and_cross_origin_isolation(harness: Any) -> None:
    probe = harness.probe()
    assert probe["gpu"]["available"], probe
    assert probe["gpu"]["maxBufferSize"] >= 1 << 28
    assert probe["isolated"] is True  # COOP/COEP: threaded wasm possible


@pytest.mark.parametrize("backend", ["wasm", "webgpu"])
def test_logits_and_greedy_tokens_match_python_onnxruntime(harness: Any, python_ort: Any,
                                                           backend: str) -> None:
    loaded = harness.load(backend, threads=1)
    assert loaded["kvType"] == "float32" and loaded["inputs"][:3] == \
        ["input_ids", "attention_mask", "position_ids"]
    ref, _ = python_ort.step(PROMPT, python_ort.empty_cache(), 0)
    got = harness.logits(PROMPT)
    assert got.shape == ref.shape == (16, 49152)
    assert kld(ref, got) < 1e-4
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    browser = harness.generate(PROMPT, 16)
    python = python_ort.generate(PROMPT, 16)
    assert browser["tokens"] == python.generated_tokens
    assert len(set(browser["tokens"])) > 1  # a real sequence, not one token repeated
    assert browser["prefillMs"] > 0 and browser["decodeMs"] > 0


def _f16_lm(dest: Path, vocab: int = 64, dim: int = 8) -> np.ndarray:
    """A one-layer LM computing in float16 (embedding, head, a KV cache that appends the
    embeddings), as model_q4f16.onnx; returns its logits table [vocab, vocab]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    emb = rng.normal(0, 1, (vocab, dim)).astype(np.float16)
    w = rng.normal(0, 1, (dim, vocab)).astype(np.float16)
    f16, i64 = TensorProto.FLOAT16, TensorProto.INT64

    def kv(name: str, length: str) -> Any:
        return helper.make_tensor_value_info(name, f16, ["batch_size", 1, length, dim])

    graph = helper.make_graph(
        [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
         helper.make_node("MatMul", ["x", "w"], ["logits"]),
         helper.make_node("Unsqueeze", ["x", "one"], ["x4"]),
         helper.make_node("Concat", ["past_key_values.0.key", "x4"], ["present.0.key"], axis=2),
         helper.make_node("Concat", ["past_key_values.0.value", "x4"], ["present.0.value"],
                          axis=2)],
        "f16lm",
        [helper.make_tensor_value_info("input_ids", i64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("attention_mask", i64,
                                       ["batch_size", "total_sequence_length"]),
         kv("past_key_values.0.key", "past_sequence_length"),
         kv("past_key_values.0.value", "past_sequence_length")],
        [helper.make_tensor_value_info("logits", f16, ["batch_size", "sequence_length", vocab]),
         kv("present.0.key", "total_sequence_length"),
         kv("present.0.value", "total_sequence_length")],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    (dest / "onnx").mkdir(parents=True)
    onnx.save_model(model, str(dest / "onnx" / "model_q4f16.onnx"), save_as_external_data=True,
                    location="model_q4f16.onnx_data", size_threshold=64)
    (dest / "config.json").write_text(json.dumps({
        "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
        "hidden_size": dim, "vocab_size": vocab}))
    return (emb.astype(np.float32) @ w.astype(np.float32)).astype(np.float16)


def test_an_f16_model_on_an_adapter_without_shader_f16_fails_loudly(tmp_path: Path) -> None:
    from edgesmith.web.browser import Harness

    table = _f16_lm(tmp_path / "f16")
    ids = [3, 5, 7]
    with Harness(tmp_path / "f16", tmp_path / "f16" / "onnx" / "model_q4f16.onnx") as h:
        gpu = h.probe()["gpu"]
        if gpu["shaderF16"]:
            pytest.skip("this adapter has shader-f16")
        h.load("wasm", 1)  # f16 on the CPU is fine: the exact table rows
        np.testing.assert_allclose(h.logits(ids), table[ids].astype(np.float32), rtol=2e-3,
                                   atol=2e-3)
        with pytest.raises(ModelError, match="no shader-f16.*load the q4 model"):
            h.load("webgpu", 1)  # the page refuses before running
        # past that check: the native WebGPU EP throws, the older JSEP backend returns zeros
        # without throwing; both end as a ModelError
        h.load("webgpu", 1, unchecked=True)
        with pytest.raises(ModelError, match="requires f16"):
            h.logits(ids)
        h.load("webgpu", 1, unchecked=True, build="jsep")
        with pytest.raises(ModelError, match="logits are zero|validation error"):
            h.logits(ids)
        assert any("validation error" in c.lower() for c in h.console)


def test_a_console_validation_error_fails_the_call(harness: Any) -> None:
    bad_shader = """async () => {
        const device = await (await navigator.gpu.requestAdapter()).requestDevice();
        const module = device.createShaderModule({code: "fn main( {"});
        device.createComputePipeline({layout: "auto", compute: {module, entryPoint: "main"}});
        await device.queue.onSubmittedWorkDone();
        return 1;
    }"""
    with pytest.raises(ModelError, match="Error while parsing WGSL|invalid due to a previous"):
        harness.call(bad_shader)
    assert harness.call("() => 2") == 2  # later calls are judged on their own messages


def test_an_onnx_file_onnxruntime_web_refuses_is_a_model_error(tmp_path: Path,
                                                               web_model: Path) -> None:
    from edgesmith.web.browser import Harness

    bad = tmp_path / "bad"
    (bad / "onnx").mkdir(parents=True)
    (bad / "config.json").write_text((web_model / "config.json").read_text())
    (bad / "onnx" / "model_q4.onnx").write_bytes(
        (web_model / "onnx" / "model_q4.onnx").read_bytes()[:2000])
    with Harness(bad, bad / "onnx" / "model_q4.onnx") as h, \
            pytest.raises(ModelError, match=r"in chromium \(wasm\): .*(session|protobuf|parse)"):
        h.load("wasm", 1)


def test_bench_browser_writes_results_that_report_shows(web_model: Path, tmp_path: Path,
                                                        watched: Any) -> None:
    out = tmp_path / "chromium-wasm.json"
    r = watched([EXE, "bench", str(web_model), "--runtime", "browser", "--browser-backend",
                 "wasm", "--threads", "1", "--prompt-tokens", "16", "--gen-tokens", "8",
                 "--repeat", "2", "--warmup", "0", "-o", str(out), "--json"])
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert json.loads(r.stdout) == data
    assert data["settings"]["runtime"] == "chromium-wasm"
    assert data["artifact"]["format"] == "onnx" and data["artifact"]["quant"] == "q4"
    assert data["environment"]["versions"]["onnxruntime-web"] == "1.30.0"
    assert data["environment"]["versions"]["cross_origin_isolated"] == "True"
    m = data["metrics"]
    assert len(m["decode_tps"]["samples"]) == 2 and m["decode_tps"]["min"] > 0
    assert m["load_s"]["min"] > 0 and m["peak_rss_mb"]["min"] > 50  # chromium's processes
    md = watched([EXE, "report", str(out), "--format", "md"])
    assert md.returncode == 0 and "chromium-wasm" in md.stdout


PIXEL_STATS = """async (b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const img = await createImageBitmap(new Blob([bytes], {type: "image/png"}));
    const canvas = new OffscreenCanvas(img.width, img.height);
    const g = canvas.getContext("2d");
    g.drawImage(img, 0, 0);
    const d = g.getImageData(0, 0, img.width, img.height).data;
    const colors = new Set();
    let headerSum = 0, headerN = 0, blue = 0;
    for (let i = 0; i < d.length; i += 4) {
        const y = Math.floor(i / 4 / img.width);
        colors.add((d[i] << 16) | (d[i + 1] << 8) | d[i + 2]);
        if (y < 30) { headerSum += (d[i] + d[i + 1] + d[i + 2]) / 3; headerN++; }
        if (Math.abs(d[i] - 47) + Math.abs(d[i + 1] - 111) + Math.abs(d[i + 2] - 237) < 40) blue++;
    }
    return {width: img.width, height: img.height, colors: colors.size,
            header: headerSum / headerN, blue};
}"""


def test_serve_web_chats_in_chromium(web_model: Path, python_ort: Any, tmp_path: Path) -> None:
    from edgesmith.web.browser import launch, playwright_session

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([EXE, "serve-web", str(web_model), "--port", "0"],
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        url = None
        for _ in range(200):
            line = proc.stderr.readline() if proc.stderr else ""
            m = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if m:
                url = m.group(1)
                break
            if proc.poll() is not None:
                break
        assert url, f"serve-web did not start (rc {proc.poll()})"
        with playwright_session() as pw:
            # no --enable-unsafe-webgpu: no adapter, so the page must pick wasm by itself
            browser = launch(pw, webgpu=False)
            page = browser.new_page()
            outside: list[str] = []
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith(url) and not r.url.startswith("data:") else None)
            page.goto(url + "/?max_tokens=8")
            page.wait_for_function("document.body.dataset.state !== 'loading'", timeout=120_000)
            assert page.inner_text("#error") == ""
            assert page.inner_text("#backend") == "wasm"
            page.fill("#prompt", "What is the capital of France?")
            page.press("#prompt", "Enter")
            page.wait_for_function("document.body.dataset.state === 'ready' && "
                                   "document.querySelector('.assistant')", timeout=120_000)
            answer = page.inner_text(".assistant")
            stats = page.inner_text("#stats")
            visible = page.is_visible("#prompt") and page.is_enabled("#prompt")
            shot = page.screenshot()
            pixels = page.evaluate(PIXEL_STATS, base64.b64encode(shot).decode())
            browser.close()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    assert outside == []  # every script and file came from the local server
    # the same greedy answer as Python onnxruntime on the chat-templated prompt
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(web_model)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    ref = python_ort.generate(tok.encode(text, add_special_tokens=False), 8).generated_tokens
    eos = json.loads((web_model / "config.json").read_text()).get("eos_token_id")
    ref = ref[: ref.index(eos) + 1] if eos in ref else ref
    assert answer.strip() == python_ort.tokenizer.decode(
        [t for t in ref if t != eos], skip_special_tokens=True).strip()
    assert re.search(r"\d+ prompt tokens, \d+ generated .* decode [\d.]+ tok/s", stats)
    # the screenshot shows the chat UI: not blank, the dark header, the blue Send button
    assert visible
    assert pixels["width"] >= 600 and pixels["height"] >= 300
    assert pixels["colors"] > 20
    assert pixels["header"] < 100
    assert pixels["blue"] > 1000
