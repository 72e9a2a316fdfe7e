"""The iPhone artifact (Core ML .mlpackage) against its anchors, measured in the same run.

Rows, all on the same model, held-out windows and evaluator as ``compress`` (quality against
the fp32 torch reference; Core ML's rows are estimated on Linux from the package's own weights
run in PyTorch, since ``predict`` needs macOS):

- anchor: GGUF Q4_0 as llama.cpp makes it by default (F16 -> Q4_0, no importance matrix),
  evaluated in llama.cpp;
- Core ML fp16 (the baseline of the int8 run), int8 per channel (``--target iphone-15``'s
  default), RTN int4 per block of 32 (int8 embedding), and int4 from GPTQ's own codes
  (``iphone-15-gptq-int4``: w4 g32 asymmetric, the codes written as blockwise constants).

Figures (issue 14): the int4 package's size within 1.05x of the theoretical (each weight at
its stored width: 4-bit codes + fp16 scales + 4-bit offsets per block, int8 + one fp16 scale per
row, fp16 for what is not quantized), and its KLD no worse than 1.2x the GGUF Q4_0's.

``rows(args)`` is what benchmarks/mobile_vs_anchors.py imports (args: ``model``, ``windows``);
run alone: python benchmarks/_mobile_coreml.py [--model builtin:smollm2-135m] [--quick] [--json]
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

Q4_0 = """name: bench-q4_0
target: raspberry-pi-5
calibration: {{source: builtin:calibration, samples: 32, seq_len: 512}}
eval: {{ctx: 512, windows: {windows}}}
steps:
  - export: {{format: gguf, outtype: f16}}
  - gguf_quantize: {{type: Q4_0, imatrix: false}}
gates: {{max_kld: 100}}
"""

RTN4 = """name: bench-coreml-rtn-int4
target: iphone-15
calibration: {{source: builtin:calibration, samples: 32, seq_len: 512}}
eval: {{ctx: 512, windows: {windows}}}
steps:
  - export: {{format: coreml, dtype: fp16, context: 2048}}
  - coreml_compress: {{mode: int4, block_size: 32, embedding: int8}}
