"""merge_lora against peft itself: adapters made by peft on a tiny Llama, merged by the pass, give
the logits of peft's own merge_and_unload; the refusals (wrong base, pickle, unsupported kinds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from edgesmith.compress.merge_lora import MergeLoRAConfig, MergeLoRAPass, merge
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ModelError, RecipeError

peft = pytest.importorskip("peft")


def _base(seed: int = 0, **over: Any) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model("llama", **{
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256,
        "max_position_embeddings": 128, "tie_word_embeddings": False, **over})
    return AutoModelForCausalLM.from_config(cfg).eval()


def _adapter(tmp: Path, name: str = "adapter", base_seed: int = 0, **lora: Any) \
        -> tuple[Path, torch.Tensor]:
    """A peft LoRA on the tiny base with random (non-zero) factors, saved; and the logits of
    peft's merged model on fixed ids."""
    base = _base(base_seed)
    cfg = peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False,
                             "target_modules": ["q_proj", "v_proj", "down_proj"], **lora})
    pm = peft.get_peft_model(base, cfg)
    dest = tmp / name
    pm.save_pretrained(dest)
    merged = pm.merge_and_unload().eval()
    with torch.no_grad():
        return dest, merged(IDS).logits


IDS = torch.arange(0, 40).reshape(2, 20) % 256


def _ours(adapter: Path, **kw: Any) -> torch.Tensor:
    model = _base(0)
    merge(model, adapter, **kw)
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("lora", [
    {},
    {"use_rslora": True, "r": 8, "lora_alpha": 4},
    {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 32}},
    {"use_dora": True},
    {"target_modules": "all-linear"},
], ids=["lora", "rslora", "patterns", "dora", "all-linear"])
def test_merged_logits_equal_peft(tmp_path: Path, lora: dict[str, Any]) -> None:
    adapter, want = _adapter(tmp_path, **lora)
    plain = _base(0)
    with torch.no_grad():
        before = plain(IDS).logits
    got = _ours(adapter)
    assert (want - before).abs().max() > 1e-2  # the adapter changes the model measurably
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


def test_modules_to_save_replaces_the_module(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path, modules_to_save=["lm_head"])
    # peft copies lm_head untouched into the adapter: change it so the replacement shows
    from safetensors.torch import load_file, save_file

    st = load_file(str(adapter / "adapter_model.safetensors"))
    key = next(k for k in st if "lm_head" in k)
    st[key] = st[key] * 1.5
    save_file(st, str(adapter / "adapter_model.safetensors"))
    model = _base(0)
    rep = merge(model, adapter)
    assert rep["replaced_modules"] == ["lm_head.weight"]
    torch.testing.assert_close(model.lm_head.weight, st[key])


def test_pass_reports_and_records_the_adapter(tmp_path: Path) -> None:
    adapter, want = _adapter(tmp_path)
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path, progress=make_progress(quiet=True))
    model = MergeLoRAPass(MergeLoRAConfig(adapter=str(adapter))).run(_base(0), ctx)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, want, atol=2e-5, rtol=1e-4)
    rep = ctx.extras["pass_reports"][0]
    assert rep["pass"] == "merge_lora" and rep["scales"] == [2.0]
    assert sorted(rep["merged_modules"]) == sorted(
        f"model.layers.{i}.{n}" for i in (0, 1)
        for n in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    assert rep["settings"]["adapter_sha256"].startswith("adapter_config.json=")


def test_wrong_base_shapes_is_a_clear_error(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)
    other = _base(0, intermediate_size=96)
    before = other.model.layers[0].self_attn.q_proj.weight.clone()
    with pytest.raises(ModelError, match=r"does not fit model\.layers\.\d\.mlp\.down_proj"):
        merge(other, adapter)
    # checked before anything changed: the q_proj that would fit is untouched
    assert torch.equal(other.model.layers[0].self_attn.q_proj.weight, before)


def test_wrong_architecture_and_targets(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "down_proj", "c_attn"]
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="targets c_attn, which this model does not have"):
        merge(_base(0), adapter)


def test_recorded_base_dir_with_other_shapes(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)
    base_dir = tmp_path / "trained-on"
    _base(0, num_hidden_layers=3).config.save_pretrained(base_dir)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base_dir)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="num_hidden_layers is 3; this model's is 2"):
        merge(_base(0), adapter)


