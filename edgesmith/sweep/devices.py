"""``--device NAME=URL``: bench variants on real devices through the device server's bench
endpoint (``bench --remote``: edgesmith/bench/remote.py), uploading nothing.

A device server serves one model, so the sweep benches, on each device, the variant the
server serves now (the bench reply carries the served file's sha256, matched against every
variant's), and lists for each other variant the copy step that puts it there::

    scp sweep/<variant>/<file>.gguf pi.local:models/ && ssh pi.local \
        'edgesmith serve models/<file>.gguf --api-key-file key'

Re-running the same sweep then benches the newly served variant (the ones benched before
are kept in ``bench/<variant>.<NAME>.json``). A NAME that is a target's name makes its
measured decode speed decide that target's recommendation.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from edgesmith.bench import results
from edgesmith.errors import EdgesmithError
from edgesmith.sweep.worker import bench_path, with_quality


def _row(variant: str, device: str, r: Any, file: str) -> dict[str, Any]:
    return {"variant": variant, "device": device, "decode_tps": r.metrics.decode_tps.median,
            "file": file, "status": "measured"}


def bench_all(out_dir: Path, sweep_results: list[dict[str, Any]], devices: dict[str, str],
              api_key_file: Path | None, cfg: dict[str, Any], log: Any) -> list[dict[str, Any]]:
    from edgesmith.bench.remote import ENDPOINT, _post
    from edgesmith.device_server.cli import read_api_key

    key = read_api_key(api_key_file) if api_key_file else ""
    built = [r for r in sweep_results if r["status"] in ("ok", "gates-failed")]
    by_sha = {r["sha256"]: r for r in built}
    rows: list[dict[str, Any]] = []
    for name, url in devices.items():
        served = None
        try:
            reply = results.parse(_post(url.rstrip("/") + ENDPOINT, {**cfg, "device": name},
                                        key, 3600.0), f"the reply of {url}")
            served = by_sha.get(reply.artifact.sha256)
            if served is None:
                log(f"sweep: {name} serves {reply.artifact.name} (sha256 "
                    f"{reply.artifact.sha256[:12]}), none of this sweep's variants")
            else:  # served: the same file as the local copy (bench --remote's sha256 check)
                r = reply.model_copy(update={"source": url,
                                             "command": ["edgesmith", "sweep", *sys.argv[1:]]})
                dest = bench_path(out_dir, served["name"], name)
                dest.parent.mkdir(parents=True, exist_ok=True)
                results.write(with_quality(r, served), dest, force=True)
                log(f"sweep: {name}: {served['name']} {r.metrics.decode_tps.median:.1f} tok/s")
        except EdgesmithError as exc:
            log(f"sweep: {name} ({url}): {exc.one_line()}")
        for v in built:
            dest = bench_path(out_dir, v["name"], name)
            if dest.exists():
                old = results.read(dest)
                if old.artifact.sha256 == v["sha256"]:
                    rows.append(_row(v["name"], name, old, str(dest.relative_to(out_dir))))
                    continue
            host = url.split("//", 1)[1].split(":", 1)[0].split("/", 1)[0]
            fname = Path(v["artifact"]).name
            rows.append({"variant": v["name"], "device": name, "decode_tps": None,
                         "status": "not served",
                         "copy_step": f"scp {out_dir / v['artifact']} {host}:models/{fname} && "
                                      f"ssh {host} 'edgesmith serve models/{fname} "
                                      "--api-key-file key', then re-run this sweep"})
    return rows
