"""What the device server costs over calling llama-cpp-python in process, and how it holds up.

1. One client, streaming: decode tokens/s and time to first token through `edgesmith serve`
   (waitress, real HTTP on loopback, server-sent events) versus the same llama-cpp-python
   generation loop called directly in this process, on the same GGUF, threads, prompts and
   token counts (greedy, so both produce the same tokens). Runs alternate between the two, so
   load from elsewhere on the machine hits both alike; medians are reported.
2. Overload: 32 clients x 3 chat requests at once against a queue of 8: p50/p99 latency and
   how many requests got 200, 503, an error, or hung (no answer within the timeout), and
   whether /metrics counted exactly what the clients saw.

Usage: python benchmarks/server_overhead.py [--threads 1] [--gen 128] [--runs 5]
The model is SmolLM2-135M (builtin:smollm2-135m) as a plain Q4_K_M GGUF made by edgesmith's own
converter and quantizer (cached in the edgesmith cache).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

PROMPTS = [f"Note {i}. Counting from one: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10," for i in range(40)]


def smollm2_gguf(qtype: str = "Q4_K_M") -> Path:
    """SmolLM2-135M as a plain ``qtype`` GGUF (edgesmith's converter + quantizer), cached."""
    from edgesmith.context import make_progress
    from edgesmith.pipeline import plain_gguf

    with make_progress() as progress:
        return plain_gguf("builtin:smollm2-135m", qtype, progress)


# --- direct, in process ----------------------------------------------------------------------

def direct_run(llm: Any, prompt: str, n: int) -> tuple[float, float, int]:
    """(ttft_s, decode tok/s, tokens) of the engine's own generation loop, called directly."""
    t0 = time.perf_counter()
    toks = llm.tokenize(prompt.encode(), add_bos=True, special=True)
    first = last = 0.0
    count = 0
    gen = llm.generate(toks, temp=0.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)
    for tok in gen:
        now = time.perf_counter()
        if llm.token_eos() == tok:
            break
        llm.detokenize([tok])  # the server turns every token into text too
        count += 1
        first = first or now
        last = now
        if count >= n:
            break
    gen.close()
    return first - t0, (count - 1) / (last - first), count


# --- through the server ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: Path, threads: int, queue: int,
                 cap: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - the server writes to it while it runs
    proc = subprocess.Popen([sys.executable, "-m", "edgesmith.cli", "serve", str(model),
                             "--port", str(port), "--threads", str(threads), "--ctx", "1024",
                             "--queue-size", str(queue), "--max-tokens", str(cap)],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise SystemExit(f"the server did not start: {log.read().decode(errors='replace')}")


def server_run(port: int, prompt: str, n: int) -> tuple[float, float, int]:
    """(ttft_s, decode tok/s, tokens) seen by a streaming client."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = json.dumps({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    first = last = 0.0
    tokens = 0
    while line := resp.readline():
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        elif event["choices"] and event["choices"][0]["text"]:
            first = first or now
            last = now
    conn.close()
    return first - t0, (tokens - 1) / (last - first), tokens


def metrics(port: int) -> dict[str, float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    out = {}
    for line in conn.getresponse().read().decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def overload(port: int, clients: int, per_client: int, timeout_s: float) -> dict[str, Any]:
    lat: dict[int, list[float]] = {}
    outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        for j in range(per_client):
            t0 = time.perf_counter()
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
                conn.request("POST", "/v1/chat/completions", body=json.dumps({
                    "messages": [{"role": "user", "content": f"Say a number ({i}.{j})."}],
                    "max_tokens": 16, "temperature": 0.7, "seed": i}),
                    headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                status, kind = resp.status, str(resp.status)
                conn.close()
            except TimeoutError:
                status, kind = 0, "hung"
            except (OSError, http.client.HTTPException):  # refused, reset, cut short
                status, kind = 0, "error"
            with lock:
                outcomes[kind if kind in ("200", "503", "hung") else "error"] += 1
                if status:
                    lat.setdefault(status, []).append(time.perf_counter() - t0)

    before = metrics(port)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = metrics(port)
    counted = {code: after.get(f'edgesmith_requests_total{{route="/v1/chat/completions",'
                               f'method="POST",status="{code}"}}', 0)
               - before.get(f'edgesmith_requests_total{{route="/v1/chat/completions",'
                            f'method="POST",status="{code}"}}', 0) for code in (200, 503)}
    return {"outcomes": outcomes, "lat": lat, "wall": wall, "counted": counted}


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads for both sides (1 on a shared 2-core machine)")
    ap.add_argument("--gen", type=int, default=128, help="tokens generated per run")
    ap.add_argument("--runs", type=int, default=5, help="runs per side (plus one warm-up)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llama_cpp import Llama

    from edgesmith.bench.runners.llama_cpp import CONTEXT_DEFAULTS

    model = smollm2_gguf()
    print(f"model: {model.name} ({model.stat().st_size / 1e6:.0f} MB), threads {args.threads}, "
          f"{args.gen} tokens per run, {args.runs} runs per side, greedy", flush=True)
    llm = Llama(model_path=str(model), n_ctx=1024, n_threads=args.threads,
                n_threads_batch=args.threads, verbose=False, **CONTEXT_DEFAULTS)
    proc, port = start_server(model, args.threads, queue=8, cap=args.gen)
    try:
        direct, served = [], []
        for i in range(args.runs + 1):  # run 0 warms both up
            d, s = direct_run(llm, PROMPTS[i], args.gen), server_run(port, PROMPTS[i], args.gen)
            assert d[2] == s[2], f"token counts differ: direct {d[2]}, server {s[2]}"
            if i:
                direct.append(d)
                served.append(s)
        n_prompt = len(llm.tokenize(PROMPTS[1].encode(), add_bos=True, special=True))
        llm.close()
        med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
        d_tps, s_tps = med(direct, 1), med(served, 1)
        d_ttft, s_ttft = med(direct, 0) * 1e3, med(served, 0) * 1e3
        print()
        print("| one streaming client         | direct llama-cpp-python | edgesmith serve | "
              "server vs direct |")
        print("|------------------------------|------------------------:|----------------:|"
              "-----------------:|")
        print(f"| decode tokens/s (median)     | {d_tps:23.1f} | {s_tps:15.1f} | "
              f"{s_tps / d_tps:15.3f}x |")
        print(f"| time to first token, ms      | {d_ttft:23.1f} | {s_ttft:15.1f} | "
              f"{s_ttft - d_ttft:+13.1f} ms |")
        print(f"| prompt + generated tokens    | {n_prompt:11d} + {direct[0][2]:9d} | "
              f"{n_prompt:5d} + {served[0][2]:7d} | {'same':>16} |")
        print(f"targets: decode >= 0.95x: {'met' if s_tps / d_tps >= 0.95 else 'MISSED'}; "
              f"added time to first token < 15 ms: "
              f"{'met' if s_ttft - d_ttft < 15 else 'MISSED'}")
        print(f"decode tokens/s per run: direct {[round(r[1], 1) for r in direct]}, "
              f"server {[round(r[1], 1) for r in served]}")

        res = overload(port, clients=32, per_client=3, timeout_s=120)
        alive = proc.poll() is None and metrics(port)["edgesmith_model_loaded"] == 1
        o, lat = res["outcomes"], res["lat"]
        every = [x for xs in lat.values() for x in xs]
        print()
        print(f"overload: 32 clients x 3 chat requests (max_tokens 16), queue 8, "
              f"{res['wall']:.1f} s in all")
        print("| requests | 200 | 503 | errors | hung | p50 ms (all) | p99 ms (all) | "
              "p50 ms (200) | p99 ms (200) | p99 ms (503) |")
        print("|---------:|----:|----:|-------:|-----:|-------------:|-------------:|"
              "-------------:|-------------:|-------------:|")
        ok, busy = lat.get(200, [0.0]), lat.get(503, [0.0])
        print(f"| {sum(o.values()):8d} | {o['200']:3d} | {o['503']:3d} | {o['error']:6d} | "
              f"{o['hung']:4d} | {pct(every, 50) * 1e3:12.0f} | {pct(every, 99) * 1e3:12.0f} | "
              f"{pct(ok, 50) * 1e3:12.0f} | {pct(ok, 99) * 1e3:12.0f} | "
              f"{pct(busy, 99) * 1e3:12.1f} |")
        match = res["counted"][200] == o["200"] and res["counted"][503] == o["503"]
        print(f"server alive afterwards: {'yes' if alive else 'NO'}; /metrics counted "
              f"200: {res['counted'][200]:.0f}, 503: {res['counted'][503]:.0f} "
              f"({'matches' if match else 'DOES NOT MATCH'} the clients)")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
