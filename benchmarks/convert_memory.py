"""Peak memory of `edgesmith export --format gguf` (llama.cpp's converter) against the F16 size,
on a model large enough that the converter's fixed cost (Python, torch, the tokenizer: about
435 MB) no longer dominates, as it does on SmolLM2-135M.

No model of that size ships in a Python package, so the input is a Llama of TinyLlama-1.1B's
shape (hidden 2048, 22 layers, FFN 5632, 32 heads / 4 KV heads) with random weights in bf16 and
SmolLM2's tokenizer: the converter's memory depends on shapes and dtypes, not on the values.
The anchor in the same run is the same converter's --vocab-only run (its fixed cost).

Usage: python benchmarks/convert_memory.py [--layers 22] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def build(dest: Path, layers: int) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgesmith import models

    tok = models.as_hf_dir(models.resolve("builtin:smollm2-135m"))
    cfg = AutoConfig.for_model("llama", hidden_size=2048, intermediate_size=5632,
                               num_hidden_layers=layers, num_attention_heads=32,
                               num_key_value_heads=4, vocab_size=49152,
                               max_position_embeddings=2048, tie_word_embeddings=False,
                               bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(dest, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, dest / f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--keep", type=Path, default=None, help="build the model here and keep it")
    args = ap.parse_args()

    from gguf_vs_llamacpp import measure  # this folder is on sys.path when run as a script

    from edgesmith.export import llamacpp_src

    work = Path(tempfile.mkdtemp(prefix="es-mem-"))
    model = args.keep or work / "model"
    if not (model / "config.json").exists():
        build(model, args.layers)
    st_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", "export", str(model), "--format",
                        "gguf", "--outtype", "f16", "-o", str(work / "out"), "--json"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    res = json.loads(p.stdout)
    f16 = res["size_bytes"]
    _, vocab_rss, vocab_anon = measure([sys.executable, str(llamacpp_src.convert_script()),
                                        str(model), "--outfile", str(work / "v.gguf"),
                                        "--vocab-only"])
    rss, anon = res["converter_peak_rss_bytes"], res["converter_peak_anon_bytes"]
    print(f"model: Llama {args.layers} layers, hidden 2048, bf16 safetensors "
          f"{st_bytes / 1e9:.2f} GB; F16 GGUF {f16 / 1e9:.2f} GB")
    print("| conversion | peak RSS MB | peak anonymous MB | RSS / F16 | anonymous / F16 |")
    print("|---|---:|---:|---:|---:|")
    print(f"| edgesmith export (llama.cpp converter) | {rss / 1e6:.0f} | {anon / 1e6:.0f} | "
          f"{rss / f16:.2f}x | {anon / f16:.2f}x |")
    print(f"| its fixed cost (--vocab-only) | {vocab_rss / 1e6:.0f} | {vocab_anon / 1e6:.0f} | "
          f"{vocab_rss / f16:.2f}x | {vocab_anon / f16:.2f}x |")
    print(f"target: peak memory <= 1.5x F16: {'met' if rss <= 1.5 * f16 else 'MISSED'} (RSS), "
          f"{'met' if anon <= 1.5 * f16 else 'MISSED'} (anonymous)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
