"""The browser artifact (ONNX q4) against its anchors, measured in the same run.

Rows, all on the same model, held-out windows and evaluator as ``compress`` (quality in each
artifact's own runtime against the fp32 torch reference):

- anchor: the raspberry-pi-5 recipe's GGUF Q4_K_M (llama.cpp) -- the issue's quality bar is
  KLD <= 1.2x its KLD at <= 1.25x its file size;
- edgesmith ``--target webgpu-browser`` (int4 MatMulNBits body with v/o/down projections at 8
  bits, int8 embedding + tied head);
- the embedding/head choices (fp32, fp16, int8 tied, int4 head) with the same int4 body;
- the int4 body from GPTQ's own codes (w4 g32 asym act-order, the checkpoint written exactly);
- anchor: onnxruntime-genai 0.18's model builder ``-p int4 -e cpu`` (its defaults, as a user
  runs it), in its own venv (benchmarks/hf_gptq_interop.py --setup builds it); evaluated with
  edgesmith's onnxruntime runner, so the same code scores both.

Usage: python benchmarks/onnx_vs_anchors.py [--model builtin:smollm2-135m] [--quick] [--json]
Example: python benchmarks/onnx_vs_anchors.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RECIPE = """name: bench-{name}
target: webgpu-browser
calibration: {{source: builtin:calibration, samples: {samples}, seq_len: 512}}
eval: {{ctx: 512, windows: {windows}}}
steps:
{torch}  - export: {{format: onnx, dtype: fp32}}
  - onnx_quantize: {{dtype: q4, block_size: 32, embedding: {emb}, head: {head}}}
gates: {{max_kld: 100}}
"""


def _edgesmith(*args: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", *args, "--json", "--force"],
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"edgesmith {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    man = json.loads(p.stdout)
    man["_wall_s"] = time.perf_counter() - t0
    return man


def _row(label: str, man: dict[str, Any]) -> dict[str, Any]:
    a = man["artifacts"][0]
    return {"row": label, "kld": a["quality"]["kld_mean"], "top1": a["quality"]["top1_agreement"],
            "ppl_pct": a["quality"]["ppl_increase_pct"], "size_mb": a["size_bytes"] / 1e6,
            "model_mb": sum(f["size_bytes"] for f in man["files"]
                            if f["path"].startswith("onnx/") or f["path"].endswith(".gguf"))
            / 1e6, "wall_s": man["_wall_s"], "timings": man["timings_s"]}


def _builder_row(model: str, work: Path, windows: int) -> dict[str, Any]:
    import hf_gptq_interop as interop

    from edgesmith import models
    from edgesmith.bench import quality
    from edgesmith.bench.runners.onnxruntime import OnnxSession
    from edgesmith.fsutil import cache_root

    python = interop.ortgenai_python()
    if python is None:
        return {"row": "onnxruntime-genai builder -p int4", "skipped": interop.MISSING}
    ref = models.resolve(model)
    hf_dir = models.as_hf_dir(ref)
    out = work / "builder"
    t0 = time.perf_counter()
    p = subprocess.run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                        "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(work / "bcache")],
                       capture_output=True, text=True, env=interop._env())
    build_s = time.perf_counter() - t0
    if p.returncode != 0:
        return {"row": "onnxruntime-genai builder -p int4",
                "skipped": f"builder failed: {(p.stdout + p.stderr)[-500:]}"}
    shutil.copy(hf_dir / "config.json", out / "config.json")
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    cache = cache_root() / "runs" / ref.fingerprint()
    refq = quality.reference(hf_dir, quality.EvalSpec(512, windows), cache)
    sess = OnnxSession(out / "model.onnx", threads=2)
    q = quality.evaluate(sess, refq)
    return {"row": "onnxruntime-genai builder -p int4 (its defaults)", "kld": q.kld_mean,
            "top1": q.top1_agreement, "ppl_pct": q.ppl_increase_pct, "size_mb": size / 1e6,
            "model_mb": size / 1e6, "wall_s": build_s, "timings": {"build": build_s}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="Example: python benchmarks/onnx_vs_anchors.py --quick")
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="4 eval windows, fewer variants")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    windows = 4 if args.quick else 8
    work = Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    rows: list[dict[str, Any]] = []
    try:
        pi = work / "pi5"
        pi_recipe = work / "pi5.yaml"
        from edgesmith import recipe as recipe_mod

        text = recipe_mod.load("raspberry-pi-5-q4km").text
        pi_recipe.write_text(text.replace("windows: 8", f"windows: {windows}"))
        rows.append(_row("anchor: raspberry-pi-5 GGUF Q4_K_M (llama.cpp)",
                         _edgesmith("compress", args.model, "--recipe", str(pi_recipe), "-o",
                                    str(pi))))
        web = work / "web.yaml"
        web.write_text(recipe_mod.load("webgpu-browser-q4").text.replace(
            "windows: 8", f"windows: {windows}"))
        rows.append(_row("edgesmith --target webgpu-browser (v/o/down int8, the recipe)",
                         _edgesmith("compress", args.model, "--recipe", str(web), "-o",
                                    str(work / "web"))))
        variants = [("int8", "tied", ""), ("fp16", "tied", ""), ("fp32", "fp32", ""),
                    ("int8", "int4", ""),
                    ("int8", "tied", "  - gptq: {bits: 4, group_size: 32, sym: false, "
                     "act_order: true, damp: 0.01}\n")]
        if args.quick:
            variants = [variants[0], variants[1]]
        for emb, head, torch_steps in variants:
            name = f"{emb}-{head}" + ("-gptq" if torch_steps else "")
            rfile = work / f"{name}.yaml"
            rfile.write_text(RECIPE.format(name=name, samples=32, windows=windows,
                                           torch=torch_steps, emb=emb, head=head))
            label = (f"edgesmith q4 {'GPTQ codes' if torch_steps else 'RTN'} body, embedding "
                     f"{emb}, head {head}")
            rows.append(_row(label, _edgesmith("compress", args.model, "--recipe", str(rfile),
                                               "-o", str(work / name))))
        rows.append(_builder_row(args.model, work, windows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    anchor = rows[0]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"model {args.model}, {windows} held-out windows of 512 tokens; ratios vs the "
          f"raspberry-pi-5 Q4_K_M (KLD {anchor['kld']:.4f}, {anchor['size_mb']:.1f} MB)")
    print(f"{'row':62} {'KLD':>8} {'xQ4KM':>6} {'top-1':>6} {'ppl':>7} {'MB':>7} {'xQ4KM':>6} "
          f"{'wall s':>7}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['row']:62} skipped: {r['skipped']}")
            continue
        print(f"{r['row']:62} {r['kld']:8.4f} {r['kld'] / anchor['kld']:6.2f} "
              f"{100 * r['top1']:5.1f}% {r['ppl_pct']:+6.2f}% {r['model_mb']:7.1f} "
              f"{r['model_mb'] / anchor['model_mb']:6.2f} {r['wall_s']:7.1f}")
    print("target: KLD <= 1.2x and size <= 1.25x the Q4_K_M for the webgpu-browser default "
          "(second row)")


if __name__ == "__main__":
    main()
