"""End to end on the real packaged SmolLM2-135M: the Raspberry Pi 5 path and its claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from edgesmith import models
from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
from edgesmith.models import load_hf

pytestmark = pytest.mark.e2e

TEXT = ("SQLite is a C-language library that implements a small, fast, self-contained SQL "
        "database engine. In 2024, 1234 devices ran it at $56.78 each -- see https://x.org/a?b=1")


@pytest.fixture(scope="session")
def cli(watched):  # type: ignore[no-untyped-def]
    """The CLI in a subprocess. No fixed timeout (900 s failed a healthy run on a busy machine):
    conftest.run_watched fails a run only when it stops progressing (see IDLE_S there)."""

    def _cli(*args: str) -> subprocess.CompletedProcess[str]:
        return watched([sys.executable, "-m", "edgesmith.cli", *args],  # type: ignore[no-any-return]
                       env={**os.environ, "COLUMNS": "200"})

    return _cli


@pytest.fixture(scope="module")
def pi5(tmp_path_factory: pytest.TempPathFactory, cli) -> dict:  # type: ignore[no-untyped-def,type-arg]
    out = tmp_path_factory.mktemp("pi5")
    p = cli("compress", "builtin:smollm2-135m", "--target", "raspberry-pi-5", "-o", str(out),
            "--threads", "2")
    assert p.returncode == 0, p.stderr
    man = json.loads((out / "manifest.json").read_text())
    man["_out"] = str(out)
    return man


def test_pi5_recipe_outputs_a_checked_q4_k_m(pi5: dict) -> None:  # type: ignore[type-arg]
    art = pi5["artifacts"][0]
    assert art["path"] == "smollm2-135m.Q4_K_M.gguf" and art["imatrix"] is True
    assert pi5["gates"]["passed"]
    # hidden size 576 is not a multiple of 256: llama.cpp falls back, and the manifest says so
    fb = Counter((f["wanted"], f["got"]) for f in art["fallbacks"])
    assert fb[("q4_K", "q5_0")] > 0 and all(f["ncols"] % 256 for f in art["fallbacks"])
    types = {t["name"]: t["type"] for t in art["tensors"]}
    for f in art["fallbacks"]:
        assert types[f["tensor"]].lower() == f["got"]
    assert types["blk.0.ffn_down.weight"] in ("Q4_K", "Q6_K")  # 1536 columns: k-quants apply
    # the F16 baseline is the converter's fidelity check: it matches transformers
    assert pi5["baseline"]["quality"]["kld_mean"] < 1e-3
    q = art["quality"]
    assert 0 < q["kld_mean"] < 0.08 and q["top1_agreement"] > 0.85
    assert "smollm2-135m.Q4_K_M.gguf" in Path(pi5["_out"], "report.md").read_text()


def test_imatrix_beats_plain_q4_k_m_at_equal_size(pi5: dict, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def,type-arg]
    recipe = Path(pi5["recipe"]["source"]).read_text().replace("imatrix: true", "imatrix: false")
    (tmp_path / "plain.yaml").write_text(recipe.replace("raspberry-pi-5-q4km", "plain-q4km"))
    p = cli("compress", "builtin:smollm2-135m", "--recipe", str(tmp_path / "plain.yaml"),
            "-o", str(tmp_path / "plain"), "--threads", "2", "--json")
    assert p.returncode == 0, p.stderr
    plain = json.loads(p.stdout)["artifacts"][0]
    ours = pi5["artifacts"][0]
    assert ours["size_bytes"] <= plain["size_bytes"]
    assert ours["quality"]["kld_mean"] < plain["quality"]["kld_mean"]


def test_tokenizer_round_trip_matches_original_gguf(pi5: dict) -> None:  # type: ignore[type-arg]
    ours = LlamaCppRunner().open(Path(pi5["_out"]) / "smollm2-135m.Q4_K_M.gguf", n_ctx=256)
    original = LlamaCppRunner().open(models.builtin_path("smollm2-135m"), n_ctx=256)
    _, tok = load_hf(models.as_hf_dir(models.resolve("builtin:smollm2-135m")))
    hf_ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.tokenize(TEXT) == hf_ids == original.tokenize(TEXT)
    assert ours.detokenize(hf_ids) == TEXT == tok.decode(hf_ids)


def test_gguf_file_input_with_a_recipe_file(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    gguf = models.builtin_path("smollm2-135m")
    recipe = Path(__file__).parents[2] / "recipes" / "raspberry-pi-4-q8.yaml"
    p = cli("compress", str(gguf), "--recipe", str(recipe), "-o", str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr
    man = json.loads(p.stdout)
    art = man["artifacts"][0]
    assert art["type"] == "Q8_0" and man["target"] == "raspberry-pi-4"
    assert art["quality"]["kld_mean"] < 0.01
    assert man["input"]["kind"] == "gguf"


def test_export_f16_loads_and_generates(tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    p = cli("export", "builtin:smollm2-135m", "--format", "gguf", "--outtype", "f16", "-o",
            str(tmp_path), "--json")
    assert p.returncode == 0, p.stderr
    sess = LlamaCppRunner().open(Path(json.loads(p.stdout)["path"]), n_ctx=256)
    res = sess.generate(sess.tokenize("The capital of France is"), 8)
    assert len(res.generated_tokens) == 8 and res.decode_tps > 0
