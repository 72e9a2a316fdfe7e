"""``sweep --search``: on the tiny Llama, the goal is set from a measured grid (between two
of its variants); the search must meet it with a variant no larger than the grid's best
that meets it, in fewer measured variants, and report its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.sweep import search

CHEAP = ["--eval-windows", "2", "--eval-ctx", "128", "--calib-samples", "2",
         "--calib-seq-len", "128", "--ctx", "512", "--no-bench", "--threads", "1"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200"}, timeout=1200)


def test_tensor_classes_and_their_patterns() -> None:
    tensors = [{"name": n} for n in ("token_embd.weight", "blk.0.attn_v.weight",
                                     "blk.0.ffn_down.weight", "blk.1.attn_q.weight",
                                     "output_norm.weight")]
    assert search.classes_of(tensors) == ["attn_v", "ffn_down", "token_embd", "attn_q"]
    assert search.class_pattern("attn_v") == "[.]attn_v[.]"
    assert search.class_pattern("output") == "^output[.]"


@pytest.fixture(scope="module")
def grid(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("grid") / "g"
    p = cli("sweep", str(tiny_llama), "--targets", "raspberry-pi-4", "--quants",
            ",".join(search.DEFAULT_LADDER), "--methods", "imatrix", *CHEAP, "-o", str(out))
    assert p.returncode == 0, p.stderr
    s = json.loads((out / "sweep.json").read_text())
    return {r["name"]: r for r in s["results"]}


def test_search_meets_the_goal_smaller_than_the_grid_in_fewer_measurements(
        grid: dict[str, dict], tiny_llama: Path, tmp_path: Path) -> None:
    by_size = sorted(grid.values(), key=lambda r: r["size_bytes"])
    # a goal the second-smallest type just meets: the search has something to find
    goal = by_size[1]["quality"]["kld_mean"] * 1.001
    meeting = [r for r in by_size if r["quality"]["kld_mean"] <= goal]
    best_grid = min(r["size_bytes"] for r in meeting)
    p = cli("sweep", str(tiny_llama), "--targets", "raspberry-pi-4", "--search", "--goal",
            f"max_kld={goal:.6f}", *CHEAP, "-o", str(tmp_path / "s"), "--json")
    assert p.returncode == 0, p.stderr
    s = json.loads(p.stdout)["search"]
    res = s["result"]
    assert res is not None and res["kld"] <= goal
    assert res["size_mb"] * 1e6 <= best_grid
    assert s["measured_variants"] < s["grid_variants"] == len(grid)
    assert len(s["path"]) >= s["measured_variants"] and s["path"][0]["step"] == "bisect"
    man = json.loads((tmp_path / "s" / res["variant"] / "manifest.json").read_text())
    assert man["artifacts"][0]["quality"]["kld_mean"] == res["kld"]  # measured, not guessed
    html = (tmp_path / "s" / "report.html").read_text()
    assert '<table id="search">' in html and res["variant"] in html
