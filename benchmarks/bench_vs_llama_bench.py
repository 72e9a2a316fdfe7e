"""edgesmith bench vs llama.cpp's own llama-bench, on the same model, threads and token counts.

The anchor, llama-bench, is built from the llama-cpp-python sdist of the installed version (the
same llama.cpp that edgesmith runs through llama-cpp-python) and measured in the same run:
  - decode: llama-bench `-n N -d P` (N tokens generated at a context depth of P prompt tokens)
    vs edgesmith's decode tokens/s after a P-token prompt;
  - prefill: llama-bench `-p P` vs edgesmith's prefill tokens/s.
Both over the same number of repeats; the table shows medians, each tool's spread (max/min over
the repeats) and edgesmith / llama-bench ratios. The runs alternate (llama-bench, edgesmith,
llama-bench, ...) so slow drift on the machine hits both alike.

Usage: python benchmarks/bench_vs_llama_bench.py [--model PATH.gguf] [--threads 2]
       [--prompt-tokens 128] [--gen-tokens 128] [--repeat 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
from pathlib import Path


def llama_bench(exe: Path, model: Path, threads: int, p: int, n: int, repeat: int) \
        -> dict[str, list[float]]:
    """Per-repeat tokens/s of llama-bench's prefill (pp) and decode-at-depth (tg) tests."""
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-r", str(repeat), "-o", "json",
           "-p", str(p), "-n", "0"]
    pp = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    cmd = [str(exe), "-m", str(model), "-t", str(threads), "-r", str(repeat), "-o", "json",
           "-p", "0", "-n", str(n), "-d", str(p)]
    tg = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    return {"prefill": [float(x) for x in pp[0]["samples_ts"]],
            "decode": [float(x) for x in tg[0]["samples_ts"]]}


def edgesmith_bench(model: Path, threads: int, p: int, n: int, repeat: int) \
        -> dict[str, list[float]]:
    from edgesmith.bench import speed
    from edgesmith.bench.runners import runner_for

    spec = speed.SpeedSpec(threads=threads, prompt_tokens=p, gen_tokens=n, repeat=repeat,
                           warmup=1)
    runner = runner_for(model)
    # loaded once, as llama-bench does (`edgesmith bench` reloads per repeat to time the
    # load; that does not change the prefill and decode figures compared here)
    m = speed.measure(lambda: runner.open(model, threads=threads, n_ctx=spec.n_ctx), spec,
                      reload_each_repeat=False)
    return {"prefill": m.prefill_tps.samples, "decode": m.decode_tps.samples}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF to measure (default: the builtin "
                                                  "SmolLM2-135M GGUF)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both tools")
    args = ap.parse_args()

    from edgesmith.export import llamacpp_src
    from edgesmith.models import builtin_path

    model = Path(args.model) if args.model else builtin_path("smollm2-135m")
    exe = llamacpp_src.build_tools(("llama-bench",)) / "llama-bench"
    p, n, t, r = args.prompt_tokens, args.gen_tokens, args.threads, args.repeat
    lb: dict[str, list[float]] = {"prefill": [], "decode": []}
    es: dict[str, list[float]] = {"prefill": [], "decode": []}
    spreads: dict[str, list[float]] = {"llama-bench": [], "edgesmith": []}
    for _ in range(args.rounds):
        a = llama_bench(exe, model, t, p, n, r)
        b = edgesmith_bench(model, t, p, n, r)
        for k in lb:
            lb[k] += a[k]
            es[k] += b[k]
        spreads["llama-bench"].append(max(a["decode"]) / min(a["decode"]))
        spreads["edgesmith"].append(max(b["decode"]) / min(b["decode"]))

    print(f"model {model.name} ({model.stat().st_size / 1e6:.1f} MB), threads {t}, "
          f"prompt {p}, generate {n}, {args.rounds} rounds x {r} repeats")
    print(f"{'metric':<24}{'llama-bench':>14}{'edgesmith':>14}{'ratio':>10}")
    ratio = {}
    for k in ("prefill", "decode"):
        a_med, b_med = statistics.median(lb[k]), statistics.median(es[k])
        ratio[k] = b_med / a_med
        print(f"{k + ' tok/s (median)':<24}{a_med:>14.2f}{b_med:>14.2f}{ratio[k]:>10.3f}")
    for tool, s in spreads.items():
        print(f"decode spread max/min over {r} repeats, {tool}: "
              + ", ".join(f"{x:.3f}" for x in s))
    print(f"targets: decode within 3% of llama-bench: "
          f"{'met' if abs(ratio['decode'] - 1) <= 0.03 else 'MISSED'}; edgesmith's decode "
          f"spread under 10%: {'met' if max(spreads['edgesmith']) < 1.10 else 'MISSED'}")


if __name__ == "__main__":
    main()
