"""LiteRT runner: the Android artifact's ``.tflite`` in LiteRT's own interpreter
(``ai-edge-litert``, XNNPACK on CPU), on this host: its figures are the host CPU's, labelled
so, not a phone's.

The model ``litert_torch.generative.export_hf`` writes has two kinds of signatures over one
external KV cache (``kv_cache_k_N`` / ``kv_cache_v_N``, ``[1, kv_heads, cache_len, head_dim]``
for keys, values transposed, fed in and handed back as outputs):

- ``prefill_P``: ``tokens [1, P]``, ``input_pos [P]``, an additive ``mask [1, 1, P, C]``;
  it returns only the updated cache (no logits), as LiteRT-LM uses it;
- ``decode``: one token, ``mask [1, 1, 1, C]``; it returns the cache and ``logits [1, 1, V]``.

So a window's log-probabilities are measured the way LiteRT-LM runs a prompt: the context the
evaluator does not score (the first half of each window) goes through ``prefill`` in chunks of
``P`` (a short chunk padded; padded positions are masked now and overwritten later), and every
scored position through ``decode`` on the cache prefill handed over. Each scored token thus
exercises the prefill -> decode hand-off. A prefill chunk that would run past the cache
(``tfl.dynamic_update_slice`` clamps its start, overwriting earlier entries) is decoded instead.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import DependencyError, ModelError

MODEL_NAMES = ("model.tflite",)
NEG = np.float32(-1e30)  # additive mask value (finite: no inf - inf in a padded row)
HOST_LABEL = "host CPU (LiteRT interpreter, XNNPACK): not a phone's figure"


def model_file(artifact: Path) -> Path:
    """The ``.tflite`` of an artifact: the file itself, or ``model.tflite`` in its folder."""
    artifact = Path(artifact)
    if artifact.is_file() and artifact.suffix == ".litertlm":  # the .tflite packed beside it
        artifact = artifact.parent
    if artifact.is_file():
        if artifact.suffix != ".tflite":
            raise ModelError(f"{artifact} is not a .tflite file",
                             "pass model.tflite or the folder written by --target "
                             "android-midrange (a .litertlm runs in LiteRT-LM, see the manifest)")
        return artifact
    for name in MODEL_NAMES:
        if (artifact / name).is_file():
            return artifact / name
    raise ModelError(f"{artifact} holds no model.tflite",
                     "pass the folder written by `edgesmith compress --target android-midrange`")


def interpreter(path: Path, threads: int | None) -> Any:
    """LiteRT's Interpreter on ``path`` (XNNPACK is its default CPU delegate)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise DependencyError(f"the LiteRT runtime is not installed ({exc})",
                              "pip install 'edgesmith[litert]'") from exc
    try:
        return Interpreter(model_path=str(path), num_threads=threads or None)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"LiteRT refused {path}: {str(exc).splitlines()[0][:300]}",
                         "re-export it with `edgesmith compress --target android-midrange`"
                         ) from exc


