"""`edgesmith doctor` on a 1B-parameter model directory: it must answer in under 5 s.

The doctor reads headers, not weights, so the input is a Llama of TinyLlama-1.1B's shape
(hidden 2048, 22 layers, FFN 5632, 32 heads / 4 KV heads, 1.1 B parameters, bf16) whose
safetensors files have real headers and sparse (unwritten) data: the files are 2.2 GB long as
far as any reader can tell, and building them takes no time. SmolLM2's tokenizer files sit
beside them. Each run is a fresh `edgesmith doctor` process, as a user runs it (Python start and
imports included); the median of --runs is reported against the 5 s target.

Usage: python benchmarks/doctor_speed.py [--runs 5] [--target raspberry-pi-5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden=2048, ffn=5632, layers=22, heads=32, kv_heads=4, vocab=32000)


def _tensors() -> dict[str, list[int]]:
    h, f, kv = SHAPE["hidden"], SHAPE["ffn"], SHAPE["hidden"] // SHAPE["heads"] * SHAPE["kv_heads"]
    out = {"model.embed_tokens.weight": [SHAPE["vocab"], h], "model.norm.weight": [h],
           "lm_head.weight": [SHAPE["vocab"], h]}
    for i in range(SHAPE["layers"]):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                    p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                    p + "mlp.gate_proj.weight": [f, h], p + "mlp.up_proj.weight": [f, h],
                    p + "mlp.down_proj.weight": [h, f], p + "input_layernorm.weight": [h],
                    p + "post_attention_layernorm.weight": [h]})
    return out


def build(dest: Path, tokenizer_dir: Path) -> int:
    """Write config.json, 2 sparse bf16 safetensors shards and the tokenizer; returns params."""
    dest.mkdir(parents=True, exist_ok=True)
    tensors = list(_tensors().items())
    shards = [tensors[: len(tensors) // 2], tensors[len(tensors) // 2:]]
    n_params = 0
    index = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        off = 0
        for tname, shape in shard:
            n = 1
            for d in shape:
                n *= d
            n_params += n
            header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + 2 * n]}
            off += 2 * n
            index[tname] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(dest / name, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + off)  # sparse: the data reads as zeros, takes no disk
    (dest / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 2 * n_params}, "weight_map": index}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
           "hidden_size": SHAPE["hidden"], "intermediate_size": SHAPE["ffn"],
           "num_hidden_layers": SHAPE["layers"], "num_attention_heads": SHAPE["heads"],
           "num_key_value_heads": SHAPE["kv_heads"], "vocab_size": SHAPE["vocab"],
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 1,
           "eos_token_id": 2, "hidden_act": "silu"}
    (dest / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, dest / f)
    return n_params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--target", default="raspberry-pi-5")
    args = ap.parse_args()

    from edgesmith import models

    tok = models.as_hf_dir(models.resolve("builtin:smollm2-135m"))
    work = Path(tempfile.mkdtemp(prefix="es-doctor-"))
    try:
        model = work / "tinyllama-shape"
        n_params = build(model, tok)
        cmd = [sys.executable, "-m", "edgesmith.cli", "doctor", str(model), "--target",
               args.target, "--json"]
        subprocess.run(cmd, capture_output=True, check=False)  # warm the converter registry
        times, rep = [], {}
        for _ in range(args.runs):
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            if p.returncode not in (0, 2) or not p.stdout.strip():
                raise SystemExit(f"doctor failed (rc {p.returncode}): {p.stderr[-2000:]}")
            rep = json.loads(p.stdout)
        med = statistics.median(times)
        print(f"model: Llama of TinyLlama-1.1B's shape, {n_params / 1e9:.2f} B parameters, "
              f"bf16 (sparse safetensors), SmolLM2 tokenizer; target {args.target}")
        print(f"checks: {len(rep['checks'])}, failing: "
              f"{sum(c['status'] == 'fail' for c in rep['checks'])}, in-process "
              f"{rep['seconds']:.2f} s")
        print(f"wall time per `edgesmith doctor` process: median {med:.2f} s "
              f"(min {min(times):.2f}, max {max(times):.2f}, {args.runs} runs)")
        print(f"target < 5 s: {'met' if med < 5 else 'MISSED'}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
