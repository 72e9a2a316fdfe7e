"""report.md for a compress run: quality table, sizes, per-tensor types, the recipe as run."""

from __future__ import annotations

from collections import Counter
from typing import Any

RUNTIMES = {"llama_cpp": "llama.cpp", "onnxruntime": "onnxruntime (Python, CPU)"}
FORMATS = {"gguf": "GGUF", "onnx": "ONNX"}


def _row(name: str, size: int | None, q: dict[str, Any] | None) -> str:
    mb = f"{size / 1e6:.1f}" if size else "—"
    if q is None:
        return f"| {name} | {mb} | — | — | — | — |"
    return (f"| {name} | {mb} | {q['ppl']:.3f} ({q['ppl_increase_pct']:+.2f}%) | "
            f"{q['kld_mean']:.4f} | {q['kld_p99']:.4f} | {100 * q['top1_agreement']:.1f}% |")


def render(man: dict[str, Any]) -> str:
    ref, base = man["reference"], man["baseline"]
    rt = man["artifacts"][0].get("runtime", "llama_cpp")
    fmt = FORMATS.get(base.get("format", "gguf"), base.get("format", "gguf"))
    lines = [
        f"# edgesmith compress: {man['input']['spec']} → {man['target']}",
        "",
        f"Recipe **{man['recipe']['name']}**; quality gate "
        f"**{'PASSED' if man['gates']['passed'] else 'FAILED'}**"
        + ("" if man["gates"]["passed"] else ": " + "; ".join(man["gates"]["failures"])),
        "",
        f"## Quality (measured in {RUNTIMES.get(rt, rt)} against the reference model)",
        "",
        f"Held-out text, {ref['eval']['windows']} windows of {ref['eval']['ctx']} tokens, second "
        f"half of each scored ({ref['eval']['tokens_scored']} tokens). Reference: "
        f"{ref['runtime']}, perplexity {ref['ppl']:.3f}.",
        "",
        "| artifact | size MB | perplexity (vs ref) | mean KLD | KLD p99 | top-1 agreement |",
        "|---|---:|---:|---:|---:|---:|",
        _row(f"{base['type']} {fmt} (baseline, not shipped)", base["size_bytes"], base["quality"]),
    ]
    for a in man["artifacts"]:
        label = f"**{a['path']}**" + (" (imatrix)" if a.get("imatrix") else "")
        lines.append(_row(label, a["size_bytes"], a["quality"]))
    lim = man["gates"]["limits"]
    lines += ["", "Gates: " + ", ".join(f"{k} = {v}" for k, v in lim.items() if v is not None), ""]
    for a in man["artifacts"]:
        counts = Counter(t["type"] for t in a["tensors"])
        lines += [f"## Tensor types in {a['path']}", "",
                  "| type | tensors |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in counts.most_common()]
        fb = a.get("fallbacks", [])
        lines += ["", f"llama.cpp fell back on {len(fb)} tensor(s) whose rows are not a multiple "
                  "of the k-quant block:" if fb else "No quantization fallbacks.", ""]
        if fb:
            pairs = Counter(f"{f['wanted']} → {f['got']} (ncols {f['ncols']})" for f in fb)
            lines += [f"- {k}: {v} tensors" for k, v in pairs.most_common()] + [""]
        lines += ["<details><summary>Every tensor</summary>", "", "| tensor | type | shape |",
                  "|---|---|---|"]
        lines += [f"| {t['name']} | {t['type']} | {'×'.join(map(str, t.get('shape', [])))} |"
                  for t in a["tensors"]]
        lines += ["", "</details>", ""]
    lines += ["## Recipe as run", "", "```yaml", man["recipe"]["text"].rstrip(), "```", "",
              "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in man["timings_s"].items()),
              "", f"Tools: {', '.join(f'{k} {v}' for k, v in man['tool_versions'].items())}", ""]
    return "\n".join(lines)
