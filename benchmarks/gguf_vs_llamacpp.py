"""edgesmith compress vs llama.cpp's own convert + llama-quantize, on the same model.

Anchors, measured in the same run, from the same llama.cpp (the llama-cpp-python sdist):
  A. convert_hf_to_gguf.py -> llama-quantize Q4_K_M               (plain, what most users run)
  B. convert_hf_to_gguf.py -> llama-imatrix -> llama-quantize --imatrix Q4_K_M
against edgesmith compress with the same type, without (plain) and with the importance matrix
(the raspberry-pi-5 recipe). Time is wall time of convert + quantize (+ imatrix), without the
quality check; memory is the peak RSS of the conversion process. Quality of every artifact is
measured by one evaluator in llama-cpp-python against the fp32 reference on the held-out text.

Usage: python benchmarks/gguf_vs_llamacpp.py [--model builtin:smollm2-135m] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous memory (RSS less file-backed pages) of cmd."""
    import psutil

    # the log goes to a file, not a pipe: a chatty tool would block on a full pipe
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, env=env)
        peak_rss = peak_anon = 0
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                mi = p.memory_info()
                peak_rss, peak_anon = max(peak_rss, mi.rss), max(peak_anon, mi.rss - mi.shared)
            except psutil.Error:
                break
            time.sleep(0.02)
        proc.wait()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            raise SystemExit(f"failed: {' '.join(cmd)}\n{log.read().decode()[-2000:]}")
    return wall, float(peak_rss), float(peak_anon)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--chunks", type=int, default=32, help="imatrix chunks of 512 tokens")
    args = ap.parse_args()

    from edgesmith import models
    from edgesmith.bench import quality
    from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
    from edgesmith.context import make_progress
    from edgesmith.export import llamacpp_src
    from edgesmith.fsutil import cache_root

    hf_dir = models.as_hf_dir(models.resolve(args.model))  # the same input for both tools
    src = llamacpp_src.source_dir()
    bindir = llamacpp_src.build_tools(("llama-quantize", "llama-imatrix"))
    work = Path(tempfile.mkdtemp(prefix="es-bench-"))
    t = str(args.threads)
    rows: dict[str, dict[str, float]] = {}

    # A. llama.cpp plain
    f16 = work / "lc.F16.gguf"
    cw, cm, ca = measure([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir),
                      "--outfile", str(f16), "--outtype", "f16"])
    qw, _, _ = measure([str(bindir / "llama-quantize"), str(f16), str(work / "lc.Q4_K_M.gguf"),
                     "Q4_K_M", t])
    # the converter's fixed cost: interpreter, torch, tokenizer (a vocabulary-only run)
    _, vocab_peak, vocab_anon = measure([sys.executable, str(src / "convert_hf_to_gguf.py"),
                                         str(hf_dir), "--outfile", str(work / "vocab.gguf"),
                                         "--vocab-only"])
    rows["llama.cpp convert + quantize"] = {"wall": cw + qw, "peak": cm, "anon": ca,
                                            "path": str(work / "lc.Q4_K_M.gguf")}
    # B. llama.cpp with imatrix, same calibration text and amount
    calib = work / "calibration.txt"
    calib.write_text(quality.corpus("calibration"))
    iw, _, _ = measure([str(bindir / "llama-imatrix"), "-m", str(f16), "-f", str(calib),
                        "-c", "512", "--chunks", str(args.chunks), "-t", t,
                        "-o", str(work / "imatrix.gguf")])
    qiw, _, _ = measure([str(bindir / "llama-quantize"), "--imatrix", str(work / "imatrix.gguf"),
                      str(f16), str(work / "lci.Q4_K_M.gguf"), "Q4_K_M", t])
    rows["llama.cpp convert + imatrix + quantize"] = {
        "wall": cw + iw + qiw, "peak": cm, "anon": ca, "path": str(work / "lci.Q4_K_M.gguf")}

    # edgesmith, fresh cache (sharing only the extracted llama.cpp sources)
    for label, imx in [("edgesmith compress (plain Q4_K_M)", "false"),
                       ("edgesmith compress raspberry-pi-5 (imatrix)", "true")]:
        cache = work / f"cache-{imx}"
        cache.mkdir()
        (cache / "llama.cpp").symlink_to(cache_root() / "llama.cpp")
        recipe = (Path(__file__).parents[1] / "recipes" / "raspberry-pi-5-q4km.yaml").read_text()
        recipe = recipe.replace("imatrix: true", f"imatrix: {imx}")
        recipe = recipe.replace("samples: 32", f"samples: {args.chunks}")
        (work / f"r-{imx}.yaml").write_text(recipe)
        out = work / f"out-{imx}"
        env = {**os.environ, "EDGESMITH_CACHE": str(cache)}
        total, _, _ = measure([sys.executable, "-m", "edgesmith.cli", "compress", str(hf_dir),
                            "--recipe", str(work / f"r-{imx}.yaml"), "-o", str(out),
                            "--threads", t], env)
        man = json.loads((out / "manifest.json").read_text())
        st = man["timings_s"]
        # convert + quantize (+ imatrix) + the copy of the verified file into -o
        rows[label] = {"wall": st["convert"] + st["quantize"] + st.get("imatrix", 0.0)
                       + st.get("publish", 0.0),
                       "peak": man["baseline"]["convert_peak_rss_bytes"],
                       "anon": man["baseline"]["convert_peak_anon_bytes"],
                       "total_with_quality_check": total,
                       "path": str(out / man["artifacts"][0]["path"])}

    ref = quality.reference(hf_dir, quality.EvalSpec(512, 8), work, make_progress(quiet=True))
    for r in rows.values():
        sess = LlamaCppRunner().open(Path(r["path"]), threads=args.threads, n_ctx=512,
                                     logits_all=True)
        q = quality.evaluate(sess, ref)
        sess.close()
        r.update(size=Path(r["path"]).stat().st_size, ppl=q.ppl_increase_pct, kld=q.kld_mean,
                 top1=q.top1_agreement)

    f16_size = f16.stat().st_size
    print(f"\nmodel {args.model}, threads {args.threads}, F16 size {f16_size / 1e6:.1f} MB, "
          f"imatrix {args.chunks} x 512 tokens, reference ppl {ref.ppl:.3f}\n")
    print("| tool | convert+quantize wall s | conversion peak RSS MB (anon) | size MB | "
          "ppl vs ref | mean KLD | top-1 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k, r in rows.items():
        print(f"| {k} | {r['wall']:.1f} | {r['peak'] / 1e6:.0f} ({r['anon'] / 1e6:.0f}) | "
              f"{r['size'] / 1e6:.1f} | "
              f"{r['ppl']:+.2f}% | {r['kld']:.4f} | {100 * r['top1']:.1f}% |")
    a, b = rows["llama.cpp convert + quantize"], rows["llama.cpp convert + imatrix + quantize"]
    ep, ei = rows["edgesmith compress (plain Q4_K_M)"], \
        rows["edgesmith compress raspberry-pi-5 (imatrix)"]
    print("\nratios")
    print(f"- time, plain: edgesmith / llama.cpp = {ep['wall'] / a['wall']:.2f}x (target <= 1.2x)")
    print(f"- time, imatrix: edgesmith / llama.cpp = {ei['wall'] / b['wall']:.2f}x")
    print(f"- conversion peak RSS / F16 size: edgesmith {ep['peak'] / f16_size:.2f}x, "
          f"llama.cpp {a['peak'] / f16_size:.2f}x (target <= 1.5x); anonymous (not file-backed)"
          f" memory: edgesmith {ep['anon'] / f16_size:.2f}x, llama.cpp {a['anon'] / f16_size:.2f}x")
    print(f"- of that, the converter's fixed cost (a --vocab-only run: Python, torch, the "
          f"tokenizer) is {vocab_peak / 1e6:.0f} MB RSS ({vocab_anon / 1e6:.0f} anon) = "
          f"{vocab_peak / f16_size:.2f}x F16; the tensors add "
          f"{(ep['peak'] - vocab_peak) / f16_size:.2f}x F16 on top")
    print(f"- KLD, edgesmith pi-5 recipe / llama.cpp plain Q4_K_M = {ei['kld'] / a['kld']:.2f}x "
          f"at size ratio {ei['size'] / a['size']:.3f}x (target: < 1 at <= 1)")
    print(f"- KLD, edgesmith pi-5 recipe / llama.cpp imatrix Q4_K_M = {ei['kld'] / b['kld']:.2f}x")
    print(f"- edgesmith total wall incl. reference + quality check: "
          f"{ei['total_with_quality_check']:.1f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
