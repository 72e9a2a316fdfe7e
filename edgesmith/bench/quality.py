"""Quality against the reference model, measured in the artifact's real runtime.

The held-out text (bundled, never the calibration text) is tokenized once with the reference
tokenizer and cut into windows of ``ctx`` tokens. Like llama.cpp's perplexity tool, only the
second half of each window is scored, so every scored token has at least ctx/2 of context.
The reference log-probabilities (fp32 model, stored as fp16) are computed once and cached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import ModelError
from edgesmith.fsutil import atomic_path, sha256_text


def corpus(name: str) -> str:
    """A bundled corpus: 'heldout' (evaluation) or 'calibration' (imatrix, GPTQ, AWQ)."""
    return (resources.files("edgesmith") / "data" / f"{name}.txt").read_text(encoding="utf-8")


@dataclass(frozen=True)
class EvalSpec:
    ctx: int = 512
    windows: int = 8

    def key(self, text: str) -> str:
        return sha256_text(f"{self.ctx}:{self.windows}:{sha256_text(text)}")[:16]


@dataclass
class QualityResult:
    tokens_scored: int
    ppl: float
    ppl_ref: float
    ppl_increase_pct: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Reference:
    spec: EvalSpec
    windows: np.ndarray  # (W, ctx) int32
    logprobs: np.ndarray  # (W, ctx/2 - 1, V) float16: rows predicting window[ctx/2 + 1 + i]
    ppl: float

    @property
    def start(self) -> int:
        return self.spec.ctx // 2


def make_windows(tokens: list[int], spec: EvalSpec, bos: int | None) -> np.ndarray:
    need = spec.ctx * spec.windows
    if len(tokens) < need:
        raise ModelError(
            f"the held-out text has {len(tokens)} tokens, fewer than {spec.windows} windows of "
            f"{spec.ctx}", "lower eval.windows or eval.ctx in the recipe")
    w = np.asarray(tokens[:need], dtype=np.int32).reshape(spec.windows, spec.ctx).copy()
    if bos is not None:
        w[:, 0] = bos  # like llama.cpp's perplexity: each window starts with BOS
    return w


def _nll(logprobs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return -np.take_along_axis(logprobs.astype(np.float32), targets[:, None], axis=1)[:, 0]


def reference(hf_dir: Path, spec: EvalSpec, cache_dir: Path, progress: Any = None,
              threads: int | None = None) -> Reference:
    """Reference log-probabilities of the fp32 HF model, cached in ``cache_dir``."""
    text = corpus("heldout")
    key = spec.key(text)
    lp_path, win_path = cache_dir / f"ref-{key}.logprobs.npy", cache_dir / f"ref-{key}.windows.npy"
    if lp_path.exists() and win_path.exists():
        windows = np.load(win_path)
        lps = np.load(lp_path, mmap_mode="r")
        return Reference(spec, windows, lps, _ppl_of(lps, windows, spec.ctx // 2))
    from edgesmith.bench.runners.torch import TorchSession

    sess = TorchSession(hf_dir, threads)
    tok = sess.tokenizer
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with_special = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id if tok.bos_token_id is not None and with_special[0] == tok.bos_token_id \
        else None
    windows = make_windows(ids, spec, bos)
    start = spec.ctx // 2
    out = np.zeros((spec.windows, spec.ctx - start - 1, sess.n_vocab), dtype=np.float16)
    task = progress.add_task("reference log-probs (torch fp32)", total=spec.windows) \
        if progress else None
    for i, w in enumerate(windows):
        out[i] = sess.logprobs(w.tolist(), start=start)[:, : sess.n_vocab]
        if progress is not None:
            progress.advance(task)
    sess.close()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(win_path) as tmp, open(tmp, "wb") as f:
        np.save(f, windows)
    with atomic_path(lp_path) as tmp, open(tmp, "wb") as f:
        np.save(f, out)
    return Reference(spec, windows, out, _ppl_of(out, windows, start))


def _ppl_of(lps: np.ndarray, windows: np.ndarray, start: int) -> float:
    nll = [_nll(np.asarray(lps[i]), windows[i, start + 1 :]) for i in range(len(windows))]
    return float(np.exp(np.concatenate(nll).mean()))


def kl_divergence(ref_lp: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """Per-position KL(P_ref || Q) from log-probabilities over the same vocabulary."""
    ref_lp = ref_lp.astype(np.float32)
    p = np.exp(ref_lp)
    return np.maximum((p * (ref_lp - lp)).sum(axis=-1), 0.0)


def evaluate(session: Any, ref: Reference, progress: Any = None, label: str = "artifact") \
        -> QualityResult:
    """Perplexity, KL divergence and top-1 agreement of ``session`` against ``ref``."""
    start = ref.start
    klds, nlls, agree = [], [], []
    task = progress.add_task(f"quality: {label}", total=len(ref.windows)) if progress else None
    for i, w in enumerate(ref.windows):
        lp = session.logprobs(w.tolist(), start=start)
        ref_lp = np.asarray(ref.logprobs[i], dtype=np.float32)
        v = min(lp.shape[1], ref_lp.shape[1])
        if lp.shape[1] != ref_lp.shape[1]:
            # padded vocabularies: compare over the shared ids, renormalized
            lp = lp[:, :v] - np.logaddexp.reduce(lp[:, :v], axis=1, keepdims=True)
            ref_lp = ref_lp[:, :v] - np.logaddexp.reduce(ref_lp[:, :v], axis=1, keepdims=True)
        klds.append(kl_divergence(ref_lp, lp))
        nlls.append(_nll(lp, w[start + 1 :]))
        agree.append(lp.argmax(axis=1) == ref_lp.argmax(axis=1))
        if progress is not None:
            progress.advance(task)
    kld = np.concatenate(klds)
    ppl = float(np.exp(np.concatenate(nlls).mean()))
    return QualityResult(
        tokens_scored=int(kld.size),
        ppl=ppl,
        ppl_ref=ref.ppl,
        ppl_increase_pct=100.0 * (ppl / ref.ppl - 1.0),
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1_agreement=float(np.concatenate(agree).mean()),
    )