class LiteRTSession:
    """A prefill/decode ``.tflite`` with its tokenizer, the KV cache kept here between calls."""

    def __init__(self, artifact: Path, threads: int | None = None) -> None:
        from transformers import PreTrainedTokenizerFast

        path = model_file(artifact)
        folder = path.parent
        t0 = time.perf_counter()
        self.interp = interpreter(path, threads)
        sigs = self.interp.get_signature_list()
        prefills = sorted(int(m.group(1)) for s in sigs if (m := re.fullmatch(r"prefill_(\d+)", s)))
        if "decode" not in sigs or not prefills:
            raise ModelError(f"{path} has signatures {sorted(sigs)}, not prefill_N + decode",
                             "export it with `edgesmith compress --target android-midrange`")
        self.decoder = self.interp.get_signature_runner("decode")
        self.prefill_len = prefills[-1]
        self.prefiller = self.interp.get_signature_runner(f"prefill_{self.prefill_len}")
        self.load_s = time.perf_counter() - t0
        self.path = path
        details = self.decoder.get_input_details()
        self.kv_names = sorted((n for n in details if n.startswith("kv_cache_")),
                               key=lambda n: (int(n.rsplit("_", 1)[1]), n))
        self.kv_shapes = {n: tuple(int(x) for x in details[n]["shape"]) for n in self.kv_names}
        self.mask_dtype = details["mask"]["dtype"]
        self.cache_len = int(details["mask"]["shape"][-1])
        out = self.decoder.get_output_details()
        self.n_vocab = int(out["logits"]["shape"][-1])
        tok_file = folder / "tokenizer.json"
        if not tok_file.exists():
            raise ModelError(f"{folder} has no tokenizer.json", "re-export the model folder")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        cfg = folder / "config.json"
        self.config: dict[str, Any] = json.loads(cfg.read_text()) if cfg.exists() else {}
        self.cache: dict[str, np.ndarray] = {}
        self.reset()

    # -- the KV cache hand-off ----------------------------------------------------------------
    def reset(self) -> None:
        self.cache = {n: np.zeros(s, dtype=np.float32) for n, s in self.kv_shapes.items()}

    def _mask(self, pos: int, n: int) -> np.ndarray:
        """Additive causal mask for ``n`` query rows at positions pos..pos+n-1."""
        cols = np.arange(self.cache_len)[None, :]
        rows = pos + np.arange(n)[:, None]
        return np.where(cols <= rows, 0.0, NEG).astype(self.mask_dtype)[None, None]

    def _check_room(self, end: int) -> None:
        if end > self.cache_len:
            raise ModelError(f"{end} tokens do not fit the model's KV cache of {self.cache_len}",
                             "export with a larger cache_length in the recipe, or use a shorter "
                             "context (eval.ctx / --prompt-tokens + --gen-tokens)")

    def prefill(self, ids: list[int], pos: int = 0) -> int:
        """Write ``ids`` at positions pos.. into the cache (prefill chunks; a tail that would
        run past the cache is decoded); returns the next position."""
        self._check_room(pos + len(ids))
        p = self.prefill_len
        i = 0
        while i < len(ids):
            chunk = ids[i : i + p]
            if pos + p > self.cache_len:  # the padded chunk would be clamped: decode the rest
                for t in ids[i:]:
                    self.decode(t, pos)
                    pos += 1
                return pos
            tokens = np.zeros((1, p), dtype=np.int32)
            tokens[0, : len(chunk)] = chunk
            out = self.prefiller(tokens=tokens, input_pos=np.arange(pos, pos + p, dtype=np.int32),
                                 mask=self._mask(pos, p), **self.cache)
            self.cache = {n: out[n] for n in self.kv_names}
            pos += len(chunk)
            i += len(chunk)
        return pos

    def decode(self, token: int, pos: int) -> np.ndarray:
        """One token at ``pos`` on the cache; returns its logits [V] (the next token's)."""
        self._check_room(pos + 1)
        out = self.decoder(tokens=np.asarray([[token]], dtype=np.int32),
                           input_pos=np.asarray([pos], dtype=np.int32),
                           mask=self._mask(pos, 1), **self.cache)
        self.cache = {n: out[n] for n in self.kv_names}
        return np.asarray(out["logits"]).reshape(-1)

    # -- the Session protocol ---------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        """Rows predicting token i+1 for i in start..n-2: tokens before ``start`` prefilled,
        each scored position decoded on the cache prefill handed over."""
        ids = [int(t) for t in token_ids]
        self._check_room(len(ids))
        self.reset()
        pos = self.prefill(ids[:start], 0) if start > 0 else 0
        rows = np.empty((len(ids) - 1 - start, self.n_vocab), dtype=np.float32)
        for k, t in enumerate(ids[start:-1]):
            rows[k] = self.decode(t, pos)
            pos += 1
        return log_softmax(rows)

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        """Greedy: the prompt but its last token prefilled, the last decoded (its logits give
        the first token, as LiteRT-LM does), then ``n - 1`` decode steps."""
        ids = [int(t) for t in prompt_tokens]
        self._check_room(len(ids) + n)
        self.reset()
        t0 = time.perf_counter()
        pos = self.prefill(ids[:-1], 0)
        prefill = time.perf_counter() - t0
        logits = self.decode(ids[-1], pos)
        pos += 1
        toks = [int(np.argmax(logits))]
        ttft = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(n - 1):
            logits = self.decode(toks[-1], pos)
            pos += 1
            toks.append(int(np.argmax(logits)))
        decode = time.perf_counter() - t1
        return GenerationResult(len(ids), toks, self.detokenize(toks), ttft, prefill, decode,
                                extra={"cache_len": float(self.cache_len)})

    def close(self) -> None:
        self.interp = self.decoder = self.prefiller = None
        self.cache = {}


def artifact_info(artifact: Path) -> Any:
    """ArtifactInfo of the .tflite (what the interpreter loads; the .litertlm packs the same)."""
    from edgesmith.bench.results import ArtifactInfo
    from edgesmith.fsutil import sha256_file

    path = model_file(artifact)
    size = path.stat().st_size
    return ArtifactInfo(name=f"{path.parent.resolve().name}/{path.name}", path=str(path),
                        format="litert", size_bytes=size, sha256=sha256_file(path),
                        quant=_recipe_of(path) or _dominant_dtype(path), n_params=size,
                        weight_bytes_per_token=size)


def _recipe_of(path: Path) -> str | None:
    """The recipe a compress run recorded in the folder's manifest, if there is one."""
    man = path.parent / "manifest.json"
    try:
        arts = json.loads(man.read_text()).get("artifacts", []) if man.exists() else []
    except (OSError, ValueError):
        return None
    return next((a.get("type") for a in arts if a.get("format") == "litert"), None)