def test_pickle_adapter_refused_unless_allowed(tmp_path: Path) -> None:
    adapter, want = _adapter(tmp_path)
    from safetensors.torch import load_file

    st = load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(st, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="pickle file that can run code.*--allow-pickle"):
        merge(_base(0), adapter)
    torch.testing.assert_close(_ours(adapter, allow_pickle=True), want, atol=2e-5, rtol=1e-4)


def test_other_adapter_kinds_refused(tmp_path: Path) -> None:
    adapter, _ = _adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    with pytest.raises(ModelError, match="is a IA3 adapter"):
        merge(_base(0), adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "bias": "all"}))
    with pytest.raises(ModelError, match="trains biases"):
        merge(_base(0), adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError, match="has no adapter_model.safetensors"):
        merge(_base(0), adapter)


def test_recipe_step_needs_an_adapter_dir(tmp_path: Path) -> None:
    from edgesmith import recipe

    text = ("name: t\ntarget: raspberry-pi-5\nsteps:\n"
            f"  - merge_lora: {{adapter: {tmp_path / 'nope'}}}\n  - export: gguf\n")
    with pytest.raises(RecipeError, match=r"<recipe>:4: steps\.0\.merge_lora\.adapter.*no "
                                          r"adapter_config\.json"):
        recipe.parse(text)
    adapter, _ = _adapter(tmp_path)
    r = recipe.parse(text.replace(str(tmp_path / "nope"), str(adapter)))
    assert r.steps[0].name == "merge_lora" and r.steps[0].kind == "torch"
    # the adapter's bytes are in the step's cache key: a changed adapter is merged again
    key = r.steps[0].config.model_dump_json()
    shutil.copy(adapter / "adapter_config.json", tmp_path / "c.json")
    (adapter / "adapter_config.json").write_text(
        (tmp_path / "c.json").read_text().replace('"r": 4', '"r":  4'))
    assert r.steps[0].config.model_dump_json() != key


CLI_RECIPE = """name: tiny-f16
target: raspberry-pi-5
calibration: {samples: 2, seq_len: 128}
eval: {ctx: 128, windows: 2}
steps:
  - export: {format: gguf, outtype: f16}
gates:
  max_kld: 100
"""


def test_compress_adapter_shortcut(tiny_llama: Path, copy_model: Any, tmp_path: Path,
                                   watched: Any) -> None:
    """compress --adapter: a merge_lora step first; the F16 GGUF holds peft's merged weights,
    the manifest the step and its report; with both --adapter and a merge_lora step, an error."""
    import os
    import sys

    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM

    base_dir = copy_model(tiny_llama)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=16, init_lora_weights=False,
                                                   target_modules=["v_proj", "down_proj"]))
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    (tmp_path / "r.yaml").write_text(CLI_RECIPE)
    cmd = [sys.executable, "-m", "edgesmith.cli", "compress", str(base_dir), "--recipe",
           str(tmp_path / "r.yaml"), "--adapter", str(tmp_path / "adapter"), "--threads", "2"]
    env = {**os.environ, "COLUMNS": "200"}
    p = watched([*cmd, "-o", str(tmp_path / "out")], env=env)
    assert p.returncode == 0, p.stderr
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["recipe"]["as_run"]["steps"][0] == {
        "merge_lora": {"adapter": str(tmp_path / "adapter"), "allow_pickle": False}}
    assert [r["pass"] for r in man["passes"]] == ["merge_lora"]
    assert len(man["passes"][0]["merged_modules"]) == 4
    reader = gguf.GGUFReader(str(tmp_path / "out" / man["artifacts"][0]["path"]))
    got = np.asarray(next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight").data)
    want = merged.model.layers[1].mlp.down_proj.weight.detach().numpy()
    assert np.abs(got.astype(np.float32) - want).max() < 2e-3
    assert np.abs(base_dir_weight(base_dir) - want).max() > 1e-2  # the merge changed it
    # the reference is the input model, so the merged artifact differs from it
    assert man["artifacts"][0]["quality"]["kld_mean"] > 1e-4
    (tmp_path / "r2.yaml").write_text(CLI_RECIPE.replace(
        "steps:\n", f"steps:\n  - merge_lora: {{adapter: {tmp_path / 'adapter'}}}\n"))
    p = watched([*cmd[:6], str(tmp_path / "r2.yaml"), *cmd[7:], "-o", str(tmp_path / "o2")],
                env=env)
    assert p.returncode == 2 and "already merges an adapter" in p.stderr


def base_dir_weight(base_dir: Path) -> Any:
    from safetensors.numpy import load_file

    return load_file(str(base_dir / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
