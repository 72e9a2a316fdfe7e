"""Errors a user can cause. The CLI prints them on one line and exits with code 2."""

from __future__ import annotations

from typing import Any


class EdgesmithError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it."""

    exit_code = 2

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(f"{message} (fix: {hint})" if hint else message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return " ".join(f"error: {self}".split())


class ModelError(EdgesmithError):
    """The input model is missing, corrupt, unsafe or unsupported."""


class RecipeError(EdgesmithError):
    """A recipe is unknown or invalid."""


class TargetError(EdgesmithError):
    """A target device profile is unknown or invalid."""


class OutputError(EdgesmithError):
    """An output path exists, is not writable, or the disk is full."""


class DependencyError(EdgesmithError):
    """An optional dependency (an extra) is not installed."""


class QualityGateError(EdgesmithError):
    """An artifact missed a quality gate of its recipe (``manifest``: the one written)."""

    manifest: dict[str, Any] | None = None


class ResultsError(EdgesmithError):
    """A results or manifest file is corrupt or of an unknown schema version."""


class ToolError(EdgesmithError):
    """An external tool (llama.cpp converter, compiler) failed."""


def require(module: str, extra: str) -> object:
    """Import an optional heavy dependency lazily, or fail naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DependencyError(
            f"the optional dependency '{module}' is not installed ({exc})",
            f"pip install 'edgesmith[{extra}]'",
        ) from exc
