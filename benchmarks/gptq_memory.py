"""Peak memory of edgesmith's streamed GPTQ (compress/gptq.py ``GPTQPass.run_dir``) against depth:
the same Llama shape with 4 and with 22 decoder layers must peak within 15% of each other, since
only one decoder layer and the calibration activations are held at a time.

The input is a Llama of TinyLlama-1.1B's shape (hidden 2048, FFN 5632, 32 heads / 4 KV heads,
vocabulary 49152) with random bf16 weights and SmolLM2's tokenizer, built as
benchmarks/convert_memory.py builds it (memory depends on shapes, not values), cached under
<cache>/bench/gptq-memory/. Each GPTQ runs in a fresh process whose peak RSS and peak anonymous
memory (RSS less file-backed pages: the memory-mapped safetensors) are polled; the anchor is the
4-layer run, measured in the same invocation. Calibration is kept small (default 4 x 128
tokens): the activations are the same for both depths.

Usage: python benchmarks/gptq_memory.py [--layers 4 22] [--samples 4] [--seq-len 128] [--quick]
       [--threads 2] [--tokenizer DIR]
  --quick   1 and 3 layers of a narrower Llama (hidden 512): checks the pipeline in a minute
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def build(dest: Path, layers: int, hidden: int, ffn: int, tok: Path | None = None) -> None:
    """A random bf16 Llama (TinyLlama's shape at hidden 2048 / FFN 5632) with SmolLM2's
    tokenizer, written atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgesmith import models
    from edgesmith.fsutil import atomic_dir

    tok = tok or models.as_hf_dir(models.resolve("builtin:smollm2-135m"))
    heads = hidden // 64
    cfg = AutoConfig.for_model("llama", hidden_size=hidden, intermediate_size=ffn,
                               num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=max(1, heads // 8), vocab_size=49152,
                               max_position_embeddings=2048, tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    with atomic_dir(dest) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tok / f, tmp / f)


def model_dir(layers: int, hidden: int, ffn: int, tok: Path | None = None) -> Path:
    from edgesmith.fsutil import cache_root

    dest = cache_root() / "bench" / "gptq-memory" / f"llama-h{hidden}-f{ffn}-l{layers}-bf16"
    if not (dest / "config.json").exists():
        print(f"building {dest.name} (random bf16 weights)", flush=True)
        build(dest, layers, hidden, ffn, tok)
    return dest


def child(src: str, dest: str, samples: int, seq_len: int, threads: int) -> None:
    """The measured process: GPTQ w4 g128 of ``src`` into a checkpoint at ``dest``."""
    import torch

    from edgesmith.compress import gptq
    from edgesmith.compress.imatrix import CalibrationConfig
    from edgesmith.context import RunContext, make_progress

    torch.set_num_threads(threads)
    ctx = RunContext(out_dir=Path(dest).parent, cache_dir=Path(dest).parent,
                     progress=make_progress(quiet=True), threads=threads)
    ctx.extras["calibration"] = CalibrationConfig(samples=samples, seq_len=seq_len)
    p = gptq.GPTQPass(gptq.GPTQConfig(bits=4, group_size=128, sym=True, device="cpu"))
    p.run_dir(Path(src), Path(dest), ctx)
    print(json.dumps({"seconds": p.report["seconds"], "tensors": len(p.report["tensors"])}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 22], metavar=("SHALLOW", "DEEP"))
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tokenizer", type=Path, default=None,
                    help="folder with tokenizer.json (default: builtin:smollm2-135m's)")
    ap.add_argument("--child", nargs=2, metavar=("SRC", "DEST"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.samples, args.seq_len, args.threads)
        return

    from gguf_vs_llamacpp import measure  # peak RSS / anonymous memory of a child process

    hidden, ffn = (512, 1408) if args.quick else (2048, 5632)
    layers = [1, 3] if args.quick else args.layers
    work = Path(tempfile.mkdtemp(prefix="es-gptq-mem-"))
    rows = []
    try:
        for n in layers:
            src = model_dir(n, hidden, ffn, args.tokenizer)
            st = sum(f.stat().st_size for f in src.glob("*.safetensors"))
            t0 = time.perf_counter()
            _, rss, anon = measure([sys.executable, __file__, "--child", str(src),
                                    str(work / f"out-{n}"), "--samples", str(args.samples),
                                    "--seq-len", str(args.seq_len), "--threads",
                                    str(args.threads)],
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            rows.append((n, st, rss, anon, time.perf_counter() - t0))
            shutil.rmtree(work / f"out-{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nGPTQ w4 g128 (streamed run_dir, CPU, {args.threads} threads) of a random bf16 Llama, "
          f"hidden {hidden}, FFN {ffn}, vocabulary 49152; calibration {args.samples} x "
          f"{args.seq_len} tokens\n")
    print("| layers | safetensors GB | peak RSS MB | peak anonymous MB | RSS / safetensors | "
          "wall s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, st, rss, anon, wall in rows:
        print(f"| {n} | {st / 1e9:.2f} | {rss / 1e6:.0f} | {anon / 1e6:.0f} | {rss / st:.2f}x | "
              f"{wall:.0f} |")
    (n0, _, r0, a0, _), (n1, _, r1, a1, _) = rows
    d_rss, d_anon = r1 / r0 - 1, a1 / a0 - 1
    print(f"\nratio {n1} / {n0} layers: peak RSS {r1 / r0:.3f}x ({100 * d_rss:+.1f}%), peak "
          f"anonymous {a1 / a0:.3f}x ({100 * d_anon:+.1f}%); target: differ by < 15%: "
          f"{'met' if abs(d_rss) < 0.15 else 'MISSED'} (RSS), "
          f"{'met' if abs(d_anon) < 0.15 else 'MISSED'} (anonymous)")


if __name__ == "__main__":
    main()
