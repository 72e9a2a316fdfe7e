"""The phone artifacts against their anchors, measured in the same run (issue 14).

LiteRT (Android), all on the same model, held-out windows and evaluator as ``compress``
(quality against the fp32 torch reference, each artifact in its own runtime):

- edgesmith ``--target android-midrange`` (litert_torch export_hf fp32, cached, then the
  recipe's ``dynamic_wi8c_hr_afp32`` derived from it), in LiteRT's interpreter; ``--recipes``
  adds the other recipes derived from the same export (export_hf's default dynamic int8
  without the Hadamard rotation, weight-only int8, int4 blocks of 32), each with its decode
  tokens/s;
- anchor: ``litert_torch.generative.export_hf`` run directly with its default recipe
  (dynamic_wi8_afp32) and the same prefill/cache lengths, evaluated with the same runner:
  edgesmith's int8 must be no worse; its export time and peak memory (a child process each,
  ``os.wait4``'s rusage) against edgesmith's export + quantization: <= 1.1x;
- anchor: GGUF Q8_0 as llama.cpp makes it (F16 -> Q8_0), in llama.cpp: LiteRT int8's KLD
  within 1.5x of it; and decode tokens/s of both on this CPU with the same threads (a ratio).

Core ML (iOS): ``--part coreml`` (or ``all``) runs benchmarks/_mobile_coreml.py's rows, written
by the Core ML side, when that file exists.

Usage: python benchmarks/mobile_vs_anchors.py [--part litert|coreml|all] [--model M]
       [--windows 8] [--threads 2] [--recipes] [--manifest out/android/manifest.json] [--json]
Example: python benchmarks/mobile_vs_anchors.py --part litert --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OTHER_RECIPES = ("dynamic_wi8_afp32", "weight_only_wi8_afp32", "dynamic_wi4b32_afp32")
OURS = "edgesmith android-midrange (the target's recipe)"


def _compress(model: str, out: Path) -> dict[str, Any]:
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", "compress", model, "--target",
                        "android-midrange", "-o", str(out), "--json", "--force"],
                       capture_output=True, text=True)
    if p.returncode not in (0, 2) or not p.stdout.strip():
        raise RuntimeError(f"edgesmith compress failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout)


def _child_peak(code: str) -> tuple[float, int]:
    """Seconds and peak RSS (bytes) of ``python -c code`` in a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child failed: {code[:200]}")
    return time.perf_counter() - t0, int(usage.ru_maxrss) * 1024


def _quality(path: Path, fmt: str, ref: Any, threads: int) -> dict[str, float]:
    from edgesmith.bench import quality
    from edgesmith.bench.runners import for_format

    sess = for_format(fmt).open(path, threads=threads, n_ctx=ref.spec.ctx, logits_all=True)
    try:
        q = quality.evaluate(sess, ref)
    finally:
        sess.close()
    return {"kld": q.kld_mean, "top1": q.top1_agreement, "ppl_pct": q.ppl_increase_pct}


def _decode_tps(path: Path, fmt: str, threads: int, repeat: int = 3) -> float:
    from edgesmith.bench import speed
    from edgesmith.bench.runners import for_format

    sess = for_format(fmt).open(path, threads=threads, n_ctx=256)
    try:
        prompt = speed.prompt_ids(sess, 128)
        sess.generate(prompt, 8)  # warm-up
        return statistics.median(sess.generate(prompt, 64).decode_tps for _ in range(repeat))
    finally:
        sess.close()


