"""Browser runner: the ONNX model folder in onnxruntime-web inside a real headless chromium.

``--runtime browser --browser-backend webgpu|wasm``. Each session starts the local page server
and chromium, loads the model in the harness page (``load_s``: fetching the files and creating
the onnxruntime-web session, as a page would) and runs the causal LM with its KV cache there;
timings are taken in the page with ``performance.now()``. Tokenizing is done in Python with the
folder's tokenizer.json (the same tokenizer the pages use), so prompts equal those of the
Python onnxruntime runner.

SwiftShader (chromium's WebGPU without a GPU) is slow: its WebGPU figures check correctness,
not speed; wasm numbers are the browser's CPU speed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import psutil

from edgesmith.bench.runners.base import GenerationResult, log_softmax
from edgesmith.errors import ModelError


def _folder_and_file(artifact: Path, dtype: str | None) -> tuple[Path, Path]:
    from edgesmith.bench.runners.onnxruntime import model_file, model_folder

    return model_folder(artifact), model_file(artifact, dtype)


def chromium_rss_mb() -> float:
    """Resident memory of the chromium processes this process started (through playwright's
    driver): browser, renderer, GPU and utility processes together, in MB."""
    total = 0
    try:
        procs = psutil.Process().children(recursive=True)
    except psutil.Error:
        return 0.0
    for p in procs:
        try:
            if "chrom" in p.name().lower():
                total += p.memory_info().rss
        except psutil.Error:
            continue
    return total / 1e6


class BrowserSession:
    def __init__(self, artifact: Path, threads: int | None, backend: str,
                 dtype: str | None = None) -> None:
        from transformers import PreTrainedTokenizerFast

        from edgesmith.web.browser import Harness

        self.folder, self.path = _folder_and_file(Path(artifact), dtype)
        tok_file = self.folder / "tokenizer.json"
        if not tok_file.exists():
            raise ModelError(f"{self.folder} has no tokenizer.json", "re-export the model folder")
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
        self.backend = backend
        self.threads = threads or 0
        self.harness = Harness(self.folder, self.path).__enter__()
        try:
            self.loaded = self.harness.load(backend, self.threads)
            self.probe = self.harness.probe()
        except BaseException:
            self.harness.close()
            raise
        self.load_s = float(self.loaded["loadMs"]) / 1000
        self.n_vocab = int(self.harness.info.get("vocab_size") or 0)
        self.rss_mb: list[float] = [chromium_rss_mb()]

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens))

    def logits(self, token_ids: list[int]) -> np.ndarray:
        out = self.harness.logits(list(token_ids))
        self.n_vocab = out.shape[-1]
        return out

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        return log_softmax(self.logits(token_ids)[start : len(token_ids) - 1])

    def generate(self, prompt_tokens: list[int], n: int) -> GenerationResult:
        """Greedy generation of exactly ``n`` tokens (EOS is no stop), timed in the page."""
        if not prompt_tokens or n < 1:
            raise ValueError("generate needs at least one prompt token and n >= 1")
        r = self.harness.generate(list(prompt_tokens), n)
        self.rss_mb.append(chromium_rss_mb())
        toks = [int(t) for t in r["tokens"]]
        return GenerationResult(len(prompt_tokens), toks, self.detokenize(toks),
                                ttft_s=r["ttftMs"] / 1000, prefill_s=r["prefillMs"] / 1000,
                                decode_s=r["decodeMs"] / 1000)

    def close(self) -> None:
        self.harness.close()


class BrowserRunner:
    """``backend``: webgpu or wasm (onnxruntime-web's execution provider)."""

    name = "browser"
    formats = ("onnx",)

    def __init__(self, backend: str = "wasm", dtype: str | None = None) -> None:
        from edgesmith.web.browser import BACKENDS

        if backend not in BACKENDS:
            raise ModelError(f"unknown browser backend {backend!r}", "use webgpu or wasm")
        self.backend, self.dtype = backend, dtype
        self.name = f"chromium-{backend}"

    def open(self, artifact: Path, *, threads: int | None = None, n_ctx: int = 2048,
             logits_all: bool = False) -> BrowserSession:
        return BrowserSession(Path(artifact), threads, self.backend, self.dtype)


def versions(session: BrowserSession) -> dict[str, str]:
    """The browser side's versions, for the results file's environment."""
    from edgesmith.web import npm

    gpu: dict[str, Any] = session.probe.get("gpu", {})
    agent = str(session.probe.get("agent", ""))
    chrome = agent.split("Chrome/")[-1].split()[0] if "Chrome/" in agent else "unknown"
    out = {"chromium": chrome, "onnxruntime-web": npm.package_version("onnxruntime-web"),
           "browser_backend": session.backend,
           "cross_origin_isolated": str(bool(session.probe.get("isolated")))}
    if session.backend == "webgpu":
        out["webgpu_adapter"] = f"{gpu.get('vendor', '')}/{gpu.get('architecture', '')}"
    return out


def onnx_artifact_info(artifact: Path, dtype: str | None = None) -> Any:
    """ArtifactInfo of an ONNX model folder: the model file and its external data.

    ``n_params`` counts MatMulNBits weights as N x K and every other initializer's elements;
    weight bytes per token are all initializers' bytes less an embedding table that only a
    Gather reads (one row per token). Without the ``onnx`` package both come from file sizes.
    """
    from edgesmith.bench.results import ArtifactInfo
    from edgesmith.fsutil import sha256_file
    from edgesmith.web.browser import external_data

    folder, path = _folder_and_file(Path(artifact), dtype)
    files = [path, *(path.parent / n for n in external_data(path))]
    size = sum(f.stat().st_size for f in files)
    n_params, per_token = _count_weights(path)
    quant = path.stem.removeprefix("model").lstrip("_") or "fp32"
    return ArtifactInfo(name=f"{folder.resolve().name}/{path.name}", path=str(path),
                        format="onnx", size_bytes=size, sha256=sha256_file(path),
                        quant=quant, n_params=n_params or size,
                        weight_bytes_per_token=per_token or size)


def _count_weights(path: Path) -> tuple[int, int]:
    try:
        import onnx
        from onnx import helper
    except ImportError:
        return 0, 0
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # onnx's DecodeError and friends: the runtime reports it on load
        return 0, 0
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def nbytes(t: Any) -> int:
        for kv in t.external_data:
            if kv.key == "length":
                return int(kv.value)
        n = int(np.prod(t.dims)) if t.dims else 1
        return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    params = 0
    counted: set[str] = set()
    users: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            if name in inits:
                users.setdefault(name, set()).add(node.op_type)
        if node.op_type == "MatMulNBits" and len(node.input) > 1:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            params += int(attrs.get("N", 0)) * int(attrs.get("K", 0))
            counted.update(node.input[1:])
    for name, t in inits.items():
        if name not in counted:
            params += int(np.prod(t.dims)) if t.dims else 1
    total = sum(nbytes(t) for t in inits.values())
    lookup = [n for n, ops in users.items() if ops == {"Gather"} and len(inits[n].dims) == 2]
    per_token = total - sum(nbytes(inits[n]) for n in lookup)
    return params, per_token


def bench_browser(path: Path, spec: Any, backend: str, *, dtype: str | None = None,
                  device: str | None = None, progress: Any = None,
                  command: list[str] | None = None) -> Any:
    """``bench --runtime browser``: the usual results file, measured in chromium.

    ``peak_rss_mb`` is the resident memory of chromium's process tree after each generation
    (the Python process's own peak says nothing about the browser).
    """
    from edgesmith.bench import speed
    from edgesmith.bench.env import environment
    from edgesmith.bench.results import Stat

    path = Path(path)
    if not path.exists():
        raise ModelError(f"artifact {path} does not exist",
                         "pass a folder written by `edgesmith export --format onnx`")
    from edgesmith.web import npm
    from edgesmith.web.browser import find_chromium, sync_playwright

    runner = BrowserRunner(backend, dtype)
    info = onnx_artifact_info(path, dtype)
    find_chromium()  # the tools first: one line naming the fix, before any measuring
    sync_playwright()
    npm.ensure_modules(progress=progress)
    env = environment(spec.threads)
    sessions: list[BrowserSession] = []

    def open_session() -> BrowserSession:
        s = runner.open(path, threads=spec.threads, n_ctx=spec.n_ctx)
        sessions.append(s)
        return s

    metrics = speed.measure(open_session, spec, reload_each_repeat=True, progress=progress,
                            label=f"bench {path.name} in chromium ({backend})")
    rss = [max(s.rss_mb) for s in sessions][-spec.repeat:]
    metrics.peak_rss_mb = Stat.of(rss)
    env.versions.update(versions(sessions[-1]))
    return speed.assemble(info=info, spec=spec, metrics=metrics, env=env, runtime=runner.name,
                          reload_each_repeat=True, device=device, source="local",
                          command=command)
