"""Structured pruning + distillation on SmolLM2-135M, against the unpruned Q4_K_M of the same run.

Runs ``edgesmith compress`` (the command a user runs) three times on the same model, all to
Q4_K_M with an importance matrix and all scored by llama.cpp on the bundled held-out text
against the same fp32 reference:

  1. unpruned (the anchor),
  2. structured prune only,
  3. structured prune + distillation from the original model,

then ``edgesmith bench`` decodes the anchor and the pruned+distilled GGUF with the same threads
and token counts. Prints parameters (ratio), file size, perplexity before pruning / after
pruning / after distillation, the share of the pruning's perplexity increase the distillation
won back, training tokens and time, and the decode speed ratio.

``--part unstructured`` instead measures Wanda and SparseGPT at 50% and 2:4 against
llm-compressor 0.14's (its own venv, benchmarks/_libvenv.py) on the same model and the same
calibration chunks: each pruned model in PyTorch fp32, mean KLD / perplexity / top-1 against the
unpruned model on the held-out text (edgesmith.bench.quality), the wall and CPU seconds of the
pruning itself (model loading and evaluation excluded on both sides), and the sparsity each left
in ``lm_head`` and the embeddings (both told to leave them alone).

Example: python benchmarks/prune_distill.py --distill-steps 300 --threads 2
         python benchmarks/prune_distill.py --part unstructured --calib-samples 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

STEPS = {
    "anchor": "",
    "pruned": "  - prune: {{method: structured, ffn_keep: {ffn_keep}, drop_layers: {drop}, "
              "multiple_of: {mult}}}\n",
    "distilled": "  - prune: {{method: structured, ffn_keep: {ffn_keep}, drop_layers: {drop}, "
                 "multiple_of: {mult}}}\n"
                 "  - distill: {{teacher: original, steps: {steps}, batch_size: {bs}, "
                 "seq_len: {seq}, lr: {lr}, temperature: {temp}, alpha: {alpha}}}\n",
}
RECIPE = """name: bench-{name}
target: raspberry-pi-4
calibration: {{source: builtin:calibration, samples: {samples}, seq_len: 256}}
eval: {{ctx: 512, windows: {windows}}}
steps:
{torch}  - export: {{format: gguf, outtype: f16}}
  - gguf_quantize: {{type: Q4_K_M, imatrix: true}}
