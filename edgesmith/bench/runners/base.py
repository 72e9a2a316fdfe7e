"""The Runner plug point: open an artifact in its runtime and get a Session.

One code path serves the quality check in ``compress`` and the speed benchmark in ``bench``,
so the numbers in a report come from the code a user would run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np


@dataclass
class GenerationResult:
    """One generation, timed: prefill is the prompt's evaluation, decode the rest."""

    prompt_tokens: int
    generated_tokens: list[int]
    text: str
    ttft_s: float  # prompt evaluation + first token sampled
    prefill_s: float
    decode_s: float  # time for generated tokens after the first
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def prefill_tps(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        n = len(self.generated_tokens) - 1
        return n / self.decode_s if self.decode_s > 0 and n > 0 else 0.0


class Session(Protocol):
    load_s: float
    n_vocab: int

    def tokenize(self, text: str, add_special: bool = False) -> list[int]: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        """Log-softmax over the vocabulary predicting token i+1 at positions start..n-2."""
        ...

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult: ...

    def close(self) -> None: ...


class Runner(Protocol):
    name: str
    formats: tuple[str, ...]

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> Session: ...


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float32, copy=False)
    m = logits.max(axis=-1, keepdims=True)
    z = logits - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
