"""llama.cpp runner through llama-cpp-python (the same library `serve` uses)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import ModelError, require


class LlamaCppSession:
    def __init__(self, path: Path, threads: int | None, n_ctx: int, logits_all: bool,
                 n_batch: int = 512) -> None:
        require("llama_cpp", "gguf")
        from llama_cpp import Llama

        self.path = path
        self.threads = threads or max(1, os.cpu_count() or 1)
        t0 = time.perf_counter()
        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx),
                             n_ubatch=min(n_batch, n_ctx), n_threads=self.threads,
                             n_threads_batch=self.threads, logits_all=logits_all,
                             verbose=False, seed=0)
        except (ValueError, RuntimeError) as exc:
            raise ModelError(f"llama.cpp cannot load {path}: {exc}",
                             "check that the file is a complete GGUF of a supported model") from exc
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
        logits = np.asarray(self.llm.scores[start : len(token_ids) - 1])
        return log_softmax(logits)

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        """Greedy generation of exactly ``n`` tokens (EOS is not a stop: fixed work to time)."""
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_tokens)
        t_prefill = time.perf_counter() - t0
        out: list[int] = []
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ttft = time.perf_counter() - t0
        out.append(tok)
        t1 = time.perf_counter()
        for _ in range(n - 1):
            llm.eval([tok])
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(tok)
        decode = time.perf_counter() - t1
        return GenerationResult(len(prompt_tokens), out, self.detokenize(out), ttft, t_prefill,
                                decode)

    def close(self) -> None:
        self.llm.close()


class LlamaCppRunner:
    name = "llama_cpp"
    formats = ("gguf",)

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> LlamaCppSession:
        return LlamaCppSession(Path(artifact), threads, n_ctx, logits_all)
