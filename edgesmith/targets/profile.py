"""Target device profiles: data (targets/*.yaml) validated by a pydantic schema."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.errors import TargetError


class CPU(BaseModel):
    model_config = ConfigDict(extra="forbid")
    arch: str
    model: str
    cores: int = Field(ge=1)
    isa: list[str] = []


class Browser(BaseModel):
    """What a browser's runtime can hold (onnxruntime-web on WebGPU)."""

    model_config = ConfigDict(extra="forbid")
    # one WebGPU buffer (GPUDevice.limits.maxBufferSize; Chrome's default is 2 GiB - 4 bytes,
    # many integrated GPUs report 1-2 GiB)
    max_buffer_bytes: int = Field(gt=0)
    # one ArrayBuffer (a single external-data file is fetched into one): 2 GB in Chromium
    max_array_buffer_bytes: int = Field(gt=0)
    shader_f16: bool = False


class Target(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str
    ram_gb: float = Field(gt=0)
    os_reserved_gb: float = Field(ge=0)
    storage_gb: float = Field(gt=0)
    cpu: CPU
    memory_bandwidth_gbs: float = Field(gt=0)
    runtimes: list[str]
    formats: list[str]
    default_recipe: str | None = None
    browser: Browser | None = None

    @property
    def usable_ram_bytes(self) -> float:
        return (self.ram_gb - self.os_reserved_gb) * 1e9


def _targets_dir() -> Path:
    return Path(str(resources.files("edgesmith") / "targets"))


def names() -> list[str]:
    return sorted(p.stem for p in _targets_dir().glob("*.yaml"))


def load(name: str) -> Target:
    path = _targets_dir() / f"{name}.yaml"
    if not path.exists():
        raise TargetError(f"unknown target '{name}'", f"use one of: {', '.join(names())}")
    try:
        return Target.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (ValidationError, yaml.YAMLError) as exc:
        raise TargetError(f"invalid target profile {path}: {exc}", "fix the YAML") from exc


def all_targets() -> list[Target]:
    return [load(n) for n in names()]
