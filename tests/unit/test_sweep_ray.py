"""The Ray executor on a local Ray instance (``ray.init(num_cpus=2)``) gives the same results
as the local executor: a 3-variant sweep of the tiny Llama, each run from its own empty cache
(so the Ray tasks really convert, calibrate, quantize and verify)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from edgesmith.sweep import core, plan

ray = pytest.importorskip("ray")


def variants() -> list[plan.Variant]:
    st = plan.Settings("raspberry-pi-4", {"max_kld": 10.0}, 2, 128, 128, 2)
    return [plan.build_variant("Q4_0", "plain", st),
            plan.build_variant("Q4_K_M", "imatrix", st),
            plan.build_variant("Q4_0", "plain", st, {"ffn_down": "Q8_0"})]


def sweep(tiny: Path, out: Path, ray_address: str | None) -> dict[str, Any]:
    opts = core.SweepOptions(out, ["raspberry-pi-4", "raspberry-pi-5"], ctx=512, jobs=2,
                             threads=1, bench=None, ray=ray_address, log=lambda m: None)
    return core.sweep(str(tiny), variants(), opts)


def tensor_types(out: Path, name: str) -> dict[str, str]:
    man = json.loads((out / name / "manifest.json").read_text())
    return {t["name"]: t["type"] for t in man["artifacts"][0]["tensors"]}


def test_ray_sweep_equals_local_sweep(tiny_llama: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache-local"))
    loc = sweep(tiny_llama, tmp_path / "local", None)
    monkeypatch.setenv("EDGESMITH_CACHE", str(tmp_path / "cache-ray"))  # Ray's workers inherit
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = sweep(tiny_llama, tmp_path / "ray", "local")
        tasks = ray.util.state.list_tasks(filters=[("func_or_class_name", "=", "_task")]) \
            if hasattr(ray.util, "state") else None
    finally:
        ray.shutdown()
    assert [r["status"] for r in loc["results"]] == ["ok"] * 3
    for a, b in zip(loc["results"], on_ray["results"], strict=True):
        assert a["name"] == b["name"] and a["status"] == b["status"]
        assert a["size_bytes"] == b["size_bytes"]
        assert tensor_types(tmp_path / "local", a["name"]) == \
            tensor_types(tmp_path / "ray", b["name"])
        assert b["quality"]["kld_mean"] == pytest.approx(a["quality"]["kld_mean"], rel=1e-3)
        if "imatrix" not in a["name"]:  # no calibration: the same bytes
            assert a["sha256"] == b["sha256"]
        assert b["timings_s"]["verify"] > 0  # measured in the Ray task, not taken from elsewhere
    # the Ray run really converted and calibrated in its own (empty) cache
    assert max(r["timings_s"]["convert"] for r in on_ray["results"]) > 0.2
    assert (tmp_path / "cache-ray" / "runs").is_dir()
    assert [r["fastest"]["variant"] for r in loc["recommendations"]] == \
        [r["fastest"]["variant"] for r in on_ray["recommendations"]]
    if tasks is not None:
        assert len(tasks) == 3
