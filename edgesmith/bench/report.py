"""`edgesmith report`: results files -> one self-contained HTML page, or Markdown for a PR.

The page holds a comparison table (sortable by a few lines of inline JavaScript), inline SVG
charts (size vs decode tokens/s, size vs quality, decode tokens/s per device and artifact)
and a Pareto view: per device, the variants no other variant beats on size, decode speed and
(where measured) KL divergence all at once. Nothing is fetched from the network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from html import escape
from importlib import resources

from edgesmith.bench import charts
from edgesmith.bench.results import BenchResult


@dataclass(frozen=True)
class Row:
    r: BenchResult

    @property
    def device(self) -> str:
        return self.r.device

    @property
    def variant(self) -> str:
        return self.r.artifact.name

    @property
    def size_mb(self) -> float:
        return self.r.artifact.size_bytes / 1e6

    @property
    def decode(self) -> float:
        return self.r.metrics.decode_tps.median

    @property
    def kld(self) -> float | None:
        return self.r.quality.kld_mean if self.r.quality else None


def _objectives(r: Row, with_q: bool) -> tuple[float, ...]:
    """What a variant minimizes: size, minus decode speed and, with quality, KLD."""
    return (r.size_mb, -r.decode) + ((r.kld,) if with_q and r.kld is not None else ())


def pareto(rows: list[Row]) -> set[int]:
    """Indices of rows that no row of the same device dominates (size down, decode up,
    KLD down when every row of that device has it)."""
    keep: set[int] = set()
    for dev in {r.device for r in rows}:
        idx = [i for i, r in enumerate(rows) if r.device == dev]
        with_q = all(rows[i].kld is not None for i in idx)
        obj = {i: _objectives(rows[i], with_q) for i in idx}
        for i in idx:
            beaten_by = [j for j in idx if obj[j] != obj[i]
                         and all(a <= b for a, b in zip(obj[j], obj[i], strict=True))]
            if not beaten_by:
                keep.add(i)
    return keep


_COLUMNS = ("device", "artifact", "quant", "size MB", "decode tok/s", "spread", "prefill tok/s",
            "TTFT ms", "load s", "peak RSS MB", "roofline %", "threads", "ppl +%", "KLD",
            "top-1 %", "Pareto")


def _cells(row: Row, on_front: bool) -> list[str]:
    r, m, q = row.r, row.r.metrics, row.r.quality
    return [
        r.device, r.artifact.name, r.artifact.quant, f"{row.size_mb:.1f}",
        f"{m.decode_tps.median:.2f}", f"{m.decode_tps.spread:.3f}", f"{m.prefill_tps.median:.1f}",
        f"{1000 * m.ttft_s.median:.1f}", f"{m.load_s.median:.3f}", f"{m.peak_rss_mb.median:.0f}",
        f"{100 * r.roofline.fraction:.1f}", str(r.settings.threads),
        f"{q.ppl_increase_pct:.2f}" if q else "-", f"{q.kld_mean:.4f}" if q else "-",
        f"{100 * q.top1_agreement:.1f}" if q else "-", "yes" if on_front else "",
    ]


def _rows(results: list[BenchResult]) -> list[Row]:
    return sorted((Row(r) for r in results), key=lambda x: (x.device, x.size_mb))


def _bar_labels(rows: list[Row]) -> list[str]:
    """One bar label per row: the artifact's name, told apart by its threads (or a number)
    where one device has several results of the same artifact, so no bar hides another."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.variant, r.device), []).append(i)
    labels = [r.variant for r in rows]
    for idx in groups.values():
        if len(idx) < 2:
            continue
        threads = [rows[i].r.settings.threads for i in idx]
        distinct = len(set(threads)) == len(threads)
        for n, i in enumerate(idx, 1):
            labels[i] += f" ({threads[n - 1]} threads)" if distinct else f" #{n}"
    return labels


