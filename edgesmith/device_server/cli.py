"""`edgesmith serve` (registered into the main CLI by ``register``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the `serve` command to ``app``."""
