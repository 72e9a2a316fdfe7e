"""Recipe validation: shipped recipes are valid; bad ones name file, line and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesmith import recipe
from edgesmith.errors import RecipeError

GOOD = """name: t
target: raspberry-pi-5
steps:
  - export: gguf
  - gguf_quantize: {type: Q4_K_M, imatrix: true}
gates: {max_kld: 0.1}
"""


@pytest.mark.parametrize("name", recipe.names())
def test_shipped_recipes_validate(name: str) -> None:
    from edgesmith.targets import profile

    r = recipe.load(name)
    export = next(s for s in r.steps if s.kind == "export")
    assert export.name in profile.load(r.model.target).formats
    kinds = [s.kind for s in r.steps]
    assert kinds[-2:] == ["export", "format"] and set(kinds[:-2]) <= {"torch"}
    assert r.model.gates.max_kld is not None


def test_shipped_recipe_variants() -> None:
    gguf = [n for n in recipe.names() if recipe.load(n).steps[-1].name == "gguf_quantize"]
    types = {recipe.load(n).steps[-1].config.type for n in gguf}
    assert types == {"Q4_K_M", "Q5_K_M", "Q8_0", "Q4_0"}
    for t in ("raspberry-pi-4", "raspberry-pi-5", "webgpu-browser"):
        assert recipe.for_target(t).model.target == t
    assert recipe.for_target("webgpu-browser").steps[-1].name == "onnx_quantize"


def test_a_format_pass_must_match_the_export_format() -> None:
    from edgesmith.errors import RecipeError

    text = ("name: x\ntarget: webgpu-browser\nsteps:\n  - export: {format: onnx}\n"
            "  - gguf_quantize: {type: Q4_K_M}\ngates: {max_kld: 0.1}\n")
    with pytest.raises(RecipeError, match="gguf_quantize works on gguf files, but this recipe "
                                          "exports onnx"):
        recipe.parse(text, "x.yaml")
    two = text.replace("  - gguf_quantize: {type: Q4_K_M}\n", "  - export: {format: onnx}\n")
    with pytest.raises(RecipeError, match="a second export step"):
        recipe.parse(two, "x.yaml")


def test_good_recipe_parses() -> None:
    r = recipe.parse(GOOD, "x.yaml")
    assert r.steps[0].name == "gguf" and r.steps[0].config.outtype == "f16"
    assert r.steps[1].config.imatrix is True


@pytest.mark.parametrize(
    ("text", "line", "message", "allowed"),
    [
        (GOOD.replace("Q4_K_M", "Q4_K_X"), 5, "steps.1.gguf_quantize.type", "Q4_K_M"),
        (GOOD.replace("raspberry-pi-5", "pi-9"), 2, "unknown target 'pi-9'", "raspberry-pi-4"),
        (GOOD + "colour: red\n", 7, "colour: Extra inputs", "allowed keys: name, target"),
        (GOOD.replace("export: gguf", "export: tflite"), 4, "unknown export format", "gguf"),
        (GOOD.replace("export: gguf", "export: onnx"), 4, "cannot run onnx", "gguf"),
        (GOOD.replace("max_kld: 0.1", "max_kld: -1"), 6, "gates.max_kld", "max_kld"),
        (GOOD.replace("gguf_quantize", "awq_magic"), 5, "unknown step 'awq_magic'",
         "gguf_quantize"),
        (GOOD.replace("imatrix: true", "imatrix: true, bits: 3"), 5, "bits", "type, imatrix"),
        ("name: t\ntarget: raspberry-pi-5\nsteps:\n  - gguf_quantize: {}\n  - export: gguf\n", 4,
         "comes before any export", "export: gguf"),
        ("name: t\ntarget: raspberry-pi-5\nsteps: [\n", None, "invalid YAML", "syntax"),
    ],
)
def test_bad_recipes_name_line_and_allowed(text: str, line: int | None, message: str,
                                           allowed: str) -> None:
    with pytest.raises(RecipeError) as exc:
        recipe.parse(text, "bad.yaml")
    one = exc.value.one_line()
    assert message in one and allowed in one
    if line is not None:
        assert f"bad.yaml:{line}:" in one


def test_format_the_target_cannot_run(tmp_path: Path) -> None:
    # raspberry-pi-5 runs gguf only; the recipe check is per target, not global
    text = GOOD.replace("raspberry-pi-5", "webgpu-browser")
    with pytest.raises(RecipeError, match="cannot run gguf"):
        recipe.parse(text, "w.yaml")


def test_unknown_recipe_name_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="unknown recipe 'nope'"):
        recipe.load("nope")
    with pytest.raises(RecipeError, match="does not exist"):
        recipe.load(str(tmp_path / "r.yaml"))
