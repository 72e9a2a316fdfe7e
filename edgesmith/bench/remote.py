"""Client for ``bench --remote URL``: run the harness on a device server, get its results.

The server (edgesmith/device_server/bench_api.py) runs the same ``speed.measure`` on the model
it serves and answers with a results document; this client validates it with the same schema
reader as files, and checks that the server serves the artifact the user named.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edgesmith.bench import results
from edgesmith.bench.results import BenchResult
from edgesmith.errors import EdgesmithError, ModelError, ResultsError
from edgesmith.fsutil import sha256_file

ENDPOINT = "/v1/edgesmith/bench"


def _post(url: str, body: dict[str, Any], api_key: str, timeout_s: float) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", errors="replace")[:300]
        hints = {401: "check --api-key-file against the server's key",
                 404: "start the server with an API key; the endpoint is off without one",
                 409: "wait for the running benchmark to finish"}
        raise EdgesmithError(f"device server {url} answered HTTP {exc.code}: {detail}",
                             hints.get(exc.code, "see the server's log")) from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise EdgesmithError(f"cannot reach the device server {url}: {reason}",
                             "check the URL and that `edgesmith serve` runs there") from exc
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"device server {url} sent invalid JSON ({exc})",
                           "check that the URL is an edgesmith device server") from exc


def bench_remote(url: str, api_key: str, artifact: Path, *, prompt_tokens: int,
                 gen_tokens: int, repeat: int, warmup: int, threads: int | None,
                 device: str | None, command: list[str], timeout_s: float = 3600.0) \
        -> BenchResult:
    """Benchmark the device server's model; ``artifact`` must be the file it serves."""
    artifact = Path(artifact)
    if not artifact.is_file():
        raise ModelError(f"artifact {artifact} does not exist",
                         "pass the local copy of the .gguf the device server serves")
    endpoint = url.rstrip("/") + ENDPOINT
    body = {"prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "repeat": repeat,
            "warmup": warmup, "threads": threads, "device": device}
    result = results.parse(_post(endpoint, body, api_key, timeout_s), f"the reply of {endpoint}")
    local_sha = sha256_file(artifact)
    if result.artifact.sha256 != local_sha:
        raise ModelError(
            f"the device server serves {result.artifact.name} (sha256 "
            f"{result.artifact.sha256[:12]}), not {artifact} (sha256 {local_sha[:12]})",
            "restart the server with this artifact, or pass the file it serves")
    return result.model_copy(update={"command": command, "source": url})
