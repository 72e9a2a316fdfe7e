"""Does another tool load the hf-gptq checkpoint, and compute what we compute?

The other tool is onnxruntime-genai 0.18's model builder (``python -m
onnxruntime_genai.models.builder -i CKPT -p int4 -e cpu``), which reads a GPTQ checkpoint's
qweight/qzeros/scales/g_idx into MatMulNBits nodes, and its runtime. Its pins (onnx-ir, its own
transformers) stay out of our venv: it lives in its own venv under the benchmark cache
(``--setup`` builds it, torch 2.13.0 CPU first). The builder is asked to leave lm_head and the
embeddings unquantized and to keep fp32 activations (accuracy_level=1), so the only weights
that differ from fp32 are GPTQ's.

For each setting the table prints, on held-out windows: the KLD vs fp32 of our checkpoint
loaded back in torch (dequantized: the anchor, measured in the same run), the same for
onnxruntime-genai, their ratio, and the KLD between the two (0 up to float noise when the
builder reads our integers exactly).

Usage: python benchmarks/hf_gptq_interop.py [--setup] [--model builtin:smollm2-135m]
           [--settings w4g64sym-act,w4g32asym] [--samples 32 --seq-len 512] [--json]
Example: python benchmarks/hf_gptq_interop.py --setup --samples 8 --seq-len 256
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

VERSION = "0.18.0"
VENV = Path(os.environ.get("EDGESMITH_BENCH_CACHE", Path.home() / ".cache/edgesmith/bench")) \
    / "libs" / "ortgenai" / "venv"
MISSING = (f"onnxruntime-genai {VERSION} is not installed in its own venv: run "
           "`python benchmarks/hf_gptq_interop.py --setup` (or set EDGESMITH_ORTGENAI_PYTHON to "
           "a python that imports onnxruntime_genai and onnx_ir)")
Run = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(cmd: Sequence[str], env: dict[str, str] | None = None) \
        -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, env=env)


@functools.cache
def ortgenai_python() -> Path | None:
    """The python of the onnxruntime-genai venv, or None when there is none that works."""
    python = Path(os.environ.get("EDGESMITH_ORTGENAI_PYTHON", VENV / "bin" / "python"))
    if not python.exists():
        return None
    probe = _run([str(python), "-c", "import onnxruntime_genai, onnx_ir; "
                  "print(onnxruntime_genai.__version__)"])
    return python if probe.returncode == 0 else None


def setup(venv: Path = VENV) -> Path:
    """Build the venv: torch 2.13.0 (the local CPU wheel) first, so nothing pulls a CUDA one."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    subprocess.run([*pip, f"onnxruntime-genai=={VERSION}", "onnx_ir", "onnx", "onnxruntime",
                    "transformers", "safetensors", "numpy"], check=True)
    ortgenai_python.cache_clear()
    return python


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "2"}


def _check(p: subprocess.CompletedProcess[str], what: str) -> None:
    if p.returncode != 0:
        tail = (p.stdout + p.stderr)[-3000:]
        raise RuntimeError(f"{what} failed (exit {p.returncode}):\n{tail}")


def ortgenai_build(python: Path, ckpt: Path, out: Path, cache: Path, run: Run = _run) -> float:
    """The builder on a GPTQ checkpoint folder: int4 MatMulNBits from its own integers, lm_head
    and embeddings left fp32, fp32 activations. Returns its wall seconds."""
    t0 = time.perf_counter()
    p = run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt),
             "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache), "--extra_options",
             "shared_embeddings=false", "nodes_to_exclude=/lm_head/MatMul", "accuracy_level=1"],
            env=_env())
    _check(p, "onnxruntime-genai's model builder")
    return time.perf_counter() - t0


_LOGITS = """
import json, sys, numpy as np, onnxruntime_genai as og
model = og.Model(sys.argv[1])
out = {}
for i, ids in enumerate(json.load(open(sys.argv[2]))):
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out[str(i)] = np.asarray(gen.get_output("logits"), dtype=np.float32)[0]
np.savez(sys.argv[3], **out)
"""


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))).astype(np.float32)


def ortgenai_logprobs(python: Path, onnx_dir: Path, windows: Sequence[Sequence[int]],
                      work: Path, run: Run = _run) -> list[np.ndarray]:
    """Log-probabilities ``[len(ids), vocab]`` of each token window, from onnxruntime-genai."""
    ids_file, out = work / "ortgenai-ids.json", work / "ortgenai-logits.npz"
    ids_file.write_text(json.dumps([list(map(int, w)) for w in windows]))
    p = run([str(python), "-c", _LOGITS, str(onnx_dir), str(ids_file), str(out)], env=_env())
    _check(p, "onnxruntime-genai's runtime")
    with np.load(out) as z:
        return [_log_softmax(z[str(i)]) for i in range(len(windows))]


def kld(ref_lp: np.ndarray, lp: np.ndarray) -> np.ndarray:
    from edgesmith.bench.quality import kl_divergence

    return kl_divergence(ref_lp, lp)


