"""The local executor: variants in parallel worker processes, as many as cores and memory
allow, shared work first.

Order: the first variant runs alone (it converts the F16 GGUF, computes the reference
log-probabilities and the importance matrix into the cache), then the first variant of each
group of shared torch-side passes (an AWQ or GPTQ pass used by several variants), then all
the others, each as soon as its group's first variant finished. Every variant after the first
finds the shared work in the cache (``timings_s`` of its manifest shows it).

Threads: ``workers x threads <= cores``: llama.cpp (and torch) in every worker use
``threads`` threads, so the machine is never oversubscribed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from edgesmith.sweep.plan import Variant

Job = dict[str, Any]
OnResult = Callable[[dict[str, Any]], None]


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def worker_memory_bytes(spec: str) -> float:
    """Peak memory of one variant: the fp32 model in torch (reference, imatrix, passes) and
    its F16 GGUF in llama.cpp, with headroom; at least 1 GB."""
    from edgesmith import models

    ref = models.resolve(spec)
    files = [ref.path] if ref.path.is_file() else list(ref.path.glob("*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files)
    bpw = 16 if ref.kind == "hf" else 4.5  # a GGUF input is dequantized to fp32
    fp32 = on_disk * 32 / bpw
    return max(1e9, 3.0 * fp32)


@dataclass
class Budget:
    workers: int
    threads: int

    def line(self) -> str:
        return f"{self.workers} worker(s) x {self.threads} thread(s)"


def budget(n_jobs: int, spec: str, jobs: int | None = None,
           threads: int | None = None) -> Budget:
    """Workers and threads per worker: workers x threads <= cores, workers x peak memory
    <= available memory."""
    n = cores()
    by_mem = int(psutil.virtual_memory().available // worker_memory_bytes(spec))
    w = max(1, min(jobs or n, n, by_mem, max(1, n_jobs)))
    if threads:
        threads = min(threads, n)
        w = max(1, min(w, n // threads))
    return Budget(w, threads or max(1, n // w))


def schedule(variants: list[Variant]) -> list[tuple[Variant, list[str]]]:
    """Each variant to run with the names it waits for (the shared work's variants)."""
    todo = [v for v in variants if not v.skip]
    if not todo:
        return []
    # the first: a variant without torch-side passes that uses the imatrix, where there is one
    first = next((v for v in todo if not v.group and v.method != "plain"), todo[0])
    leaders = {first.group: first.name}
    for v in todo:
        leaders.setdefault(v.group, v.name)
    out = [(first, [])]
    for v in todo:
        if v is first:
            continue
        lead = leaders[v.group]
        deps = [first.name] if lead == v.name else sorted({first.name, lead})
        out.append((v, deps))
    return out


def run(spec: str, plan: list[tuple[Variant, list[str]]], out_root: Path, b: Budget,
        force: bool, bench: dict[str, Any] | None, on_result: OnResult) -> list[dict[str, Any]]:
    """Run the plan in worker processes; returns every variant's result dict."""
    logs = out_root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict[str, Any]] = {}
    pending = list(plan)
    lock = threading.Lock()

    def one(v: Variant) -> dict[str, Any]:
        job = {"spec": spec, "name": v.name, "recipe_text": v.recipe_text,
               "out_root": str(out_root), "threads": b.threads, "force": force,
               "bench": bench}
        res = run_job(job, logs / f"{v.name}.log")
        with lock:
            on_result(res)
        return res

    with ThreadPoolExecutor(max_workers=b.workers) as pool:
        running: dict[Future[dict[str, Any]], str] = {}
        while pending or running:
            ready = [p for p in pending if all(d in done for d in p[1])]
            for p in ready[: b.workers - len(running)]:
                pending.remove(p)
                running[pool.submit(one, p[0])] = p[0].name
            if not running:  # unreachable unless a dependency is not in the plan
                raise RuntimeError(f"sweep: no variant can start ({[p[0].name for p in pending]})")
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for f in finished:
                name = running.pop(f)
                done[name] = f.result()
    return [done[v.name] for v, _ in plan]


def run_job(job: Job, log: Path) -> dict[str, Any]:
    """One variant in its own process (``edgesmith.sweep.worker``), its stderr in ``log``."""
    with tempfile.TemporaryDirectory(prefix="edgesmith-sweep-") as tmp:
        jf, rf = Path(tmp) / "job.json", Path(tmp) / "result.json"
        jf.write_text(json.dumps(job))
        with open(log, "ab") as lf:
            p = subprocess.run([sys.executable, "-m", "edgesmith.sweep.worker", str(jf),
                                str(rf)], stdout=lf, stderr=lf, check=False)
        if rf.exists():
            return json.loads(rf.read_text())
    return {"name": job["name"], "status": "failed", "seconds": 0.0,
            "error": f"error: the worker process exited with code {p.returncode} "
                     f"(killed or crashed; see {log})"}
