"""The report's Pareto view and chart labels, on variants of one real bench result."""

from __future__ import annotations

import pytest

from edgesmith.bench import report
from edgesmith.bench.results import BenchResult, Stat
from edgesmith.bench.speed import SpeedSpec, bench_local
from edgesmith.models import builtin_path


@pytest.fixture(scope="module")
def base() -> BenchResult:
    spec = SpeedSpec(threads=1, prompt_tokens=16, gen_tokens=4, repeat=1, warmup=0)
    return bench_local(builtin_path("smollm2-135m"), spec, device="unit")


def variant(base: BenchResult, name: str, size_mb: float, decode: float,
            device: str = "unit", threads: int = 1) -> BenchResult:
    return base.model_copy(update={
        "device": device,
        "artifact": base.artifact.model_copy(update={"name": name,
                                                     "size_bytes": int(size_mb * 1e6)}),
        "metrics": base.metrics.model_copy(update={"decode_tps": Stat.of([decode])}),
        "settings": base.settings.model_copy(update={"threads": threads}),
    })


def test_pareto_keeps_only_undominated_variants_per_device(base: BenchResult) -> None:
    rows = [report.Row(r) for r in (
        variant(base, "small-fast", 100, 50), variant(base, "big-slow", 200, 40),
        variant(base, "big-fastest", 200, 60), variant(base, "big-slow", 200, 40, "pi-4"))]
    # big-slow is beaten by small-fast on this device, but is alone (so kept) on pi-4
    assert report.pareto(rows) == {0, 2, 3}


def test_repeated_artifact_on_one_device_gets_its_own_bar(base: BenchResult) -> None:
    a1, a2 = variant(base, "m.gguf", 100, 50, threads=1), variant(base, "m.gguf", 100, 90,
                                                                   threads=2)
    rows = [report.Row(a1), report.Row(a2)]
    assert report._bar_labels(rows) == ["m.gguf (1 threads)", "m.gguf (2 threads)"]
    same = [report.Row(a1), report.Row(a1), report.Row(variant(base, "m.gguf", 100, 50,
                                                               device="other"))]
    assert report._bar_labels(same) == ["m.gguf #1", "m.gguf #2", "m.gguf"]
    page = report.render_html([a1, a2])
    assert "m.gguf (1 threads)" in page and "m.gguf (2 threads)" in page
