"""Recipes: YAML validated by pydantic, with errors that name the file, line and allowed values.

A recipe chains torch-side passes, one exporter per format, and format-side passes; then
quality gates. Each step is a one-key mapping, ``{name: config}``, where ``name`` is a
registered pass or ``export`` (whose config is a format name or ``{format: ..., ...}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.compress import PASSES
from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.errors import RecipeError
from edgesmith.export import EXPORTERS
from edgesmith.targets import profile


class Gates(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_ppl_increase_pct: float | None = Field(None, ge=0)
    max_kld: float | None = Field(None, ge=0)
    min_top1: float | None = Field(None, ge=0, le=1)
    max_size_mb: float | None = Field(None, gt=0)


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    ctx: int = Field(512, ge=32, le=8192)
    windows: int = Field(8, ge=1, le=256)


class RecipeModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    target: str
    description: str = ""
    calibration: CalibrationConfig = CalibrationConfig()
    eval: EvalConfig = EvalConfig()
    steps: list[dict[str, Any]] = Field(min_length=1)
    gates: Gates = Gates()


@dataclass
class Step:
    kind: str  # "torch" | "export" | "format"
    name: str  # pass name, or the exporter's format
    config: Any  # the pass's or exporter's pydantic Config instance


@dataclass
class Recipe:
    model: RecipeModel
    steps: list[Step]
    source: Path | None
    text: str

    @property
    def name(self) -> str:
        return self.model.name


def _recipes_dir() -> Path:
    return Path(str(resources.files("edgesmith") / "recipes"))


def names() -> list[str]:
    return sorted(p.stem for p in _recipes_dir().glob("*.yaml"))


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """1-based line of the YAML node at pydantic location ``loc`` (deepest one found)."""
    line = node.start_mark.line + 1 if node is not None else None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == str(key)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) \
                and key < len(node.value):
            node = node.value[key]
        else:
            break
        if node is None:
            break
        line = node.start_mark.line + 1
    return line


def _allowed(msg: str, loc: tuple[Any, ...]) -> str:
    field = loc[-1] if loc else None
    if field == "target":
        return f"allowed targets: {', '.join(profile.names())}"
    return ""


def _fail(where: str, line: int | None, msg: str, hint: str) -> RecipeError:
    at = f"{where}:{line}" if line else where
    return RecipeError(f"{at}: {msg}", hint)


def parse(text: str, where: str = "<recipe>", source: Path | None = None) -> Recipe:
    """Validate recipe text. Every error names ``where``, the line and what is allowed."""
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise _fail(where, mark.line + 1 if mark else None, f"invalid YAML: {exc}",
                    "fix the YAML syntax") from exc
    if not isinstance(data, dict):
        raise _fail(where, 1, "a recipe must be a mapping with name, target and steps",
                    "see recipes/raspberry-pi-5-q4km.yaml for an example")
    try:
        model = RecipeModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        hint = _allowed(err["msg"], loc) or "allowed keys: " + ", ".join(_keys_at(loc))
        raise _fail(where, _line_of(node, loc), f"{dotted}: {err['msg']}", hint) from exc
    if model.target not in profile.names():
        raise _fail(where, _line_of(node, ("target",)), f"unknown target '{model.target}'",
                    f"allowed targets: {', '.join(profile.names())}")
    target = profile.load(model.target)
    steps = [_parse_step(i, raw, node, where, target) for i, raw in enumerate(model.steps)]
    _check_order(steps, node, where)
    return Recipe(model, steps, source, text)


def _keys_at(loc: tuple[Any, ...]) -> list[str]:
    cls: Any = RecipeModel
    for part in loc[:-1]:
        field = getattr(cls, "model_fields", {}).get(part)
        if field is None:
            break
        ann = field.annotation
        cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else cls
    return list(getattr(cls, "model_fields", RecipeModel.model_fields))


def _parse_step(i: int, raw: dict[str, Any], node: yaml.Node, where: str,
                target: profile.Target) -> Step:
    line = _line_of(node, ("steps", i))
    allowed = ", ".join(["export", *PASSES])
    if len(raw) != 1:
        raise _fail(where, line, f"steps.{i}: a step is a one-key mapping like '- export: gguf'",
                    f"allowed steps: {allowed}")
    (name, cfg), = raw.items()
    if name == "export":
        cfg = {"format": cfg} if isinstance(cfg, str) else dict(cfg or {})
        fmt = cfg.pop("format", None)
        if fmt not in EXPORTERS:
            raise _fail(where, line, f"steps.{i}: unknown export format {fmt!r}",
                        f"allowed formats: {', '.join(EXPORTERS)}")
        if fmt not in target.formats:
            raise _fail(where, line, f"steps.{i}: target {target.name} cannot run {fmt}",
                        f"formats {target.name} runs: {', '.join(target.formats)}")
        cls, kind = EXPORTERS[fmt].Config, "export"
    elif name in PASSES:
        cls, kind, fmt = PASSES[name].Config, PASSES[name].kind, name
    else:
        raise _fail(where, line, f"steps.{i}: unknown step '{name}'", f"allowed steps: {allowed}")
    try:
        config = cls.model_validate(cfg or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ("steps", i, name, *err["loc"])
        fields = ", ".join(cls.model_fields)
        raise _fail(where, _line_of(node, loc),
                    f"steps.{i}.{name}.{'.'.join(map(str, err['loc']))}: {err['msg']}",
                    f"allowed keys for {name}: {fields}") from exc
    return Step(kind, fmt, config)


def _check_order(steps: list[Step], node: yaml.Node, where: str) -> None:
    exported: str | None = None
    for i, step in enumerate(steps):
        if step.kind == "export":
            if exported:
                raise _fail(where, _line_of(node, ("steps", i)),
                            f"steps.{i}: a second export step ({step.name} after {exported})",
                            "one recipe exports one format: write one recipe per format")
            exported = step.name
        elif step.kind == "format" and not exported:
            raise _fail(where, _line_of(node, ("steps", i)),
                        f"steps.{i}: {step.name} works on an exported file but comes before "
                        "any export step", "put '- export: gguf' before it")
        elif step.kind == "format" and exported not in PASSES[step.name].formats:
            raise _fail(where, _line_of(node, ("steps", i)),
                        f"steps.{i}: {step.name} works on {', '.join(PASSES[step.name].formats)}"
                        f" files, but this recipe exports {exported}",
                        "use the format's own pass (gguf_quantize for gguf, onnx_quantize for "
                        "onnx)")
        elif step.kind == "torch" and exported:
            raise _fail(where, _line_of(node, ("steps", i)),
                        f"steps.{i}: torch-side pass {step.name} comes after an export",
                        "move it before the export step")
    if not exported:
        raise _fail(where, _line_of(node, ("steps",)), "the recipe exports nothing",
                    "add a step like '- export: gguf'")


def load(name_or_path: str) -> Recipe:
    """A shipped recipe by name, or a recipe file by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = _recipes_dir() / f"{name_or_path}.yaml"
        if not path.exists():
            raise RecipeError(f"unknown recipe '{name_or_path}'",
                              f"use one of: {', '.join(names())}, or a path to a .yaml file")
    if not path.exists():
        raise RecipeError(f"recipe file {path} does not exist",
                          f"use one of: {', '.join(names())}, or a path to a .yaml file")
    return parse(path.read_text(encoding="utf-8"), str(path), path)


def for_target(target_name: str) -> Recipe:
    target = profile.load(target_name)
    if not target.default_recipe:
        raise RecipeError(f"target {target_name} has no default recipe yet",
                          "pass --recipe FILE with a recipe for it")
    return load(target.default_recipe)
