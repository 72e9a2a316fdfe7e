"""The machine a benchmark ran on: CPU, cores, RAM, OS, versions and measured memory bandwidth.

Bandwidth is measured, not looked up: ``threads`` workers each copy their share of a few
hundred MB (numpy releases the GIL while copying), best of several rounds, counting the bytes
read and written as STREAM's "copy" does. It is the denominator of the roofline bound.
"""

from __future__ import annotations

import itertools
import platform
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

from edgesmith.bench.results import Environment
from edgesmith.manifest import tool_versions


def cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo; elsewhere what platform knows)."""
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.exists() else []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or platform.machine()


def memory_bandwidth_gbs(threads: int, total_mb: int = 256, rounds: int = 5) -> float:
    """Best-of-``rounds`` copy bandwidth in GB/s over ``threads`` workers."""
    n = total_mb * (1 << 20) // 8
    src = np.ones(n, dtype=np.float64)
    dst = np.empty_like(src)
    bounds = np.linspace(0, n, threads + 1, dtype=np.int64)
    chunks = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]

    def copy(span: tuple[int, int]) -> None:
        np.copyto(dst[span[0] : span[1]], src[span[0] : span[1]])

    best = float("inf")
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(copy, chunks))  # fault the pages in before timing
        for _ in range(rounds):
            t0 = time.perf_counter()
            list(pool.map(copy, chunks))
            best = min(best, time.perf_counter() - t0)
    return 2 * src.nbytes / best / 1e9


def environment(threads: int, bandwidth_gbs: float | None = None) -> Environment:
    """Describe this machine; measures bandwidth unless ``bandwidth_gbs`` is given."""
    uname = platform.uname()
    return Environment(
        hostname=socket.gethostname(),
        os=f"{uname.system} {uname.release}",
        arch=uname.machine,
        cpu_model=cpu_model(),
        cores_physical=psutil.cpu_count(logical=False) or 1,
        cores_logical=psutil.cpu_count(logical=True) or 1,
        threads=threads,
        ram_total_gb=round(psutil.virtual_memory().total / 1e9, 2),
        mem_bandwidth_gbs=round(bandwidth_gbs if bandwidth_gbs is not None
                                else memory_bandwidth_gbs(threads), 3),
        versions=tool_versions(),
    )
