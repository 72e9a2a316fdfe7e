"""The sweep's plan (variants from options and recipes, fit, skips) and its CLI errors; no
runtime is run here except the fit estimate's header reads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgesmith.compress.gguf_quantize import GGUFQuantizeConfig
from edgesmith.errors import RecipeError
from edgesmith.sweep import local, plan


def settings(**kw: object) -> plan.Settings:
    return plan.Settings("raspberry-pi-4", **kw)  # type: ignore[arg-type]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "200", **(env or {})},
                          timeout=600)


def test_goal_parses_and_rejects_unknown_keys() -> None:
    assert plan.parse_goal("max_kld=0.03, max_ppl_increase_pct=6") == {
        "max_kld": 0.03, "max_ppl_increase_pct": 6.0}
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        plan.parse_goal("kld<0.03")
    with pytest.raises(RecipeError, match="needs a number"):
        plan.parse_goal("max_kld=low")


def test_options_expand_to_validated_recipes_sharing_torch_passes() -> None:
    vs = plan.from_options(["Q4_0", "Q4_K_M", "Q6_K"], ["imatrix", "gptq", "awq"],
                           settings(goal={"max_kld": 0.05}))
    names = [v.name for v in vs]
    assert names == ["Q4_0-imatrix", "Q4_K_M-imatrix", "Q6_K-imatrix", "gptq-Q4_0",
                     "gptq-Q4_K_M", "gptq-Q6_K", "awq-Q4_0", "awq-Q4_K_M", "awq-Q6_K"]
    by = {v.name: v for v in vs}
    assert "no GPTQ variant of Q6_K" in by["gptq-Q6_K"].skip
    # one GPTQ pass (4-bit) for both 4-bit types, one AWQ pass for all; none for imatrix-only
    assert by["gptq-Q4_0"].group == by["gptq-Q4_K_M"].group != ""
    assert by["awq-Q4_0"].group == by["awq-Q6_K"].group not in ("", by["gptq-Q4_0"].group)
    assert by["Q4_0-imatrix"].group == ""
    rec = by["gptq-Q4_K_M"].recipe()
    assert [s.name for s in rec.steps] == ["gptq", "gguf", "gguf_quantize"]
    assert rec.model.gates.max_kld == 0.05 and rec.steps[2].config.type == "Q4_K_M"
    with pytest.raises(RecipeError, match="unknown type Q9"):
        plan.from_options(["Q9"], ["imatrix"], settings())


def test_schedule_runs_shared_work_first() -> None:
    vs = plan.from_options(["Q4_0", "Q4_K_M"], ["plain", "imatrix", "awq"], settings())
    sched = local.schedule(vs)
    first, deps0 = sched[0]
    assert deps0 == [] and first.name == "Q4_0-imatrix"  # converts, reference, imatrix
    deps = {v.name: d for v, d in sched}
    assert deps["Q4_K_M-imatrix"] == ["Q4_0-imatrix"]
    assert deps["awq-Q4_0"] == ["Q4_0-imatrix"]  # the AWQ group's first
    assert deps["awq-Q4_K_M"] == sorted(["Q4_0-imatrix", "awq-Q4_0"])


def test_fit_estimates_and_skips_what_fits_no_target(tiny_llama: Path) -> None:
    ref = plan.plan_ref(str(tiny_llama))
    vs = plan.from_options(["Q4_0", "Q8_0"], ["plain"], settings())
    plan.estimate(vs, ref, ["raspberry-pi-4", "raspberry-pi-5"], 512)
    q4, q8 = vs
    assert not q4.skip and all(f.fits for f in q4.fits)
    assert q8.est_size_mb > 1.7 * q4.est_size_mb  # 8.5 vs 4.5 bits per weight
    plan.estimate(vs, ref, ["raspberry-pi-4"], 10_000_000)  # a KV cache no Pi holds
    assert q4.skip.startswith("fits no target at ctx 10000000: raspberry-pi-4 needs")
    table = plan.render(vs, ["raspberry-pi-4"], 10_000_000)
    assert "skip: fits no target" in table and "NO " in table


def test_tensor_types_do_not_change_cache_keys_of_recipes_without_them() -> None:
    assert GGUFQuantizeConfig(type="Q4_0").model_dump_json() == '{"type":"Q4_0","imatrix":false}'
    cfg = GGUFQuantizeConfig(type="Q4_0", tensor_types={"ffn_down": "Q8_0"})
    assert '"tensor_types":{"ffn_down":"Q8_0"}' in cfg.model_dump_json()
    with pytest.raises(ValueError, match="not a regular expression"):
        GGUFQuantizeConfig(tensor_types={"ffn_(": "Q8_0"})


def test_dry_run_prints_the_plan_and_runs_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    p = cli("sweep", str(tiny_llama), "--targets", "raspberry-pi-4,raspberry-pi-5",
            "--quants", "Q4_0,Q5_K_M", "--methods", "imatrix,gptq", "--ctx", "512",
            "--dry-run", "-o", str(tmp_path / "s"))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0].split()[:4] == ["variant", "method", "quant", "est."]
    rows = {ln.split()[0]: ln for ln in lines[2:]}
    assert set(rows) == {"Q4_0-imatrix", "Q5_K_M-imatrix", "gptq-Q4_0", "gptq-Q5_K_M"}
    assert "skip: GPTQ writes" in rows["gptq-Q5_K_M"] and rows["gptq-Q4_0"].endswith("yes")
    assert rows["Q4_0-imatrix"].count("fits") == 2
    assert not (tmp_path / "s").exists()


def test_ray_without_the_extra_is_one_line_naming_it(tiny_llama: Path, tmp_path: Path) -> None:
    fake = tmp_path / "noray" / "ray"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named ray')\n")
    env = {"PYTHONPATH": str(fake.parent)}
    p = cli("sweep", str(tiny_llama), "--targets", "raspberry-pi-4", "--ray", "auto",
            "-o", str(tmp_path / "s"), env=env)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "pip install 'edgesmith[ray]'" in errors[0]


def test_search_needs_a_goal(tiny_llama: Path, tmp_path: Path) -> None:
    p = cli("sweep", str(tiny_llama), "--targets", "raspberry-pi-4", "--search",
            "-o", str(tmp_path / "s"))
    assert p.returncode == 2 and "--search needs a --goal" in p.stderr
