"""`edgesmith sweep` of SmolLM2-135M: 4 GGUF variants for two Raspberry Pi targets, run
locally, the report rendered in headless Chromium with its recommendation table checked
against the variants' manifests. Kept cheap for a 2-core CI box: 2 eval windows, a short
calibration, a short bench."""

from __future__ import annotations

import html as htmllib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith import models
from edgesmith.targets import fit, profile

TARGETS = ["raspberry-pi-4", "raspberry-pi-5"]
QUANTS = ["Q4_0", "Q4_K_M", "Q6_K", "Q8_0"]
MAX_KLD = 0.1


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, watched) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("sweep") / "s"
    p = watched([sys.executable, "-m", "edgesmith.cli", "sweep", "builtin:smollm2-135m",
                 "--targets", ",".join(TARGETS), "--quants", ",".join(QUANTS),
                 "--methods", "imatrix", "--goal", f"max_kld={MAX_KLD}", "--eval-windows", "2",
                 "--calib-samples", "4", "--calib-seq-len", "128", "-o", str(out)],
                env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("chromium")
    assert exe, "Debian's chromium is needed: apt-get install chromium"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update",
                           "--disable-sync", f"--user-data-dir={tmp / 'profile'}",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True,
                          text=True, timeout=120)


def _table(dom: str, table_id: str) -> list[list[str]]:
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', dom, re.S)
    assert body, f"no table {table_id} in the rendered page"
    return [[htmllib.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)]


def test_variants_measured_and_recommended_from_their_manifests(swept: Path) -> None:
    s = json.loads((swept / "sweep.json").read_text())
    assert [r["name"] for r in s["results"]] == [f"{q}-imatrix" for q in QUANTS]
    mans = {r["name"]: json.loads((swept / r["name"] / "manifest.json").read_text())
            for r in s["results"]}
    kld = {n: m["artifacts"][0]["quality"]["kld_mean"] for n, m in mans.items()}
    assert kld["Q8_0-imatrix"] < kld["Q6_K-imatrix"] < kld["Q4_K_M-imatrix"] < kld["Q4_0-imatrix"]
    for rec in s["recommendations"]:
        target = profile.load(rec["target"])
        ok = []
        for n, m in mans.items():
            art = m["artifacts"][0]
            est = fit.estimate(models.resolve(str(swept / n / art["path"])), target, 4096)
            assert m["gates"]["passed"] == (art["quality"]["kld_mean"] <= MAX_KLD)
            if m["gates"]["passed"] and est.fits:
                ok.append((art["size_bytes"], n, est.decode_tps_upper_bound))
        assert ok, "no variant meets the goal: the test's goal is off for this model"
        assert rec["smallest"]["variant"] == min(ok)[1]
        assert rec["fastest"]["variant"] == max(ok, key=lambda c: c[2])[1]
        assert rec["fastest"]["decode_tps"] == pytest.approx(max(c[2] for c in ok))


def test_report_renders_in_chromium_with_the_recommendation_table(swept: Path,
                                                                   tmp_path: Path) -> None:
    page = swept / "report.html"
    shot = _chromium([f"--screenshot={tmp_path / 'shot.png'}", "--window-size=1200,1600",
                      page.as_uri()], tmp_path)
    assert shot.returncode == 0 and (tmp_path / "shot.png").stat().st_size > 20_000
    assert [ln for ln in shot.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln] == []
    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = _table(dom.stdout, "recommendations")
    s = json.loads((swept / "sweep.json").read_text())
    expected = [[r["target"], choice, r[choice]["variant"], f"{r[choice]['size_mb']:.1f}",
                 f"{r[choice]['kld']:.4f}"] for r in s["recommendations"]
                for choice in ("fastest", "smallest")]
    assert [row[:5] for row in rows] == expected
    assert {row[0] for row in rows} == set(TARGETS)
    variants = _table(dom.stdout, "variants")
    assert [v[0] for v in variants] == [f"{q}-imatrix" for q in QUANTS]
    # per-target Pareto charts, the quality chart and the bench report's three charts
    assert dom.stdout.count("<svg") == len(TARGETS) + 1 + 3
    assert "raspberry-pi-4: size vs decode speed" in dom.stdout
