"""ONNX Runtime runner (Python, CPU EP): the browser artifact's own runtime, outside a browser.

Opens a model folder in the transformers.js layout (``config.json``, ``tokenizer.json``,
``onnx/model*.onnx``) or one ``.onnx`` file beside its config, and runs the causal LM with
its KV cache (``past_key_values.N.key|value`` in, ``present.N.key|value`` out), as
onnxruntime-web does in the page. ``compress`` measures quality with it, ``bench`` speed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import ModelError

ONNX_NAMES = ("model_q4.onnx", "model_q4f16.onnx", "model_int8.onnx", "model_fp16.onnx",
              "model.onnx")


def model_file(artifact: Path, dtype: str | None = None) -> Path:
    """The ``.onnx`` file of a model folder (``dtype`` picks ``model_{dtype}.onnx``)."""
    artifact = Path(artifact)
    if artifact.is_file():
        return artifact
    onnx_dir = artifact / "onnx"
    if dtype is not None:
        name = "model.onnx" if dtype == "fp32" else f"model_{dtype}.onnx"
        if not (onnx_dir / name).exists():
            raise ModelError(f"{artifact} has no onnx/{name}",
                             f"export it with `edgesmith export --format onnx --dtype {dtype}`")
        return onnx_dir / name
    for name in ONNX_NAMES:
        if (onnx_dir / name).exists():
            return onnx_dir / name
    raise ModelError(f"{artifact} holds no ONNX model (onnx/model*.onnx)",
                     "pass a folder written by `edgesmith export --format onnx`")


def model_folder(artifact: Path) -> Path:
    """The folder holding config.json and the tokenizer (the model file's grandparent)."""
    artifact = Path(artifact)
    if artifact.is_dir():
        return artifact
    for cand in (artifact.parent, artifact.parent.parent):
        if (cand / "config.json").exists():
            return cand
    raise ModelError(f"no config.json beside {artifact}",
                     "pass the whole folder written by `edgesmith export --format onnx`")


class OnnxSession:
    """One onnxruntime InferenceSession of a causal LM with its tokenizer."""

    def __init__(self, artifact: Path, threads: int | None, dtype: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelError("onnxruntime is not installed",
                             "pip install 'edgesmith[onnx]'") from exc
        from transformers import PreTrainedTokenizerFast

        path = model_file(artifact, dtype)
        folder = model_folder(artifact)
        self.config: dict[str, Any] = json.loads((folder / "config.json").read_text())
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        t0 = time.perf_counter()
        try:
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)
            raise ModelError(f"onnxruntime refused {path}: {first}",
                             "re-export the model with `edgesmith export --format onnx`") from exc
        self.load_s = time.perf_counter() - t0
        self.path = path
        tok_file = folder / "tokenizer.json"
        if not tok_file.exists():
            raise ModelError(f"{folder} has no tokenizer.json", "re-export the model folder")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        self.inputs = {i.name: i for i in self.sess.get_inputs()}
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        for need in ("input_ids", "attention_mask"):
            if need not in self.inputs:
                raise ModelError(f"{path} has no input {need!r}",
                                 "export it with `edgesmith export --format onnx`")
        kv = self.inputs[self.past_names[0]] if self.past_names else None
        cfg = self.config
        heads = int(cfg.get("num_attention_heads") or 1)
        dims = {1: int(cfg.get("num_key_value_heads") or heads),
                3: int(cfg.get("head_dim") or int(cfg.get("hidden_size", 0)) // heads)}
        # a static size in the graph, else (a symbolic one, as onnxruntime-genai's builder
        # writes) the config's
        self.kv_heads, self.head_dim = (
            (kv.shape[i] if isinstance(kv.shape[i], int) else dims[i]) if kv is not None else 0
            for i in (1, 3))
        self.kv_dtype = np.float16 if kv is not None and "float16" in kv.type else np.float32
        self.n_vocab = int(self.sess.get_outputs()[0].shape[-1] or self.config["vocab_size"])
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def empty_cache(self) -> dict[str, np.ndarray]:
        return {n: np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self.kv_dtype)
                for n in self.past_names}

    def step(self, ids: list[int], past: dict[str, np.ndarray], past_len: int) \
            -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Run ``ids`` after ``past_len`` cached positions; returns (logits [n, V], cache)."""
        n = len(ids)
        feed: dict[str, np.ndarray] = {
            "input_ids": np.asarray([ids], dtype=np.int64),
            "attention_mask": np.ones((1, past_len + n), dtype=np.int64),
            **past,
        }
        if "position_ids" in self.inputs:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        out = self.sess.run(None, feed)
        named = dict(zip(self.outputs, out, strict=True))
        cache = {n.replace("present.", "past_key_values."): v
                 for n, v in named.items() if n.startswith("present.")}
        return named["logits"][0], cache

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        logits, _ = self.step(list(token_ids), self.empty_cache(), 0)
        return log_softmax(logits[start : len(token_ids) - 1].astype(np.float32))

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        t0 = time.perf_counter()
        logits, cache = self.step(list(prompt_tokens), self.empty_cache(), 0)
        prefill = time.perf_counter() - t0
        toks = [int(np.argmax(logits[-1]))]
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        pos = len(prompt_tokens)
        for _ in range(n - 1):
            logits, cache = self.step([toks[-1]], cache, pos)
            pos += 1
            toks.append(int(np.argmax(logits[-1])))
        decode = time.perf_counter() - t1
        return GenerationResult(len(prompt_tokens), toks, self.detokenize(toks), ttft, prefill,
                                decode)

    def close(self) -> None:
        self.sess = None  # type: ignore[assignment]


class OnnxRuntimeRunner:
    name = "onnxruntime"
    formats = ("onnx",)

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False, dtype: str | None = None) -> OnnxSession:
        return OnnxSession(Path(artifact), threads, dtype)
