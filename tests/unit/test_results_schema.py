"""The results schema: round trip of a real bench result; readers reject bad files clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesmith.bench import results
from edgesmith.bench.results import BenchResult, Stat
from edgesmith.bench.speed import SpeedSpec, bench_local
from edgesmith.errors import OutputError, ResultsError
from edgesmith.models import builtin_path


@pytest.fixture(scope="module")
def real_result() -> BenchResult:
    spec = SpeedSpec(threads=2, prompt_tokens=16, gen_tokens=8, repeat=2, warmup=0)
    return bench_local(builtin_path("smollm2-135m"), spec, device="unit")


def test_round_trip(real_result: BenchResult, tmp_path: Path) -> None:
    dest = tmp_path / "r.json"
    results.write(real_result, dest)
    raw = json.loads(dest.read_text())
    assert raw["schema"] == "edgesmith.bench" and raw["schema_version"] == 1
    assert results.read(dest) == real_result


def test_write_refuses_to_overwrite(real_result: BenchResult, tmp_path: Path) -> None:
    dest = tmp_path / "r.json"
    dest.write_text("old")
    with pytest.raises(OutputError, match="already exists"):
        results.write(real_result, dest)
    assert dest.read_text() == "old"
    results.write(real_result, dest, force=True)
    assert results.read(dest) == real_result


def _write(tmp_path: Path, data: object) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    return p


def test_unknown_schema_version(real_result: BenchResult, tmp_path: Path) -> None:
    data = real_result.to_json() | {"schema_version": 99}
    with pytest.raises(ResultsError, match="schema version 99; this edgesmith reads version 1"):
        results.read(_write(tmp_path, data))


def test_not_a_results_file(tmp_path: Path) -> None:
    with pytest.raises(ResultsError, match="not an edgesmith bench results file"):
        results.read(_write(tmp_path, {"schema": "edgesmith.manifest", "schema_version": 1}))
    with pytest.raises(ResultsError, match="not an edgesmith bench results file"):
        results.read(_write(tmp_path, [1, 2]))


def test_corrupt_json_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "cut.json"
    p.write_text('{"schema": "edgesmith.bench", "schema_ver')
    with pytest.raises(ResultsError, match="not valid JSON"):
        results.read(p)
    with pytest.raises(ResultsError, match="does not exist"):
        results.read(tmp_path / "nope.json")


def test_missing_and_unknown_fields(real_result: BenchResult, tmp_path: Path) -> None:
    data = real_result.to_json()
    del data["metrics"]["decode_tps"]
    with pytest.raises(ResultsError, match=r"corrupt: metrics\.decode_tps"):
        results.read(_write(tmp_path, data))
    data = real_result.to_json()
    data["artifact"]["surprise"] = 1
    with pytest.raises(ResultsError, match=r"artifact\.surprise"):
        results.read(_write(tmp_path, data))


def test_stat() -> None:
    s = Stat.of([2.0, 1.0, 4.0])
    assert (s.median, s.min, s.max, s.spread) == (2.0, 1.0, 4.0, 4.0)
    with pytest.raises(ValueError):
        Stat.of([])
