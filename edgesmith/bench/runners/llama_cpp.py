"""llama.cpp runner through llama-cpp-python (the same library `serve` uses)."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import ModelError, require
from edgesmith.gguf_file import GGUFHeader, validated_header
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


_LOG_LOCK = threading.Lock()  # llama.cpp has one log callback per process
# ggml_log_level of the pinned llama.cpp (ggml.h: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4,
# CONT 5; llama-cpp-python's _logger.py still lists an older order)
_GGML_LOG_WARN, _GGML_LOG_ERROR, _GGML_LOG_CONT = 3, 4, 5
# follow-up lines that only say that loading stopped ("failed to load model", "failed to read
# tensor info"): the reason is the error line before them
_GENERIC = re.compile(r"failed to (load|read|initiali[sz]e)|error loading model: \w+: failed")
_LOAD_HINT = "check that the file is a complete GGUF of a supported model"


@contextmanager
def llama_log() -> Iterator[list[tuple[int, str]]]:
    """Capture llama.cpp's warnings and errors (level, text) while the block runs, instead of
    printing them; llama-cpp-python's own callback is put back afterwards."""
    import ctypes

    llama_cpp = require_llama_cpp("gguf")
    from llama_cpp import _logger

    lines: list[tuple[int, str]] = []
    last = [0]

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        if level == _GGML_LOG_CONT:
            level = last[0]
        last[0] = level
        if level in (_GGML_LOG_WARN, _GGML_LOG_ERROR) and len(lines) < 1000:
            lines.append((level, text.decode("utf-8", errors="replace")))

    with _LOG_LOCK:
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def load_error(lines: list[tuple[int, str]]) -> str | None:
    """Why llama.cpp refused a file: its first specific error line, else its last one."""
    errors = [" ".join(t.split()) for lvl, t in lines if lvl == _GGML_LOG_ERROR and t.strip()]
    specific = [e for e in errors if not _GENERIC.search(e)]
    if specific:
        line = specific[0]
    elif errors:
        line = errors[-1]
    else:
        return None
    line = line.split("error loading model: ")[-1]
    return re.sub(r"^\w+: ", "", line)[:300]


def check_chat_templates(path: Path, header: GGUFHeader) -> None:
    """Compile the file's chat templates as llama-cpp-python's ``Llama(...)`` does (it compiles
    every ``tokenizer.chat_template*`` string while loading, and a syntax error there escapes
    as TemplateSyntaxError); ModelError naming the file, the key and the problem."""
    import jinja2
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    for key, value in header.fields.items():
        if not (key == "tokenizer.chat_template" or key.startswith("tokenizer.chat_template."))\
                or not isinstance(value, str):
            continue
        try:
            Jinja2ChatFormatter(template=value, eos_token="", bos_token="")
        except (jinja2.TemplateError, RecursionError, MemoryError) as exc:
            raise ModelError(f"the chat template {key} of {path} does not compile: "
                             f"{_template_problem(exc)}",
                             "write a working one into a copy of the file: gguf-new-metadata "
                             "IN OUT --chat-template-file TEMPLATE.jinja (from the gguf "
                             "package)") from exc


def _template_problem(exc: BaseException) -> str:
    line = getattr(exc, "lineno", None)
    text = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
    return " ".join((text + (f" (line {line})" if line else "")).split())[:300]


def open_llama(path: Path, **params: Any) -> Any:
    """A ``llama_cpp.Llama`` on the GGUF at ``path``, for bench, quality checks and serve
    (``params``: Llama's own; verbose is off): ``check_gguf`` then ``load_llama``."""
    check_gguf(path)
    return load_llama(path, **params)


def check_gguf(path: Path) -> None:
    """What must hold before llama.cpp gets the file: its header (``gguf_file.check_structure``:
    llama.cpp answers many bad headers with an assert that kills the process without a word)
    and its chat templates. ModelError naming the file and the problem."""
    check_chat_templates(path, validated_header(path))


def load_llama(path: Path, **params: Any) -> Any:
    """``llama_cpp.Llama`` on a checked file; when llama.cpp refuses it, the ModelError says
    why, from llama.cpp's log."""
    import jinja2
    from llama_cpp import Llama

    with llama_log() as lines:
        try:
            return Llama(model_path=str(path), verbose=False, **params)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {path}: {load_error(lines) or exc}",
                             _LOAD_HINT) from exc
        except jinja2.TemplateError as exc:  # check_chat_templates compiles them all first
            raise ModelError(f"a chat template of {path} does not compile: "
                             f"{_template_problem(exc)}", _LOAD_HINT) from exc


class LlamaCppSession:
    def __init__(self, path: Path, threads: int | None, n_ctx: int, logits_all: bool,
                 n_batch: int = 512) -> None:
        require_llama_cpp("gguf")
        check_gguf(path)
        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        t0 = time.perf_counter()
        self.llm = load_llama(path, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                              n_ubatch=min(n_batch, n_ctx), n_threads=self.threads,
                              n_threads_batch=self.threads, logits_all=logits_all, seed=0,
                              **CONTEXT_DEFAULTS)
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
