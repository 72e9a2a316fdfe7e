"""Server metrics in the Prometheus text exposition format (no client library needed).

Thread-safe counters and histograms, plus gauges read from callables at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    esc = lambda v: v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in pairs) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += count
            le = "+Inf" if bound == float("inf") else _num(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        return [*out, f"{name}_sum {_num(self.total)}", f"{name}_count {self.n}"]


class Metrics:
    """Everything /metrics exposes. ``gauges`` are read at scrape time."""

    PREFIX = "edgesmith"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[tuple[str, str], ...], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cancelled = 0
        self.connections_closed: dict[str, int] = {}
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode_tps = Histogram(TPS_BUCKETS)
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    def count_request(self, route: str, method: str, status: int) -> None:
        key = (("route", route), ("method", method), ("status", str(status)))
        with self._lock:
            self.requests[key] = self.requests.get(key, 0) + 1

    def count_connection_closed(self, reason: str) -> None:
        """A connection the server's limits closed: "refused", "evicted" or "timed_out"."""
        with self._lock:
            self.connections_closed[reason] = self.connections_closed.get(reason, 0) + 1

    def record_generation(self, prompt_tokens: int, completion_tokens: int,
                          ttft_s: float | None, decode_tps: float | None,
                          cancelled: bool) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.cancelled += int(cancelled)
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if decode_tps is not None:
                self.decode_tps.observe(decode_tps)

    def add_gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.gauges[name] = (help_text, read)

    def render(self) -> str:
        p = self.PREFIX
        with self._lock:
            lines = [f"# HELP {p}_requests_total HTTP requests by route, method and status.",
                     f"# TYPE {p}_requests_total counter"]
            lines += [f"{p}_requests_total{_labels(k)} {v}"
                      for k, v in sorted(self.requests.items())]
            for name, help_text, value in (
                ("prompt_tokens_total", "Prompt tokens evaluated.", self.prompt_tokens),
                ("completion_tokens_total", "Tokens generated.", self.completion_tokens),
                ("generations_cancelled_total", "Generations stopped by a client disconnect.",
                 self.cancelled),
            ):
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} counter",
                          f"{p}_{name} {value}"]
            lines += [f"# HELP {p}_connections_closed_total Connections closed by the "
                      "connection limits, by reason (refused, evicted, timed_out).",
                      f"# TYPE {p}_connections_closed_total counter"]
            lines += [f"{p}_connections_closed_total{_labels((('reason', r),))} {n}"
                      for r, n in sorted(self.connections_closed.items())]
            for name, help_text, hist in (
                ("time_to_first_token_seconds", "Prompt evaluation + first token, excluding "
                 "queue wait.", self.ttft),
                ("decode_tokens_per_second", "Decode speed per generation (tokens after the "
                 "first).", self.decode_tps),
            ):
                lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} histogram",
                          *hist.lines(f"{p}_{name}")]
        for name, (help_text, read) in self.gauges.items():
            lines += [f"# HELP {p}_{name} {help_text}", f"# TYPE {p}_{name} gauge",
                      f"{p}_{name} {_num(read())}"]
        return "\n".join(lines) + "\n"
