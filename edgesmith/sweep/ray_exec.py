"""The Ray executor (``--ray ADDRESS``, extra ``edgesmith[ray]``): each variant a Ray task.

Tasks: the shared work first, as in the local executor (one variant that converts the F16
GGUF and computes the reference and the importance matrix, then one variant per group of
shared torch-side passes), then every other variant as soon as its group's first finished;
Ray places them by their resources: ``num_cpus`` = the variant's threads, ``memory`` = its
peak estimate, and ``num_gpus=1`` for a torch-side pass (gptq, awq) with ``--ray-gpu``.

Artifacts reach the driver's ``-o`` through a shared path: each task writes its variant's
result (artifact, manifest, bench JSON) straight into ``-o/<variant>/`` with the same atomic
publication as a local run, so ``-o`` (and, to share the F16/reference/imatrix between
nodes, ``EDGESMITH_CACHE``) must be the same path on every node (NFS or similar; on one
machine it is). Tasks return only their small result dict through the object store; the
driver logs each as it completes (``ray.wait``), and Ray forwards the tasks' own logs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgesmith.errors import require
from edgesmith.sweep import local
from edgesmith.sweep.plan import Variant


def _init(address: str, log: Any) -> Any:
    ray = require("ray", "ray")
    if not ray.is_initialized():  # a caller (a test) may have started one: ray.init(num_cpus=2)
        ray.init(address=None if address == "local" else address,
                 runtime_env={"env_vars": {"EDGESMITH_CACHE": os.environ.get(
                     "EDGESMITH_CACHE", str(Path.home() / ".cache" / "edgesmith"))}},
                 log_to_driver=True)
    res = ray.cluster_resources()
    log(f"sweep: Ray cluster with {res.get('CPU', 0):.0f} CPU(s), {res.get('GPU', 0):.0f} GPU(s)")
    return ray


def _task(spec: str, job: dict[str, Any]) -> dict[str, Any]:
    from edgesmith.sweep.worker import run_variant

    return run_variant(spec, **job)


def run(spec: str, plan: list[tuple[Variant, list[str]]], out_root: Path, address: str,
        threads: int | None, force: bool, bench: dict[str, Any] | None,
        on_result: local.OnResult, gpu: bool = False, log: Any = print) -> list[dict[str, Any]]:
    ray = _init(address, log)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    per_task = max(1, min(threads or max(1, cpus // max(1, min(len(plan), cpus))), cpus))
    mem = int(local.worker_memory_bytes(spec))
    remote = ray.remote(_task)
    log(f"sweep: {len(plan)} variant(s) as Ray tasks of {per_task} CPU(s) each")
    refs: dict[Any, str] = {}
    done: dict[str, dict[str, Any]] = {}
    pending = list(plan)
    out_root = Path(out_root).resolve()
    while pending or refs:
        for p in [p for p in pending if all(d in done for d in p[1])]:
            pending.remove(p)
            v = p[0]
            torch_side = any(s.kind == "torch" for s in v.recipe().steps)
            job = {"name": v.name, "recipe_text": v.recipe_text, "out_root": str(out_root),
                   "threads": per_task, "force": force, "bench": bench}
            opts = {"num_cpus": per_task, "memory": mem,
                    "num_gpus": 1 if gpu and torch_side else 0}
            refs[remote.options(**opts).remote(spec, job)] = v.name
        if not refs:
            raise RuntimeError("sweep: no Ray task can start")
        ready, _ = ray.wait(list(refs), num_returns=1)
        for r in ready:
            name = refs.pop(r)
            try:
                res = ray.get(r)
            except Exception as exc:  # a dead worker fails its variant only
                res = {"name": name, "status": "failed", "seconds": 0.0,
                       "error": f"error: the Ray task failed: {type(exc).__name__}: {exc}"}
            done[name] = res
            on_result(res)
    return [done[v.name] for v, _ in plan]
