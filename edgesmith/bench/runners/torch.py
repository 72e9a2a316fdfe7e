"""Reference runner: the HF model in PyTorch (fp32), used for reference log-probabilities."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from edgesmith.bench.runners.base import GenerationResult


class TorchSession:
    def __init__(self, hf_dir: Path, threads: int | None) -> None:
        import torch

        from edgesmith.models import load_hf

        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_hf(hf_dir)
        self.load_s = time.perf_counter() - t0
        self.n_vocab = int(self.model.config.vocab_size)

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([token_ids])).logits[0, start : len(token_ids) - 1]
            return torch.log_softmax(logits.float(), dim=-1).numpy()

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(torch.tensor([prompt_tokens]), use_cache=True)
            prefill = time.perf_counter() - t0
            past, toks = out.past_key_values, [int(out.logits[0, -1].argmax())]
            ttft = time.perf_counter() - t0
            t1 = time.perf_counter()
            for _ in range(n - 1):
                out = self.model(torch.tensor([[toks[-1]]]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                toks.append(int(out.logits[0, -1].argmax()))
            decode = time.perf_counter() - t1
        return GenerationResult(len(prompt_tokens), toks, self.detokenize(toks), ttft, prefill,
                                decode)

    def close(self) -> None:
        del self.model


class TorchRunner:
    name = "torch"
    formats = ("hf",)

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> TorchSession:
        return TorchSession(Path(artifact), threads)