gates: {{max_kld: 100}}
"""

BYTES = {"uint4": lambda n, rows, b: n / 2 + n / b * 2.5,  # codes, fp16 scale, 4-bit offset
         "int4": lambda n, rows, b: n / 2 + n / b * 2.5,
         "int8-per-channel": lambda n, rows, b: n + rows * 2,
         "lut4": lambda n, rows, b: n / 2 + rows / 16 * 16 * 2,
         "fp16": lambda n, rows, b: 2 * n}


# the CLI, with doctor's preflight told about the coreml exporter where this checkout's
# doctor.py does not know it yet (a no-op once it does)
CLI = ("import sys; from edgesmith import doctor; doctor.EXPORTER_FORMATS.add('coreml'); "
       "from edgesmith.cli import main; sys.argv[0] = 'edgesmith'; main()")


def _edgesmith(*args: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CLI, *args, "--json", "--force"],
                       capture_output=True, text=True)
    if p.returncode not in (0, 2) or not p.stdout.strip().startswith("{"):
        raise RuntimeError(f"edgesmith {' '.join(args)} failed:\n{p.stderr[-3000:]}")
    man = json.loads(p.stdout)
    man["_wall_s"] = time.perf_counter() - t0
    return man


def _recipe(work: Path, name: str, text: str, windows: int) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(text.replace("windows: 8", f"windows: {windows}"))
    return path


def theoretical_bytes(model: str, tensors: list[dict[str, Any]]) -> float:
    """The package's weights at their stored width (``tensors``: the manifest's list), the
    parameters it does not list (norms) in fp16."""
    from edgesmith import models
    from edgesmith.export.coreml_llama import CoreMLLlama, spec_of

    hf_dir = models.as_hf_dir(models.resolve(model))
    config = json.loads((hf_dir / "config.json").read_text())
    shell = CoreMLLlama(spec_of(config), 2, False)
    types = {t["name"]: t["type"] for t in tensors}
    total = 0.0
    for name, p in shell.named_parameters():
        kind = types.get(name, "fp16")
        block = int(kind.rsplit("-b", 1)[1]) if "-b" in kind else 1
        key = next(k for k in BYTES if kind.startswith(k))
        total += BYTES[key](p.numel(), p.shape[0], block)
    return total


def _row(label: str, man: dict[str, Any], model: str, base: bool = False) -> dict[str, Any]:
    a = man["artifacts"][0]
    q = man["baseline"]["quality"] if base else a["quality"]
    row: dict[str, Any] = {"row": label, "kld": q["kld_mean"], "top1": q["top1_agreement"],
                           "ppl_pct": q["ppl_increase_pct"], "wall_s": man["_wall_s"]}
    if base:
        row["size_mb"] = man["baseline"]["size_bytes"] / 1e6
        return row
    pkg = [f for f in man["files"] if f["path"].startswith("model.mlpackage/")]
    row["size_mb"] = (sum(f["size_bytes"] for f in pkg) if pkg else a["size_bytes"]) / 1e6
    row["verified"] = a.get("verified")
    if pkg:
        row["theory_mb"] = theoretical_bytes(model, a.get("tensors", [])) / 1e6
        row["checks_passed"] = all(c["passed"] for c in a.get("checks", []))
    return row


def rows(args: Any) -> list[dict[str, Any]]:
    """The rows above; ``args.model`` and ``args.windows`` (eval windows of 512 tokens)."""
    from edgesmith import recipe as recipe_mod

    windows = int(getattr(args, "windows", 8))
    work = Path(tempfile.mkdtemp(prefix="coreml-bench-"))
    out: list[dict[str, Any]] = []
    try:
        q40 = _edgesmith("compress", args.model, "--recipe",
                         str(_recipe(work, "q4_0", Q4_0.format(windows=windows), windows)),
                         "-o", str(work / "q4_0"))
        out.append(_row("anchor: GGUF Q4_0 (llama.cpp, no imatrix)", q40, args.model))
        int8 = _edgesmith("compress", args.model, "--recipe", str(_recipe(
            work, "int8", recipe_mod.load("iphone-15-int8").text, windows)), "-o",
            str(work / "int8"))
        out.append(_row("Core ML fp16 (baseline)", int8, args.model, base=True))
        out.append(_row("Core ML int8 per channel (--target iphone-15)", int8, args.model))
        rtn = _edgesmith("compress", args.model, "--recipe", str(_recipe(
            work, "rtn4", RTN4.format(windows=windows), windows)), "-o", str(work / "rtn4"))
        out.append(_row("Core ML int4 b32 RTN, int8 embedding", rtn, args.model))
        gptq = _edgesmith("compress", args.model, "--recipe", str(_recipe(
            work, "gptq4", recipe_mod.load("iphone-15-gptq-int4").text, windows)), "-o",
            str(work / "gptq4"))
        out.append(_row("Core ML int4 b32 GPTQ codes, int8 embedding (iphone-15-gptq-int4)",
                        gptq, args.model))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def report(found: list[dict[str, Any]], model: str, windows: int) -> None:
    anchor = found[0]
    print(f"model {model}, {windows} held-out windows of 512 tokens; KLD ratios vs GGUF Q4_0 "
          f"(KLD {anchor['kld']:.4f}); Core ML quality estimated on Linux (package weights "
          "in PyTorch)")
    print(f"{'row':68} {'KLD':>8} {'xQ4_0':>6} {'top-1':>6} {'ppl':>8} {'MB':>7} "
          f"{'theory':>7} {'xth':>5} {'wall s':>7}")
    for r in found:
        th = r.get("theory_mb")
        print(f"{r['row']:68} {r['kld']:8.4f} {r['kld'] / anchor['kld']:6.2f} "
              f"{100 * r['top1']:5.1f}% {r['ppl_pct']:+7.2f}% {r['size_mb']:7.1f} "
              + (f"{th:7.1f} {r['size_mb'] / th:5.3f}" if th else f"{'':7} {'':5}")
              + f" {r['wall_s']:7.1f}")
    last = found[-1]
    print(f"targets: int4 (GPTQ codes) size {last['size_mb'] / last['theory_mb']:.3f}x theoretical "
          f"(<= 1.05), KLD {last['kld'] / anchor['kld']:.2f}x GGUF Q4_0's (<= 1.2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--quick", action="store_true", help="4 eval windows instead of 8")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.windows = 4 if args.quick else 8
    found = rows(args)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        report(found, args.model, args.windows)


if __name__ == "__main__":
    main()
