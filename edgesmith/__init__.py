"""edgesmith: turn a language model into quality-checked artifacts for edge devices."""

from __future__ import annotations

__version__ = "0.1.0"