def _dominant_dtype(path: Path) -> str:
    """The dtype holding most elements among the model's large tensors (the weights)."""
    counts: dict[str, int] = {}
    for t in interpreter(path, 1).get_tensor_details():
        n = int(np.prod(t["shape"])) if len(t["shape"]) >= 2 else 0
        if n >= 1 << 14:
            name = np.dtype(t["dtype"]).name
            counts[name] = counts.get(name, 0) + n
    return max(counts, key=lambda k: counts[k]) if counts else "unknown"


def bench(artifact: Path, spec: Any, *, device: str | None = None, progress: Any = None,
          command: list[str] | None = None, reference: str | None = None) -> Any:
    """``bench --runtime litert``: the usual results file, measured in LiteRT's interpreter on
    this host's CPU; the device says so."""
    from edgesmith.bench import speed
    from edgesmith.bench.env import environment

    runner = LiteRTRunner()
    info = artifact_info(artifact)
    env = environment(spec.threads)

    def open_session() -> LiteRTSession:
        return runner.open(Path(artifact), threads=spec.threads, n_ctx=spec.n_ctx)

    metrics = speed.measure(open_session, spec, reload_each_repeat=True, progress=progress,
                            label=f"bench {info.name} (LiteRT)")
    label = device or f"{env.hostname} ({HOST_LABEL})"
    q = speed.quality_of(Path(artifact), reference, spec.threads, progress) if reference \
        else None
    return speed.assemble(info=info, spec=spec, metrics=metrics, env=env, runtime=runner.name,
                          reload_each_repeat=True, device=label, source="local",
                          command=command, quality=q)


class LiteRTRunner:
    name = "litert"
    formats = ("litert",)
    # the quality figures come from LiteRT's interpreter on this host's CPU (XNNPACK)
    verified = "in LiteRT's interpreter (ai-edge-litert, XNNPACK) on the host CPU"
    device_label = HOST_LABEL

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> LiteRTSession:
        sess = LiteRTSession(Path(artifact), threads)
        if n_ctx > sess.cache_len:
            raise ModelError(f"a context of {n_ctx} tokens does not fit {sess.path}'s KV cache "
                             f"of {sess.cache_len}",
                             "export with a larger cache_length, or lower the context")
        return sess
