"""A local sweep of the tiny Llama through the CLI: variants measured in llama.cpp, shared
work done once (timings in the manifests), the recommendation per target computed from the
manifests, resume, and one failing variant that does not stop the others."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith import models
from edgesmith.fsutil import sha256_file
from edgesmith.sweep import core, plan
from edgesmith.targets import fit, profile

CHEAP = ["--eval-windows", "2", "--eval-ctx", "128", "--calib-samples", "2",
         "--calib-seq-len", "128", "--ctx", "512"]
TARGETS = ["raspberry-pi-4", "raspberry-pi-5"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=1200)


@pytest.fixture(scope="module")
def swept(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sweep") / "s"
    # a copy: its own run cache, so the first variant really converts and computes the
    # reference and imatrix whatever other tests left in the session's cache
    model = out.parent / tiny_llama.name
    shutil.copytree(tiny_llama, model)
    # Q8_0 (16.8 MB) misses the size gate, Q4_0 (13.0 MB: its embedding stays at 6 bits) meets it
    p = cli("sweep", str(model), "--targets", ",".join(TARGETS), "--quants", "Q4_0,Q8_0",
            "--methods", "plain,imatrix", "--goal", "max_size_mb=15", "--jobs", "2",
            "--threads", "1", *CHEAP, "-o", str(out))
    assert p.returncode == 0, p.stderr
    return out


def test_every_variant_is_a_pipeline_result(swept: Path) -> None:
    s = json.loads((swept / "sweep.json").read_text())
    names = [r["name"] for r in s["results"]]
    assert names == ["Q4_0", "Q8_0", "Q4_0-imatrix", "Q8_0-imatrix"]
    for r in s["results"]:
        man = json.loads((swept / r["name"] / "manifest.json").read_text())
        art = man["artifacts"][0]
        assert art["sha256"] == sha256_file(swept / r["artifact"]) == r["sha256"]
        assert art["imatrix"] == r["name"].endswith("-imatrix")
        assert {t["type"] for t in art["tensors"] if "blk." in t["name"]} >= {r["name"][:4]}
        assert r["quality"] == art["quality"] and art["quality"]["tokens_scored"] == 2 * 63
        assert r["status"] == ("ok" if r["name"].startswith("Q4_0") else "gates-failed")
        bench = json.loads((swept / r["bench"]).read_text())
        assert bench["artifact"]["sha256"] == r["sha256"]
        assert bench["quality"]["kld_mean"] == art["quality"]["kld_mean"]
        assert bench["metrics"]["decode_tps"]["median"] > 0
    kld = {r["name"]: r["quality"]["kld_mean"] for r in s["results"]}
    assert kld["Q8_0"] < kld["Q4_0"]  # more bits, closer to the reference


def test_shared_work_ran_once(swept: Path) -> None:
    """The first variant converted, computed the reference and the imatrix; the others found
    them in the cache (the pipeline's own stage timings)."""
    s = json.loads((swept / "sweep.json").read_text())
    t = {r["name"]: r["timings_s"] for r in s["results"]}
    first = "Q4_0-imatrix"  # the schedule's first: no torch pass, uses the imatrix
    others = [n for n in t if n != first]
    assert all(t[n]["convert"] < 0.5 * max(t[first]["convert"], 0.2) for n in others), t
    assert t["Q8_0-imatrix"]["imatrix"] < 0.5 * t[first]["imatrix"], t
    assert all(t[n]["reference"] < 0.5 * t[first]["reference"] for n in others), t


def test_recommendation_follows_from_the_manifests(swept: Path) -> None:
    s = json.loads((swept / "sweep.json").read_text())
    for rec in s["recommendations"]:
        target = profile.load(rec["target"])
        cands = []
        for r in s["results"]:
            man = json.loads((swept / r["name"] / "manifest.json").read_text())
            est = fit.estimate(models.resolve(str(swept / r["artifact"])), target, 512)
            if man["gates"]["passed"] and est.fits:
                cands.append((est.decode_tps_upper_bound, -man["artifacts"][0]["quality"][
                    "kld_mean"], r["name"], r["size_bytes"]))
        assert {c[2] for c in cands} == {"Q4_0", "Q4_0-imatrix"}
        assert rec["fastest"]["variant"] == max(cands)[2]
        assert rec["smallest"]["variant"] == min(cands, key=lambda c: (c[3], -c[1]))[2]
        assert rec["fastest"]["speed_source"] == "roofline estimate"
        why = dict(map(tuple, rec["excluded"]))
        assert why["Q8_0"].startswith("missed the gates: size")
    html = (swept / "report.html").read_text()
    assert '<table id="recommendations">' in html and html.count("<svg") >= 4


def test_rerun_resumes_without_recomputing(swept: Path, tiny_llama: Path) -> None:
    stamps = {p: p.stat().st_mtime_ns for p in swept.glob("*/*.gguf")}
    model = swept.parent / tiny_llama.name  # the fixture's copy
    p = cli("sweep", str(model), "--targets", ",".join(TARGETS), "--quants", "Q4_0,Q8_0",
            "--methods", "plain,imatrix", "--goal", "max_size_mb=15", "--jobs", "2",
            "--threads", "1", *CHEAP, "-o", str(swept), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)
    assert all(r["resumed"] for r in s["results"])
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_a_failed_variant_does_not_stop_the_others(tiny_llama: Path, tmp_path: Path) -> None:
    st = plan.Settings("raspberry-pi-4", {}, 2, 128, 128, 2)
    good = plan.build_variant("Q4_0", "plain", st, {"ffn_down": "Q8_0"})
    bad = plan.build_variant("Q4_0", "plain", st, {"no_such_tensor": "Q8_0"})
    opts = core.SweepOptions(tmp_path / "s", ["raspberry-pi-4"], ctx=512, jobs=2, threads=1,
                             bench=None, log=lambda m: None)
    s = core.sweep(str(tiny_llama), [bad, good], opts)
    r_bad, r_good = s["results"]
    assert r_bad["status"] == "failed" and "no tensor of" in r_bad["error"]
    assert r_good["status"] == "ok"
    man = json.loads((tmp_path / "s" / good.name / "manifest.json").read_text())
    types = {t["name"]: t["type"] for t in man["artifacts"][0]["tensors"]}
    assert types["blk.0.ffn_down.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.ffn_up.weight"] == "Q4_0"
    assert s["recommendations"][0]["fastest"]["variant"] == good.name
