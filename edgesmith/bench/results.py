"""The bench results file (schema ``edgesmith.bench``, versioned): one file per run.

A reader accepts exactly the schema versions it knows and rejects anything else with a clear
error, so a report never silently mixes figures measured in different ways. Bump
``SCHEMA_VERSION`` whenever a field changes meaning or a required field is added, and
document the change in the README ("Results schema").
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgesmith.errors import ResultsError
from edgesmith.fsutil import write_json_atomic

SCHEMA = "edgesmith.bench"
SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stat(_Model):
    """One metric over the measured repeats (warm-up excluded)."""

    median: float
    min: float
    max: float
    spread: float = Field(description="max / min; 1.0 means perfectly repeatable")
    samples: list[float]

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        if not samples:
            raise ValueError("a Stat needs at least one sample")
        lo, hi = min(samples), max(samples)
        return cls(median=statistics.median(samples), min=lo, max=hi,
                   spread=hi / lo if lo > 0 else float("inf"), samples=list(samples))


class Environment(_Model):
    hostname: str
    os: str
    arch: str
    cpu_model: str
    cores_physical: int
    cores_logical: int
    threads: int = Field(description="threads the runtime used")
    ram_total_gb: float
    mem_bandwidth_gbs: float = Field(description="measured copy bandwidth (read + write bytes)")
    versions: dict[str, str]


class ArtifactInfo(_Model):
    name: str
    path: str
    format: str
    size_bytes: int
    sha256: str
    quant: str = Field(description="the file's dominant weight type, e.g. Q4_K_M or Q4_1")
    n_params: int
    weight_bytes_per_token: int = Field(
        description="bytes of weights read to decode one token (a lookup table row excluded)")


class Settings(_Model):
    runtime: str
    threads: int
    prompt_tokens: int
    gen_tokens: int
    repeat: int
    warmup: int
    n_ctx: int
    reload_each_repeat: bool = Field(description="whether each repeat loaded the model anew")


class Metrics(_Model):
    load_s: Stat
    ttft_s: Stat
    prefill_tps: Stat
    decode_tps: Stat
    peak_rss_mb: Stat


class Roofline(_Model):
    mem_bandwidth_gbs: float
    weight_bytes_per_token: int
    bound_decode_tps: float = Field(description="bandwidth / weight bytes per token")
    fraction: float = Field(description="median decode tokens/s / bound")


class Quality(_Model):
    reference: str
    tokens_scored: int
    ppl: float
    ppl_ref: float
    ppl_increase_pct: float
    kld_mean: float
    kld_p99: float
    top1_agreement: float


class BenchResult(_Model):
    schema_: Literal["edgesmith.bench"] = Field(SCHEMA, alias="schema")
    schema_version: int = SCHEMA_VERSION
    created: str
    command: list[str]
    device: str = Field(description="label of the machine that ran it (default: its hostname)")
    source: str = Field(description="'local', or the device server URL for --remote")
    environment: Environment
    artifact: ArtifactInfo
    settings: Settings
    metrics: Metrics
    roofline: Roofline
    quality: Quality | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def parse(data: Any, origin: str) -> BenchResult:
    """Validate decoded JSON as a results file; ``origin`` names it in errors."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultsError(f"{origin} is not an edgesmith bench results file",
                           "pass files written by `edgesmith bench -o`")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ResultsError(
            f"{origin} has results schema version {version!r}; this edgesmith reads version "
            f"{SCHEMA_VERSION}", "re-run the bench or use the edgesmith version that wrote it")
    try:
        return BenchResult.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ResultsError(f"{origin} is corrupt: {where}: {first['msg']} "
                           f"({exc.error_count()} problem(s))",
                           "re-run the bench that wrote it") from exc


def read(path: Path) -> BenchResult:
    """Read one results file; reject a missing, corrupt or unknown-version file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ResultsError(f"results file {path} does not exist", "check the path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ResultsError(f"cannot read results file {path}: {exc}", "check the file") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"results file {path} is not valid JSON ({exc})",
                           "re-run the bench that wrote it") from exc
    return parse(data, str(path))


def write(result: BenchResult, path: Path, force: bool = False) -> None:
    """Write atomically: the destination holds the old file or the complete new one."""
    write_json_atomic(Path(path), result.to_json(), force=force)