def litert_rows(args: argparse.Namespace) -> dict[str, Any]:
    from edgesmith import models, pipeline
    from edgesmith.bench import quality
    from edgesmith.compress.litert_quantize import quantize_tflite
    from edgesmith.context import make_progress
    from edgesmith.export.litert import LiteRTExporter, run_export_hf
    from edgesmith.fsutil import cache_root
    from edgesmith.recipe import for_target

    recipe = for_target("android-midrange")
    cfg = pipeline.exporter_of(recipe).config
    ref_model = models.resolve(args.model)
    hf_dir = models.as_hf_dir(ref_model)
    cache = cache_root() / "runs" / ref_model.fingerprint()
    ref = quality.reference(hf_dir, quality.EvalSpec(512, args.windows), cache, None,
                            args.threads)
    work = Path(tempfile.mkdtemp(prefix="mobile-bench-"))
    out: dict[str, Any] = {"model": args.model, "threads": args.threads, "rows": []}

    # anchor: export_hf directly, its default recipe, same prefill/cache lengths
    direct = Path(args.direct) if args.direct else work / "direct"
    if not (direct / "figures.json").exists():  # --direct: a finished direct run, reused
        figures = run_export_hf(hf_dir, direct, cfg.prefill_length, cfg.cache_length,
                                "dynamic_wi8_afp32", args.threads)
        (direct / "figures.json").write_text(json.dumps(figures))
    figures = json.loads((direct / "figures.json").read_text())
    dq = direct / "model_quantized.tflite"
    direct_row = {"row": "export_hf direct (default dynamic_wi8_afp32)",
                  **_quality(dq, "litert", ref, args.threads),
                  "tflite_mb": dq.stat().st_size / 1e6, "export_s": figures["export_s"],
                  "peak_mb": figures["peak_rss_bytes"] / 1e6
                  if figures.get("peak_rss_bytes") else None}
    # anchor: GGUF Q8_0 in llama.cpp
    q8 = pipeline.plain_gguf(args.model, "Q8_0", make_progress(quiet=True))
    q8_row = {"row": "GGUF Q8_0 (llama.cpp)", **_quality(q8, "gguf", ref, args.threads),
              "tflite_mb": q8.stat().st_size / 1e6}

    # edgesmith: the compress run (its fp32 export cached, measured in its child when made),
    # or one already made (--manifest: e.g. the e2e's, waited for)
    if args.manifest:
        deadline = time.time() + 3600
        while not Path(args.manifest).exists() and time.time() < deadline:
            time.sleep(20)
        man = json.loads(Path(args.manifest).read_text())
        folder = Path(args.manifest).parent
    else:
        man = _compress(args.model, work / "android")
        folder = work / "android"
    art = man["artifacts"][0]
    fp32_dir = LiteRTExporter(cfg).cache_path(cache, hf_dir, "fp32")
    fp32_meta = json.loads(fp32_dir.with_name(fp32_dir.name + ".json").read_text())
    q_s, q_peak = _child_peak(
        "from pathlib import Path; from edgesmith.compress.litert_quantize import "
        f"quantize_tflite; quantize_tflite(Path({str(fp32_dir / 'model.tflite')!r}), "
        f"Path({str(work / 'q.tflite')!r}), {art['type']!r})")
    ours = {"row": OURS, "recipe": art["type"],
            "kld": art["quality"]["kld_mean"], "top1": art["quality"]["top1_agreement"],
            "ppl_pct": art["quality"]["ppl_increase_pct"],
            "tflite_mb": (folder / "model.tflite").stat().st_size / 1e6,
            "export_s": fp32_meta["export_s"] + q_s,
            "peak_mb": max(fp32_meta["peak_rss_bytes"], q_peak) / 1e6,
            "chat": [c["passed"] for c in art.get("checks", [])]}
    out["rows"].append({"row": "edgesmith fp32 baseline", **{
        k: man["baseline"]["quality"][v] for k, v in
        (("kld", "kld_mean"), ("top1", "top1_agreement"), ("ppl_pct", "ppl_increase_pct"))}})
    out["rows"].append(ours)
    if args.recipes:
        for r in OTHER_RECIPES:
            dest = work / f"{r}.tflite"
            quantize_tflite(fp32_dir / "model.tflite", dest, r)
            (work / "tokenizer.json").write_bytes((fp32_dir / "tokenizer.json").read_bytes())
            out["rows"].append({"row": f"edgesmith {r}", **_quality(dest, "litert", ref,
                                                                     args.threads),
                                "tflite_mb": dest.stat().st_size / 1e6,
                                "decode_tps": _decode_tps(dest, "litert", args.threads)})
    out["rows"] += [direct_row, q8_row]
    out["decode_tps"] = {"litert_int8": _decode_tps(folder, "litert", args.threads),
                         "llama_cpp_q8_0": _decode_tps(q8, "gguf", args.threads)}
    return out


