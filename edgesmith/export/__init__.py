"""Exporters, registered by name: a recipe step ``export: NAME`` looks them up here."""

from __future__ import annotations

from typing import Any

from edgesmith.export.gguf import GGUFExporter

EXPORTERS: dict[str, Any] = {
    "gguf": GGUFExporter,
}