def mean_kld(refs: Sequence[np.ndarray], others: Sequence[np.ndarray]) -> float:
    return float(np.concatenate([kld(a, b) for a, b in zip(refs, others, strict=True)]).mean())


def _setting(text: str) -> dict[str, Any]:
    m = re.fullmatch(r"w([2348])g(32|64|128)(sym|asym)(-act)?", text)
    if not m:
        raise SystemExit(f"bad setting {text!r}: use e.g. w4g64sym-act or w4g32asym")
    return {"bits": int(m[1]), "group_size": int(m[2]), "sym": m[3] == "sym",
            "act_order": bool(m[4])}


def torch_logprobs(hf_dir: Path, windows: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Log-probabilities ``[len(ids), vocab]`` of each window from transformers (fp32)."""
    import torch

    from edgesmith.models import load_hf

    model = load_hf(hf_dir)[0]
    with torch.inference_mode():
        return [torch.log_softmax(model(torch.tensor([list(w)])).logits[0].float(), -1).numpy()
                for w in windows]


def measure(model: str, settings: list[str], samples: int, seq_len: int, n_windows: int,
            ctx_len: int, work: Path) -> list[dict[str, Any]]:
    from edgesmith import models
    from edgesmith.bench.quality import corpus
    from edgesmith.compress import gptq_format
    from edgesmith.context import RunContext, make_progress
    from edgesmith.export.hf_gptq import HFGPTQExportConfig, HFGPTQExporter
    from edgesmith.models import load_hf

    python = ortgenai_python()
    if python is None:
        raise SystemExit(MISSING)
    hf_dir = models.as_hf_dir(models.resolve(model))
    tok = load_hf(hf_dir)[1]
    ids = tok(corpus("heldout"), add_special_tokens=False)["input_ids"]
    windows = [ids[i * ctx_len:(i + 1) * ctx_len] for i in range(n_windows)]
    fp32 = torch_logprobs(hf_dir, windows)
    rows = []
    for name in settings:
        cfg = HFGPTQExportConfig(**_setting(name), samples=samples, seq_len=seq_len)
        ctx = RunContext(out_dir=work, cache_dir=work, progress=make_progress(), threads=2)
        t0 = time.perf_counter()
        art = HFGPTQExporter(cfg).export(hf_dir, ctx, work / f"{name}.gptq")
        export_s = time.perf_counter() - t0
        plain = gptq_format.dequantize_checkpoint(art.path, work / f"{name}.plain")
        ours = torch_logprobs(plain, windows)
        row: dict[str, Any] = {"setting": name, "export_s": round(export_s, 1),
                               "size_bytes": art.meta["size_bytes"],
                               "kld_ours": mean_kld(fp32, ours)}
        if cfg.bits != 4:  # the builder reads int4 checkpoints only
            row["ortgenai"] = "skipped: the builder reads 4-bit GPTQ only"
            rows.append(row)
            continue
        onnx_dir = work / f"{name}.onnx"
        row["build_s"] = round(ortgenai_build(python, art.path, onnx_dir, work / "og-cache"), 1)
        theirs = ortgenai_logprobs(python, onnx_dir, windows, work)
        row["kld_ortgenai"] = mean_kld(fp32, theirs)
        row["kld_ours_vs_ortgenai"] = mean_kld(ours, theirs)
        row["top1_agree"] = float(np.mean(np.concatenate(
            [a.argmax(-1) == b.argmax(-1) for a, b in zip(ours, theirs, strict=True)])))
        row["ratio"] = row["kld_ortgenai"] / row["kld_ours"]
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setup", action="store_true", help=f"build the venv at {VENV} first")
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--settings", default="w4g64sym-act,w4g32asym",
                    help="comma list of w<bits>g<group><sym|asym>[-act] (SmolLM2's width 576 "
                         "takes groups 32 and 64, not 128)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=4, help="held-out windows scored")
    ap.add_argument("--ctx", type=int, default=256, help="tokens per window")
    ap.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    if args.setup and ortgenai_python() is None:
        setup()
    work = args.keep or Path(tempfile.mkdtemp(prefix="es-hfgptq-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = measure(args.model, args.settings.split(","), args.samples, args.seq_len,
                   args.windows, args.ctx, work)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.model}, calibration {args.samples} x {args.seq_len}, "
          f"{args.windows} x {args.ctx} held-out tokens; anchor: our checkpoint in torch")
    print(f"{'setting':<14} {'KLD ours':>10} {'KLD ortgenai':>13} {'ratio':>7} "
          f"{'KLD ours<->og':>14} {'top1 same':>10} {'export s':>9} {'build s':>8}")
    for r in rows:
        if "kld_ortgenai" not in r:
            print(f"{r['setting']:<14} {r['kld_ours']:>10.5f}  {r['ortgenai']}")
            continue
        print(f"{r['setting']:<14} {r['kld_ours']:>10.5f} {r['kld_ortgenai']:>13.5f} "
              f"{r['ratio']:>7.4f} {r['kld_ours_vs_ortgenai']:>14.2e} "
              f"{100 * r['top1_agree']:>9.1f}% {r['export_s']:>9.1f} {r['build_s']:>8.1f}")


if __name__ == "__main__":
    main()
