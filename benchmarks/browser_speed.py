"""Browser speed and agreement: an ONNX folder in chromium (onnxruntime-web) vs Python
onnxruntime (CPU EP, the anchor) on the same machine and threads.

Prints, per backend: KLD of the browser's logits vs Python onnxruntime's on the same prompt,
whether the greedy tokens are identical, and decode/prefill tokens/s with the ratio to the
anchor measured in the same run. SwiftShader WebGPU numbers are for correctness, not speed.

Example: python benchmarks/browser_speed.py out/web/ --threads 2 --backends wasm
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np

from edgesmith.bench.runners.base import log_softmax


def kld(ref: np.ndarray, got: np.ndarray) -> float:
    p, q = log_softmax(ref).astype(np.float64), log_softmax(got).astype(np.float64)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n")[-1])
    ap.add_argument("folder", type=Path, help="ONNX model folder (edgesmith export)")
    ap.add_argument("--dtype", default=None, help="q4, q4f16, fp32 (default: q4 first)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="wasm", help="comma list of wasm, webgpu")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = ap.parse_args()

    from edgesmith.bench.runners.browser import BrowserRunner
    from edgesmith.bench.runners.onnxruntime import OnnxSession
    from edgesmith.bench.speed import prompt_ids

    anchor = OnnxSession(a.folder, threads=a.threads, dtype=a.dtype)
    prompt = prompt_ids(anchor, a.prompt_tokens)
    ref_logits, _ = anchor.step(prompt, anchor.empty_cache(), 0)
    anchor.generate(prompt, a.gen_tokens)  # warm-up
    ref_runs = [anchor.generate(prompt, a.gen_tokens) for _ in range(a.repeat)]
    ref_tokens = ref_runs[0].generated_tokens
    figures: dict[str, dict[str, float | bool | str]] = {"python-onnxruntime": {
        "decode_tps": statistics.median(r.decode_tps for r in ref_runs),
        "prefill_tps": statistics.median(r.prefill_tps for r in ref_runs)}}
    anchor.close()
    for backend in a.backends.split(","):
        s = BrowserRunner(backend, a.dtype).open(a.folder, threads=a.threads)
        try:
            got = s.logits(prompt)
            s.generate(prompt, a.gen_tokens)  # warm-up (WebGPU compiles its shaders here)
            runs = [s.generate(prompt, a.gen_tokens) for _ in range(a.repeat)]
        finally:
            s.close()
        dec = statistics.median(r.decode_tps for r in runs)
        figures[f"chromium-{backend}"] = {
            "kld_vs_python_ort": kld(ref_logits, got),
            "greedy_identical": runs[0].generated_tokens == ref_tokens,
            "decode_tps": dec, "prefill_tps": statistics.median(r.prefill_tps for r in runs),
            "decode_ratio_vs_python_ort": dec / figures["python-onnxruntime"]["decode_tps"],
            "load_s": s.load_s}
    if a.json:
        print(json.dumps(figures, indent=2))
        return
    print(f"{a.folder} · {a.prompt_tokens}-token prompt, {a.gen_tokens} tokens, "
          f"{a.threads} threads, median of {a.repeat}")
    for name, f in figures.items():
        parts = [f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in f.items()]
        print(f"  {name:20s} " + " · ".join(parts))


if __name__ == "__main__":
    main()
