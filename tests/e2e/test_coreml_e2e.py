"""End to end: `edgesmith compress builtin:smollm2-135m --target iphone-15` through the CLI a
user runs: the int8 .mlpackage folder, its Linux checks in the manifest, quality estimated
from the package's own weights with the same evaluator and gates as a GGUF, and `bench`
saying plainly that Core ML speed needs macOS."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
pytest.importorskip("coremltools")


def test_compress_smollm2_for_the_iphone(tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "ios"
    r = watched([sys.executable, "-m", "edgesmith.cli", "compress", "builtin:smollm2-135m",
                 "--target", "iphone-15", "-o", str(out), "--json"])
    assert r.returncode == 0, r.stderr[-3000:]
    man = json.loads(r.stdout)
    art = man["artifacts"][0]
    assert man["recipe"]["name"] == "iphone-15-int8" and man["gates"]["passed"]
    assert art["format"] == "coreml" and art["runtime"] == "coreml"
    assert "not run in Core ML" in art["verified"]
    names = [c["name"] for c in art["checks"]]
    assert any("MIL program load" in n for n in names), names
    assert any("inputs/outputs/states" in n for n in names), names
    assert all(c["passed"] for c in art["checks"]), art["checks"]
    # the fp16 package holds the model (fp16 weights only)
    assert man["baseline"]["quality"]["kld_mean"] < 1e-3
    q = art["quality"]
    assert 0 < q["kld_mean"] <= man["gates"]["limits"]["max_kld"]
    assert q["top1_agreement"] > 0.85
    assert art["size_bytes"] < 0.55 * man["baseline"]["size_bytes"]
    for name in ("config.json", "tokenizer.json", "model.mlpackage/Manifest.json",
                 "model.mlpackage/Data/com.apple.CoreML/model.mlmodel", "manifest.json"):
        assert (out / name).is_file(), name
    b = watched([sys.executable, "-m", "edgesmith.cli", "bench", str(out / "model.mlpackage"),
                 "--threads", "2", "--repeat", "1", "--warmup", "0", "--json"])
    assert b.returncode == 2
    err = [ln for ln in b.stderr.splitlines() if ln.startswith("error:")]
    assert err and "needs macOS" in err[0], b.stderr[-2000:]