def report_litert(res: dict[str, Any]) -> None:
    rows = {r["row"]: r for r in res["rows"]}
    print(f"\nLiteRT on {res['model']} ({res['threads']} threads, host CPU)")
    print(f"{'row':48} {'KLD':>8} {'top-1':>7} {'ppl +%':>7} {'MB':>7} {'export s':>9} "
          f"{'peak MB':>8} {'tok/s':>6}")
    for r in res["rows"]:
        def f(k: str, fmt: str, r: dict[str, Any] = r) -> str:
            return format(r[k], fmt) if r.get(k) is not None else "-"
        print(f"{r['row']:48} {f('kld', '8.4f')} {f('top1', '7.3f')} {f('ppl_pct', '7.2f')} "
              f"{f('tflite_mb', '7.1f')} {f('export_s', '9.1f')} {f('peak_mb', '8.0f')} "
              f"{f('decode_tps', '6.1f')}")
    ours = rows[OURS]
    print(f"the target's recipe: {ours['recipe']}")
    direct = rows["export_hf direct (default dynamic_wi8_afp32)"]
    q8 = rows["GGUF Q8_0 (llama.cpp)"]
    print(f"KLD vs GGUF Q8_0: {ours['kld'] / q8['kld']:.2f}x (target <= 1.5x)")
    print(f"KLD vs export_hf direct: {ours['kld'] / direct['kld']:.2f}x (target <= 1.0x)")
    peak = f"{ours['peak_mb'] / direct['peak_mb']:.2f}x" if direct.get("peak_mb") else \
        "not measured for the reused direct run"
    print(f"export time vs direct: {ours['export_s'] / direct['export_s']:.2f}x, peak memory "
          f"{peak} (targets <= 1.1x)")
    d = res["decode_tps"]
    print(f"decode tok/s: LiteRT int8 ({ours['recipe']}) {d['litert_int8']:.1f}, llama.cpp Q8_0 "
          f"{d['llama_cpp_q8_0']:.1f}: ratio {d['litert_int8'] / d['llama_cpp_q8_0']:.2f}")
    print(f"LiteRT-LM chat check passed: {ours['chat']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("litert", "coreml", "all"), default="litert")
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipes", action="store_true",
                    help="also the other LiteRT recipes derived from the same export")
    ap.add_argument("--quick", action="store_true", help="(coreml part) fewer windows")
    ap.add_argument("--direct", help="LiteRT: a folder of a finished direct export_hf run "
                    "(with figures.json) to reuse instead of exporting again")
    ap.add_argument("--manifest", help="LiteRT: a compress --target android-midrange run's "
                    "manifest.json to use (waited for) instead of running compress")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    if args.part in ("litert", "all"):
        results["litert"] = litert_rows(args)
        report_litert(results["litert"])
    if args.part in ("coreml", "all"):
        # ---- Core ML: the iPhone side's rows (benchmarks/_mobile_coreml.py, its own file) ----
        if (Path(__file__).resolve().parent / "_mobile_coreml.py").exists():
            import _mobile_coreml

            found = _mobile_coreml.rows(args)
            _mobile_coreml.report(found, args.model, args.windows)
            results["coreml"] = found
        else:
            print("Core ML rows: benchmarks/_mobile_coreml.py is not there")
    if args.json:
        print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
