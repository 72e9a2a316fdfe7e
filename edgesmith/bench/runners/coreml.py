"""Core ML runner: what Linux can do with an ``.mlpackage`` (``predict`` needs macOS).

``open`` reads the package (spec and MIL program, ``skip_model_load=True``), decompresses
every weight from it and puts them into the PyTorch decoder that was traced for the export
(``export/coreml_llama``), so ``logprobs`` scores the package's own stored weights: quality
is estimated on Linux, not run in Core ML (on the device activations and the KV cache are
fp16). ``generate`` refuses: speed needs Core ML on macOS/iOS, and a PyTorch figure would
not be the phone's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import DependencyError
from edgesmith.export import coreml_package as pkgio

VERIFIED = "estimated on Linux (package weights run in PyTorch), not run in Core ML: " \
           "predict needs macOS"
NO_SPEED = DependencyError("Core ML speed needs macOS or an iPhone: predict does not run on "
                           "Linux, so edgesmith reports no speed for a .mlpackage here",
                           "measure speed on a Mac or an iPhone (Xcode's Core ML performance "
                           "report); `edgesmith compress` checks its quality here")


class CoreMLSession:
    """The package's weights in the traced PyTorch decoder, with the tokenizer beside it."""

    def __init__(self, artifact: Path, threads: int | None, n_ctx: int = 2048) -> None:
        import torch
        from transformers import PreTrainedTokenizerFast

        from edgesmith.export.coreml_llama import CoreMLLlama, spec_of

        if threads:
            torch.set_num_threads(threads)
        t0 = time.perf_counter()
        self.package = pkgio.package_path(artifact)
        folder = pkgio.model_folder(artifact)
        self.config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        ct = pkgio.require()
        with pkgio.quiet():
            spec = ct.models.MLModel(str(self.package), skip_model_load=True).get_spec()
        self.description = pkgio.describe(spec)
        prog = pkgio.load_weights_program(self.package)  # the export checked the whole program
        self.module = CoreMLLlama(spec_of(self.config), n_ctx, False)
        names = [n for n, _ in self.module.named_parameters()]
        got, self.storage = pkgio.weights(prog, names)
        self.folded = pkgio.fill_identity_norms(got, names, int(self.config["hidden_size"]))
        self.module.load_weights({k: torch.from_numpy(np.asarray(v, dtype=np.float32))
                                  for k, v in got.items()})
        self.module.eval()
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
        self.n_vocab = int(self.config["vocab_size"])
        self.load_s = time.perf_counter() - t0

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        import torch

        n = len(token_ids)
        if self.module.rope_cos.shape[0] < n:  # the rope table follows the longest input
            from edgesmith.export.coreml_llama import CoreMLLlama

            fresh = CoreMLLlama(self.module.s, n, False)
            fresh.load_state_dict(self.module.state_dict(), strict=False)
            self.module = fresh.eval()
        with torch.inference_mode():
            logits = self.module(torch.tensor([token_ids]))[0, start : n - 1]
        return log_softmax(logits.float().numpy())

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        raise NO_SPEED

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]


class CoreMLRunner:
    name = "coreml"
    formats = ("coreml",)
    verified = VERIFIED

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> CoreMLSession:
        pkgio.require()
        return CoreMLSession(Path(artifact), threads, n_ctx)

    @staticmethod
    def check_speed() -> None:
        """``bench`` calls this before timing anything: Core ML speed needs macOS."""
        raise NO_SPEED
