"""What every format-side pass shares: its config, the artifact type it makes, its cache name and
where it writes when the pipeline gives no destination."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from edgesmith.context import Artifact, RunContext


class FormatPass:
    """Format-side Pass plug point: ``run(artifact, ctx) -> Artifact``.

    A subclass sets ``name``, ``Config``, ``formats`` and ``type_field`` (the config field that
    names the artifact type: ``type``, ``dtype``, ``recipe``, ``mode``) and implements ``run``.
    """

    name: ClassVar[str]
    Config: ClassVar[Any]
    kind: ClassVar[str] = "format"
    formats: ClassVar[tuple[str, ...]]
    type_field: ClassVar[str]

    def __init__(self, config: Any = None) -> None:
        self.config = config or self.Config()

    def artifact_type(self) -> str:
        return str(getattr(self.config, self.type_field))

    def cache_name(self, key: str) -> str:
        return f"{self.formats[0]}-{self.artifact_type()}.{key}"

    def dest(self, artifact: Artifact, ctx: RunContext, default_name: str | None = None) -> Path:
        """``ctx.extras["dest"]``, else ``default_name`` (or NAME-TYPE) beside the input."""
        name = default_name or f"{artifact.path.name}-{self.artifact_type()}"
        return Path(ctx.extras.get("dest") or artifact.path.with_name(name))

    def run(self, artifact: Artifact, ctx: RunContext) -> Artifact:  # pragma: no cover
        raise NotImplementedError