def _charts(rows: list[Row], front: set[int]) -> list[str]:
    speed_pts = [charts.Point(r.size_mb, r.decode, r.device, r.r.artifact.quant) for r in rows]
    fronts: dict[str, list[charts.Point]] = {}
    for i in sorted(front):
        fronts.setdefault(rows[i].device, []).append(speed_pts[i])
    out = [charts.scatter(speed_pts, "Size vs decode speed", "artifact size (MB)",
                          "decode tokens/s (median)", fronts)]
    q_pts = [charts.Point(r.size_mb, r.kld, r.device, r.r.artifact.quant)
             for r in rows if r.kld is not None]
    if q_pts:
        q_front: dict[str, list[charts.Point]] = {}
        for i in sorted(front):
            if rows[i].kld is not None:
                q_front.setdefault(rows[i].device, []).append(
                    charts.Point(rows[i].size_mb, rows[i].kld, rows[i].device, ""))
        out.append(charts.scatter(q_pts, "Size vs quality", "artifact size (MB)",
                                  "KL divergence to reference (lower is better)", q_front))
    devices = list(dict.fromkeys(r.device for r in rows))
    labels = _bar_labels(rows)
    variants = list(dict.fromkeys(labels))
    vals = {(label, r.device): (r.decode, r.r.metrics.decode_tps.min,
                                r.r.metrics.decode_tps.max) for label, r in zip(labels, rows,
                                                                                  strict=True)}
    out.append(charts.bars(variants, devices, vals, "Decode tokens/s per device and artifact",
                           "decode tokens/s (min-max whiskers)"))
    return out


def _environments(results: list[BenchResult]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for r in results:
        e = r.environment
        seen.setdefault(r.device, (
            f"{e.cpu_model}, {e.cores_physical} cores / {e.cores_logical} threads, "
            f"{e.ram_total_gb:.1f} GB RAM, {e.os} {e.arch}, measured bandwidth "
            f"{e.mem_bandwidth_gbs:.1f} GB/s, {r.settings.runtime} "
            f"(llama-cpp-python {e.versions.get('llama-cpp-python', '?')})"))
    return list(seen.items())


def render_html(results: list[BenchResult]) -> str:
    rows = _rows(results)
    front = pareto(rows)
    head = "".join(f"<th>{escape(c)}</th>" for c in _COLUMNS)
    body = "".join(
        f'<tr class="{"front" if i in front else ""}">'
        + "".join(f"<td>{escape(c)}</td>" for c in _cells(row, i in front)) + "</tr>"
        for i, row in enumerate(rows))
    envs = "".join(f"<li><b>{escape(d)}</b>: {escape(t)}</li>" for d, t in _environments(results))
    pareto_items = "".join(
        f"<li><b>{escape(rows[i].device)}</b>: {escape(rows[i].variant)} "
        f"({rows[i].size_mb:.1f} MB, {rows[i].decode:.1f} tok/s"
        + (f", KLD {rows[i].kld:.4f}" if rows[i].kld is not None else "") + ")</li>"
        for i in sorted(front, key=lambda i: (rows[i].device, rows[i].size_mb)))
    template = (resources.files("edgesmith") / "bench" / "templates" / "report.html") \
        .read_text(encoding="utf-8")
    parts = {"n": str(len(results)), "head": head, "body": body,
             "charts": "".join(_charts(rows, front)), "pareto": pareto_items, "envs": envs}
    # one pass, so text inside a part (a device named "{{body}}") is never substituted again
    return re.sub(r"\{\{(\w+)\}\}", lambda m: parts[m.group(1)], template)


def render_markdown(results: list[BenchResult]) -> str:
    rows = _rows(results)
    front = pareto(rows)
    lines = [f"## edgesmith bench: {len(results)} result(s)", "",
             "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for i, row in enumerate(rows):
        cells = [c.replace("|", "\\|") for c in _cells(row, i in front)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "**Pareto-optimal variants** (no other variant on the same device is "
              "smaller, faster and closer to the reference at once):", ""]
    lines += [f"- {rows[i].device}: `{rows[i].variant}`" for i in sorted(front)]
    lines += ["", "**Devices**", ""]
    lines += [f"- {d}: {t}" for d, t in _environments(results)]
    return "\n".join(lines) + "\n"