gates: {{max_kld: 100}}
"""


def _cli(*args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgesmith.cli", *args, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def add_prune_distill_args(ap: argparse.ArgumentParser,
                           steps_flag: str = "--distill-steps") -> None:
    """The model, prune, distill, calibration and eval options (dest ``distill_steps`` for the
    steps), shared with distill_recovery.py so both measure the same settings."""
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--ffn-keep", type=float, default=0.75)
    ap.add_argument("--drop-layers", type=int, default=3)
    ap.add_argument("--multiple-of", type=int, default=128)
    ap.add_argument(steps_flag, dest="distill_steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--temperature", type=float, default=2.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--samples", type=int, default=32, help="calibration chunks of 256 tokens")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")


UNSTRUCTURED = [("sparsegpt", "50%"), ("sparsegpt", "2:4"), ("wanda", "50%"), ("wanda", "2:4")]


def unstructured(a: argparse.Namespace) -> None:
    """edgesmith's Wanda and SparseGPT against llm-compressor's, same model and calibration."""
    import _libvenv
    import numpy as np
    import torch
    from gptq_awq_vs_libraries import _Clock, _eval_dir, _InMemory, _q, _try

    from edgesmith import models
    from edgesmith.bench import quality
    from edgesmith.compress import awq
    from edgesmith.compress.imatrix import CalibrationConfig
    from edgesmith.compress.prune import PruneConfig, PrunePass
    from edgesmith.context import RunContext, make_progress

    torch.set_num_threads(a.threads)
    hf_dir = models.as_hf_dir(models.resolve(a.model), None)
    work = Path(tempfile.mkdtemp(prefix="es-sparse-libs-"))
    ref = quality.reference(hf_dir, quality.EvalSpec(512, a.windows), work / "ref",
                            threads=a.threads)
    unpruned, tok = models.load_hf(hf_dir)
    calib = CalibrationConfig(samples=a.calib_samples, seq_len=a.calib_len)
    ids = awq.calibration_ids(tok, calib).numpy()  # the chunks both sides get
    np.save(work / "calib.npy", ids)
    rows: dict[str, dict[str, Any]] = {}

    def kept(model: Any) -> dict[str, float]:
        return {n: float((m.weight == 0).float().mean()) for n, m in model.named_modules()
                if n in ("lm_head", "model.embed_tokens")}

    base = kept(unpruned)  # the zeros they hold before any pruning
    del unpruned

    def ours(method: str, setting: str) -> dict[str, Any]:
        model, _ = models.load_hf(hf_dir)
        ctx = RunContext(out_dir=work, cache_dir=work, progress=make_progress(quiet=True),
                         threads=a.threads)
        ctx.extras.update(calibration=calib, tokenizer=tok)
        cfg = PruneConfig(method=method, **({"pattern": setting} if ":" in setting else
                                            {"sparsity": float(setting[:-1]) / 100}))
        with _Clock() as c:
            PrunePass(cfg).run(model, ctx)
        rep = ctx.extras["pass_reports"][-1]
        return {**c.figures(), **_q(_InMemory(model), ref), "kept": kept(model),
                "sparsity": rep["sparsity_pruned_modules"]}

    def lib(method: str, setting: str) -> dict[str, Any]:
        out = work / f"llmc-{method}-{setting.replace(':', '-').rstrip('%')}"
        spec = ["--pattern", setting] if ":" in setting else \
            ["--sparsity", str(float(setting[:-1]) / 100)]
        res = _libvenv.work("llmcompressor", "llmc-sparse", [
            "--model", str(hf_dir), "--calib", str(work / "calib.npy"), "--out", str(out),
            "--method", method, *spec, "--damp", "0.01", "--batch", "8",
            "--threads", str(a.threads)])
        sp = res["sparsity"]
        layers = [v for k, v in sp.items() if k not in ("lm_head", "model.embed_tokens")]
        return {"seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"],
                "note": res["version"], **_eval_dir(out, ref),
                "kept": {k: v for k, v in sp.items() if k in ("lm_head", "model.embed_tokens")},
                "sparsity": sum(layers) / max(1, len(layers))}

    try:
        for method, setting in UNSTRUCTURED:
            _try(rows, f"edgesmith {method} {setting}", lambda m=method, st=setting: ours(m, st))
            _try(rows, f"llm-compressor {method} {setting}",
                 lambda m=method, st=setting: lib(m, st))
    finally:
        print(f"\nmodel {a.model}; {len(ids)} x {ids.shape[1]} calibration tokens (the same "
              f"chunks both sides), damp 0.01, block 128; {a.windows} x 512 held-out windows, "
              f"PyTorch fp32; {a.threads} threads; zeros in lm_head / embeddings before "
              f"pruning: {' / '.join(f'{100 * v:.1f}%' for v in base.values())}")
        print("| method | sparsity of the decoder Linears | lm_head / embeddings zeros | "
              "wall s | CPU s | mean KLD | ppl vs ref | top-1 |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for k, r in rows.items():
            if "error" in r:
                print(f"| {k} | could not run: {r['error']} | | | | | | |")
                continue
            z = " / ".join(f"{100 * v:.1f}%" for v in r["kept"].values()) or "-"
            print(f"| {k} | {100 * r['sparsity']:.1f}% | {z} | {r['seconds']:.1f} | "
                  f"{r['cpu_seconds']:.1f} | {r['kld']:.4f} | {r['ppl']:+.1f}% | "
                  f"{100 * r['top1']:.1f}% |")
        print("\nratios, edgesmith / llm-compressor (targets: KLD <= 1.05x, wall time <= 1.0x)")
        for method, setting in UNSTRUCTURED:
            e = rows.get(f"edgesmith {method} {setting}", {})
            lc = rows.get(f"llm-compressor {method} {setting}", {})
            if "kld" not in e or "kld" not in lc:
                print(f"- {method} {setting}: not measured")
                continue
            kr, tr = e["kld"] / lc["kld"], e["seconds"] / lc["seconds"]
            print(f"- {method} {setting}: KLD {kr:.3f}x ({'met' if kr <= 1.05 else 'MISSED'}), "
                  f"wall {tr:.2f}x ({'met' if tr <= 1.0 else 'MISSED'}), CPU "
                  f"{e['cpu_seconds'] / lc['cpu_seconds']:.2f}x")
        if a.json:
            a.json.write_text(json.dumps(rows, indent=2) + "\n")
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prune_distill_args(ap)
    ap.add_argument("--part", choices=["structured", "unstructured"], default="structured")
    ap.add_argument("--calib-samples", type=int, default=64,
                    help="unstructured: calibration chunks (both libraries)")
    ap.add_argument("--calib-len", type=int, default=256,
                    help="unstructured: tokens per calibration chunk")
    ap.add_argument("--json", type=Path, help="unstructured: also write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5, help="edgesmith bench repeats")
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache/edgesmith/bench/prune")
    ap.add_argument("--no-distill", action="store_true",
                    help="prune only: the size and decode-speed rows (the speed of a pruned "
                         "model does not depend on its training); benchmarks/distill_recovery.py "
                         "measures the recovery in PyTorch, on a GPU where there is one")
    a = ap.parse_args()
    if a.part == "unstructured":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        unstructured(a)
        return
    fill = {"ffn_keep": a.ffn_keep, "drop": a.drop_layers, "mult": a.multiple_of,
            "steps": a.distill_steps, "bs": a.batch_size, "seq": a.seq_len, "lr": a.lr,
            "temp": a.temperature, "alpha": a.alpha}
    man: dict[str, dict[str, Any]] = {}
    for name, torch_steps in STEPS.items():
        if a.no_distill and name == "distilled":
            continue
        d = a.out / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "recipe.yaml").write_text(RECIPE.format(
            name=name, samples=a.samples, windows=a.windows, torch=torch_steps.format(**fill)))
        print(f"compress: {name} ...", file=sys.stderr, flush=True)
        man[name] = _cli("compress", a.model, "--recipe", str(d / "recipe.yaml"), "-o",
                         str(d / "out"), "--threads", str(a.threads), "--force")
    # the two files are benched in turns, one repeat each, so a change in the machine's load
    # falls on both alike; the median of the repeats is compared
    fast = "pruned" if a.no_distill else "distilled"
    runs: dict[str, list[float]] = {"anchor": [], fast: []}
    for r in range(a.repeat):
        for name in runs:
            art = a.out / name / "out" / man[name]["artifacts"][0]["path"]
            res = _cli("bench", str(art), "--threads", str(a.threads), "--repeat", "1",
                       "-o", str(a.out / f"bench-{name}-{r}.json"), "--force")
            runs[name].append(res["metrics"]["decode_tps"]["median"])
    speed = {k: sorted(v)[len(v) // 2] for k, v in runs.items()}
    if a.no_distill:
        man["distilled"], speed["distilled"] = man["pruned"], speed["pruned"]
    prune = next(p for p in man["pruned"]["passes"] if p["pass"] == "prune")
    dist = next((p for p in man["distilled"]["passes"] if p["pass"] == "distill"), None)
    ppl = {k: man[k]["artifacts"][0]["quality"]["ppl"] for k in man}
    size = {k: man[k]["artifacts"][0]["size_bytes"] for k in man}
    recovered = (ppl["pruned"] - ppl["distilled"]) / max(1e-9, ppl["pruned"] - ppl["anchor"])
    print(f"model {a.model}; prune ffn_keep {a.ffn_keep} (multiple of {a.multiple_of}), "
          f"drop_layers {a.drop_layers} -> layers {prune.get('dropped_layers')}; "
          f"fp32 reference ppl {man['anchor']['reference']['ppl']:.2f}")
    print("| figure | pruned (+distilled) | anchor: unpruned Q4_K_M | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| parameters | {prune['params_after'] / 1e6:.1f} M | "
          f"{prune['params_before'] / 1e6:.1f} M | {prune['params_ratio']:.3f}x |")
    print(f"| Q4_K_M size | {size['distilled'] / 1e6:.1f} MB | {size['anchor'] / 1e6:.1f} MB | "
          f"{size['distilled'] / size['anchor']:.3f}x |")
    print(f"| held-out ppl (llama.cpp), pruned only | {ppl['pruned']:.2f} | {ppl['anchor']:.2f} "
          f"| {ppl['pruned'] / ppl['anchor']:.3f}x |")
    print(f"| held-out ppl, pruned + distilled | {ppl['distilled']:.2f} | {ppl['anchor']:.2f} | "
          f"{ppl['distilled'] / ppl['anchor']:.3f}x |")
    print(f"| share of the ppl increase recovered | {recovered:.1%} | (goal >= 50%) | |")
    print(f"| decode tokens/s, {a.threads} threads | {speed['distilled']:.1f} | "
          f"{speed['anchor']:.1f} | {speed['distilled'] / speed['anchor']:.3f}x |")
    if dist is None:
        print("distillation: not run (--no-distill); the 'pruned + distilled' rows are the "
              "pruned model's")
        return
    print(f"distillation: {dist['training_tokens']} training tokens, {dist['seconds']:.0f} s, "
          f"{dist['tokens_per_s']:.0f} tokens/s on {dist['device']} (bf16 {dist['bf16']}), "
          f"loss {dist['loss_curve'][0]['loss']:.3f} -> {dist['loss_curve'][-1]['loss']:.3f}")


if __name__ == "__main__":
    main()
