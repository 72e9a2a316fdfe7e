"""llama.cpp runner through llama-cpp-python (the same library `serve` uses)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import ModelError, require
from edgesmith.interrupts import check as check_interrupt

_AMX_WARNED = False
# Context settings every llama.cpp context of edgesmith uses (quality check, bench, serve):
# flash attention on, as llama.cpp's own tools (llama-cli, llama-server, llama-bench) resolve
# their default "auto" on a CPU; llama-cpp-python's default is off, 3-8% slower here.
CONTEXT_DEFAULTS: dict[str, Any] = {"flash_attn": True}


def require_llama_cpp(extra: str) -> Any:
    """Import llama_cpp (or fail naming the extra); warn once if this build uses AMX.

    llama.cpp's AMX matmul crashes with SIGSEGV on some machines that report AMX
    (ggml-org/llama.cpp#20824); ``make install`` compiles it out, a llama-cpp-python
    installed by other means may not have.
    """
    global _AMX_WARNED
    llama_cpp = require("llama_cpp", extra)
    if not _AMX_WARNED and "AMX_INT8 = 1" in llama_cpp.llama_print_system_info().decode():
        _AMX_WARNED = True
        sys.stderr.write(
            "warning: this llama-cpp-python was built with AMX, which crashes (SIGSEGV) on some "
            "machines (llama.cpp#20824); if it does, rebuild it: CMAKE_ARGS=\"-DGGML_NATIVE=ON "
            "'-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16' "
            "'-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16'\" pip install "
            "--force-reinstall --no-deps --no-cache-dir llama-cpp-python (or run make install)\n")
    return llama_cpp


class LlamaCppSession:
    def __init__(self, path: Path, threads: int | None, n_ctx: int, logits_all: bool,
                 n_batch: int = 512) -> None:
        require_llama_cpp("gguf")
        from llama_cpp import Llama

        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        t0 = time.perf_counter()
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                             n_ubatch=min(n_batch, n_ctx), n_threads=self.threads,
                             n_threads_batch=self.threads, logits_all=logits_all,
                             verbose=False, seed=0, **CONTEXT_DEFAULTS)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {path}: {exc}",
                             "check that the file is a complete GGUF of a supported model") from exc
        check_interrupt()  # Ctrl-C during the load lands in a log callback and is swallowed
        self.load_s = time.perf_counter() - t0
        self.n_vocab = self.llm.n_vocab()
        self.n_ctx = n_ctx

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=add_special)

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", errors="replace")

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(token_ids)
        check_interrupt()
        logits = np.asarray(self.llm.scores[start : len(token_ids) - 1])
        return log_softmax(logits)

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        """Greedy generation of exactly ``n`` tokens (EOS is not a stop: fixed work to time)."""
        return generate_greedy(self.llm, prompt_tokens, n)

    def close(self) -> None:
        self.llm.close()


class LlamaCppRunner:
    name = "llama_cpp"
    formats = ("gguf",)

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> LlamaCppSession:
        return LlamaCppSession(Path(artifact), threads, n_ctx, logits_all)


def generate_greedy(llm: Any, prompt_tokens: list[int], n: int) -> GenerationResult:
    """Time a greedy generation on a loaded ``llama_cpp.Llama`` (also used by the server).

    The argmax is read straight from llama.cpp's logits buffer of the last position (no copy
    of the score matrix, which this llama-cpp-python only fills with logits_all), so the
    timed loop is llama_decode plus one vocabulary-sized argmax per token: as close to
    llama-bench as Python gets. Every call starts from an empty context.
    """
    if not prompt_tokens or n < 1:
        raise ValueError("generate needs at least one prompt token and n >= 1")
    n_vocab = llm.n_vocab()

    def argmax_last() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        return int(logits.argmax())

    llm.reset()  # the next eval drops the whole KV cache
    t0 = time.perf_counter()
    llm.eval(prompt_tokens)
    prefill = time.perf_counter() - t0
    out = [argmax_last()]
    ttft = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(n - 1):
        llm.eval(out[-1:])
        out.append(argmax_last())
    check_interrupt()  # after the timed loop: a no-op unless Ctrl-C was swallowed
    decode = time.perf_counter() - t1
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    return GenerationResult(len(prompt_tokens), out, text, ttft, prefill, decode)
