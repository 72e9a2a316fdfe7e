"""The harness's parts on the real builtin model: artifact facts, memory, bandwidth, spec."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.bench import env, speed
from edgesmith.bench.runners import runner_for
from edgesmith.errors import EdgesmithError, ModelError
from edgesmith.models import builtin_path


def test_artifact_info_of_real_gguf() -> None:
    path = builtin_path("smollm2-135m")
    info = speed.artifact_info(path)
    assert info.quant == "Q4_1"
    assert info.size_bytes == path.stat().st_size
    assert 130e6 < info.n_params < 140e6  # SmolLM2-135M
    # tied embeddings: the embedding matrix is the output layer and is read for every token
    assert 0.9 * info.size_bytes < info.weight_bytes_per_token <= info.size_bytes
    assert len(info.sha256) == 64


def test_generate_is_greedy_and_deterministic() -> None:
    path = builtin_path("smollm2-135m")
    session = runner_for(path).open(path, threads=2, n_ctx=64)
    try:
        prompt = speed.prompt_ids(session, 12)
        a, b = session.generate(prompt, 6), session.generate(prompt, 6)
    finally:
        session.close()
    assert len(prompt) == 12 and len(a.generated_tokens) == 6
    assert a.generated_tokens == b.generated_tokens
    assert len(set(a.generated_tokens)) > 1  # real argmax, not a constant
    assert 0 < a.prefill_s <= a.ttft_s and a.decode_s > 0 and a.decode_tps > 0


def test_measure_counts_repeats_not_warmup() -> None:
    path = builtin_path("smollm2-135m")
    spec = speed.SpeedSpec(threads=1, prompt_tokens=8, gen_tokens=4, repeat=3, warmup=2)
    opened: list[int] = []

    def open_session():  # type: ignore[no-untyped-def]
        opened.append(1)
        return runner_for(path).open(path, threads=1, n_ctx=spec.n_ctx)

    m = speed.measure(open_session, spec, reload_each_repeat=True)
    assert len(opened) == 5
    assert len(m.decode_tps.samples) == 3 and m.decode_tps.spread >= 1.0
    assert m.peak_rss_mb.min > path.stat().st_size / 1e6 * 0.5  # the weights are resident


def test_bandwidth_and_environment() -> None:
    bw = env.memory_bandwidth_gbs(2, total_mb=64, rounds=2)
    assert 0.1 < bw < 2000
    e = env.environment(2, bandwidth_gbs=bw)
    assert e.cores_logical >= 1 and e.ram_total_gb > 0 and e.cpu_model
    assert e.versions["llama-cpp-python"] != "not installed"


def test_peak_rss_grows_with_allocation() -> None:
    # in a fresh process: in this one, a long test session leaves freed but resident heap that a
    # new allocation may reuse without growing the resident set
    code = """
from edgesmith.bench import speed
speed.reset_peak_rss()
before = speed.peak_rss_mb()
block = bytearray(200 * 1024 * 1024)
block[::4096] = b"x" * len(block[::4096])
print(before, speed.peak_rss_mb())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert after > before + 150


@pytest.mark.parametrize("field", ["threads", "prompt_tokens", "gen_tokens", "repeat"])
def test_spec_rejects_zero(field: str) -> None:
    kwargs = {"threads": 1, field: 0}
    with pytest.raises(EdgesmithError, match=field.replace("_", "-")):
        speed.SpeedSpec(**kwargs)


def test_check_artifact_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        speed.check_artifact(tmp_path / "missing.gguf")
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model")
    with pytest.raises(ModelError, match="not a GGUF"):
        speed.check_artifact(fake)
