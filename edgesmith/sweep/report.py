"""The sweep's ``report.html``: the recommendation table per target, Pareto charts per target
and per device, every variant's outcome, then the bench report of every bench result (the
page of ``edgesmith report``, edgesmith/bench/report.py, with its table, charts and Pareto
view). Self-contained: inline SVG, nothing fetched.
"""

from __future__ import annotations

from html import escape
from typing import Any

from edgesmith.bench import charts
from edgesmith.bench import report as bench_report
from edgesmith.bench.results import BenchResult
from edgesmith.sweep.recommend import Candidate, Recommendation

REC_COLUMNS = ("target", "choice", "variant", "size MB", "KLD", "ppl +%", "top-1 %",
               "decode tok/s", "speed from", "memory MB at ctx", "candidates")


def _front(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on size, speed and KLD at once."""
    obj = [(c.size_mb, -c.decode_tps, c.kld) for c in cands]
    return [c for c, o in zip(cands, obj, strict=True)
            if not any(p != o and all(a <= b for a, b in zip(p, o, strict=True)) for p in obj)]


def _rec_rows(recs: list[Recommendation]) -> str:
    rows = []
    for r in recs:
        for label, c in (("fastest", r.fastest), ("smallest", r.smallest)):
            if c is None:
                rows.append(f'<tr><td>{escape(r.target)}</td><td>{label}</td>'
                            f'<td colspan="{len(REC_COLUMNS) - 2}">no variant fits at ctx '
                            f"{r.ctx} and meets the gates</td></tr>")
                continue
            cells = [r.target, label, c.variant, f"{c.size_mb:.1f}", f"{c.kld:.4f}",
                     f"{c.ppl_increase_pct:+.2f}", f"{100 * c.top1:.1f}",
                     f"{c.decode_tps:.1f}", c.speed_source,
                     f"{c.total_mb:.0f} of {c.usable_mb:.0f} @{r.ctx}",
                     str(len(r.candidates))]
            rows.append("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in cells) + "</tr>")
    return "".join(rows)


def _target_charts(recs: list[Recommendation]) -> list[str]:
    out = []
    for r in recs:
        if not r.candidates:
            continue
        pts = [charts.Point(c.size_mb, c.decode_tps, r.target, c.variant) for c in r.candidates]
        front = [charts.Point(c.size_mb, c.decode_tps, r.target, "") for c in _front(r.candidates)]
        src = r.candidates[0].speed_source
        out.append(charts.scatter(pts, f"{r.target}: size vs decode speed", "artifact size (MB)",
                                  f"decode tokens/s ({src})", {r.target: front}))
    return out


def _quality_chart(results: list[dict[str, Any]]) -> str:
    pts = [charts.Point(r["size_bytes"] / 1e6, r["quality"]["kld_mean"],
                        "meets the gates" if r["status"] == "ok" else "misses the gates",
                        r["name"]) for r in results if r["status"] in ("ok", "gates-failed")]
    return charts.scatter(pts, "Every variant: size vs quality", "artifact size (MB)",
                          "KL divergence to reference (lower is better)") if pts else ""


def _variant_rows(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        q = r.get("quality") or {}
        t = r.get("timings_s") or {}
        cells = [r["name"], r["status"] + (" (resumed)" if r.get("resumed") else ""),
                 f"{r['size_bytes'] / 1e6:.1f}" if "size_bytes" in r else "-",
                 f"{q['kld_mean']:.4f}" if q else "-",
                 f"{q['ppl_increase_pct']:+.2f}" if q else "-",
                 f"{r.get('seconds', 0):.1f}",
                 " ".join(f"{k} {v:.1f}" for k, v in t.items() if v >= 0.05) or "-",
                 r.get("error", "") or "; ".join((r.get("gates") or {}).get("failures", []))]
        rows.append("<tr>" + "".join(f"<td>{escape(x)}</td>" for x in cells) + "</tr>")
    return "".join(rows)


def render_html(model: str, results: list[dict[str, Any]], recs: list[Recommendation],
                bench: list[BenchResult], extra_html: str = "") -> str:
    """The page: sweep sections first, then the bench report's own sections."""
    page = bench_report.render_html(bench)
    head = "".join(f"<th>{escape(c)}</th>" for c in REC_COLUMNS)
    vhead = "".join(f"<th>{escape(c)}</th>" for c in (
        "variant", "status", "size MB", "KLD", "ppl +%", "wall s", "stages s", "why"))
    ok = sum(r["status"] == "ok" for r in results)
    sweep = (
        f"<h1>edgesmith sweep report</h1><p>Model <b>{escape(model)}</b>: {len(results)} "
        f"variant(s), {ok} meeting the gates. Per target: the fastest variant that fits its "
        "RAM at the context and meets the gates, and the smallest. Speed is measured on a "
        "device of the target where one was given (--device), else its roofline bound "
        "(memory bandwidth / bytes read per token).</p>"
        f'<h2>Recommendations</h2><table id="recommendations"><thead><tr>{head}</tr></thead>'
        f"<tbody>{_rec_rows(recs)}</tbody></table>"
        '<h2>Pareto charts per target</h2><div class="charts">'
        + "".join(_target_charts(recs)) + _quality_chart(results) + "</div>"
        + extra_html
        + f'<h2>Variants</h2><table id="variants"><thead><tr>{vhead}</tr></thead>'
        f"<tbody>{_variant_rows(results)}</tbody></table>"
        "<h2>Bench results</h2>")
    page = page.replace("<title>edgesmith bench report</title>",
                        "<title>edgesmith sweep report</title>", 1)
    return page.replace("<h1>edgesmith bench report</h1>", sweep, 1)
