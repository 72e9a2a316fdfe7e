"""Reference libraries in their own virtual environments, for the benchmarks that compare against
them (their pins conflict with edgesmith's): created on first use under
``~/.cache/edgesmith/bench/libs/<name>/venv`` and reused after.

Every venv gets the local CPU torch first (``torch==2.13.0``: an unpinned torch pulls a
multi-GB CUDA build), then the library. A venv is used only once its install finished (a
``.ready`` marker); a failed install is reported with the tail of pip's log and retried on the
next run.

Usage: python benchmarks/_libvenv.py [llmcompressor|gptqmodel ...]   (builds them, prints paths)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TORCH = "torch==2.13.0"
# name -> pip install steps after torch; a step starting with "--no-deps" installs without deps
LIBS: dict[str, list[list[str]]] = {
    "llmcompressor": [["llmcompressor==0.14.*", "transformers<=5.17"]],
    # gptqmodel's declared deps pull a CUDA torch and build kernels; over the CPU torch it runs
    # with what it imports (GPTQMODEL_CPU_WORKERS=2 keeps its thread pool to the two cores)
    "gptqmodel": [
        ["transformers", "accelerate", "safetensors", "threadpoolctl", "packaging", "numpy",
         "pillow", "pypcre", "logbar", "tokenicer", "device-smi", "defuser", "protobuf",
         "requests", "jinja2", "ninja", "datasets", "pyarrow", "dill", "torchao"],
        ["--no-deps", "gptqmodel==7.7.*"],
    ],
}


def root() -> Path:
    base = os.environ.get("EDGESMITH_BENCH_LIBS")
    return Path(base) if base else Path.home() / ".cache" / "edgesmith" / "bench" / "libs"


def python_of(name: str) -> Path:
    return root() / name / "venv" / "bin" / "python"


class VenvError(RuntimeError):
    pass


def ensure(name: str, quiet: bool = False) -> Path:
    """The Python of library ``name``'s venv, built if it is not ready; VenvError if the install
    fails (the message holds the tail of pip's log)."""
    home = root() / name
    py = python_of(name)
    if (home / ".ready").exists() and py.exists():
        return py
    shutil.rmtree(home / "venv", ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    log = home / "install.log"
    if not quiet:
        print(f"[{name}] creating its venv in {home} (first run, minutes; log {log})",
              flush=True)
    with open(log, "w") as f:
        def sh(cmd: list[str]) -> None:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                f.flush()
                raise VenvError(f"{name}: `{' '.join(cmd)}` failed:\n"
                                + log.read_text()[-3000:])

        # the interpreter edgesmith runs on (a venv's base), so wheels match
        base = getattr(sys, "_base_executable", sys.executable)
        sh([base, "-m", "venv", str(home / "venv")])
        pip = [str(py), "-m", "pip", "install", "-q"]
        sh([*pip, TORCH])
        for step in LIBS[name]:
            sh([*pip, *step, TORCH])  # torch named again so pip keeps the CPU build
    (home / ".ready").write_text("ok\n")
    return py


def run(name: str, script: Path, args: list[str], env: dict[str, str] | None = None,
        timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``script`` with library ``name``'s Python (built first if needed)."""
    py = ensure(name)
    return subprocess.run([str(py), str(script), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


# --- the workers: run inside a library's venv (stdlib at import; no edgesmith there) ----------
def _plain_dir(model: Any, src: Path, dest: Path, weights: dict[str, Any]) -> None:
    """A plain fp32 HF dir at ``dest``: ``weights`` (name -> fp32 tensor, the fake-quantized
    ones) over the model's other parameters, src's config.json and tokenizer files."""
    import torch
    from safetensors.torch import save_file

    keep = {}
    for k, v in model.state_dict().items():
        if not torch.is_floating_point(v) or any(
                p in k for p in ("weight_scale", "weight_zero_point", "weight_g_idx",
                                 "weight_global_scale", "observer", "qweight", "qzeros",
                                 ".scales", "g_idx")):
            continue
        keep[k] = v
    keep.update(weights)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("tie_word_embeddings", False):
        keep.pop("lm_head.weight", None)
    dest.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().contiguous().clone() for k, v in keep.items()},
              str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy(f, dest / f.name)


def _llmc_gptq(a: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.load(a.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                           "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    args = QuantizationArgs(num_bits=a.bits, type="int", symmetric=True, strategy="group",
                            group_size=a.group_size,
                            actorder="static" if a.act_order else None)
    recipe = GPTQModifier(config_groups={"g": QuantizationScheme(targets=["Linear"],
                                                                   weights=args)},
                          ignore=["lm_head"], dampening_frac=a.damp, block_size=128,
                          actorder="static" if a.act_order else None)
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe,
            max_seq_length=int(ids.shape[1]), num_calibration_samples=len(ids),
            shuffle_calibration_samples=False, batch_size=a.batch)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    weights, drift = {}, 0.0
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale"):
                w = m.weight.detach().float()
                fq = fake_quantize(w, m.weight_scale.float(), m.weight_zero_point,
                                   m.quantization_scheme.weights).float()
                drift = max(drift, float((fq - w).abs().max()))
                weights[f"{name}.weight"] = fq
    _plain_dir(model, Path(a.model), Path(a.out), weights)
    import llmcompressor

    return {"seconds": seconds, "cpu_seconds": cpu, "quantized": len(weights),
            "refake_max_change": drift,
            "version": f"llmcompressor {llmcompressor.__version__}"}


def _llmc_sparse(a: argparse.Namespace) -> dict[str, Any]:
    """llm-compressor's SparseGPT or Wanda (``--method``) at ``--sparsity`` or ``--pattern``
    N:M, ``lm_head`` in its ignore list; the pruned model as a plain fp32 dir, with the
    sparsity it actually left in every Linear (lm_head and the embeddings included)."""
    import numpy as np
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if a.method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier as Mod
        extra: dict[str, Any] = {"dampening_frac": a.damp, "block_size": 128}
    else:
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier as Mod
        extra = {}
    ids = np.load(a.calib)
    ds = Dataset.from_dict({"input_ids": ids.tolist(),
                           "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    recipe = Mod(sparsity=a.sparsity, mask_structure=a.pattern or "0:0", targets=["Linear"],
                 ignore=["re:.*lm_head"], **extra)
    t0, c0 = time.perf_counter(), time.process_time()
    oneshot(model=model, processor=tok, dataset=ds, recipe=recipe,
            max_seq_length=int(ids.shape[1]), num_calibration_samples=len(ids),
            shuffle_calibration_samples=False, batch_size=a.batch)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    sparsity = {}
    for name, m in model.named_modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            sparsity[name] = float((m.weight == 0).float().mean())
    _plain_dir(model, Path(a.model), Path(a.out), {})
    import llmcompressor

    return {"seconds": seconds, "cpu_seconds": cpu, "sparsity": sparsity,
            "version": f"llmcompressor {llmcompressor.__version__}"}


def _dequantized(model: Any) -> dict[str, Any]:
    """name.weight -> fp32 [out, in] of every gptqmodel quantized Linear of ``model``,
    oriented by checking the module's own forward on a random input."""
    import torch

    out = {}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, m in model.named_modules():
            if not hasattr(m, "dequantize_weight") or not hasattr(m, "qweight"):
                continue
            for attr in ("wf", "wf_unsqueeze_zero", "wf_unsqueeze_neg_one"):
                buf = getattr(m, attr, None)  # shift tables a model-wide .to(dtype) made float
                if isinstance(buf, torch.Tensor) and buf.is_floating_point():
                    setattr(m, attr, buf.to(torch.int32))
            w = m.dequantize_weight().float()
            n_in, n_out = int(m.in_features), int(m.out_features)
            x = torch.randn(2, n_in, generator=gen)
            y = None
            for dt in (torch.float32, torch.bfloat16, torch.float16):  # what its kernel takes
                try:
                    y = m(x.to(dt)).float()
                    break
                except (RuntimeError, NotImplementedError, TypeError):
                    continue
            if y is None:
                raise RuntimeError(f"{name}: its forward takes no float input")
            bias = m.bias.float() if getattr(m, "bias", None) is not None else 0.0
            cands = [c for c in (w, w.t()) if tuple(c.shape) == (n_out, n_in)]
            best = min(cands, key=lambda c: float((x @ c.t() + bias - y).abs().max()))
            out[f"{name}.weight"] = best.contiguous()
    return out


def _gptqmodel_awq(a: argparse.Namespace) -> dict[str, Any]:
    import tempfile

    import numpy as np
    import torch
    from gptqmodel import AWQConfig, GPTQModel

    ids = np.load(a.calib)
    calib = [{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids]
    cfg = AWQConfig(bits=a.bits, group_size=a.group_size, sym=False)
    # its CPU AWQ kernels pack only fp16/bf16 models (fp32 raises NotImplementedError)
    model = GPTQModel.load(a.model, cfg, device="cpu", dtype=torch.bfloat16)
    t0, c0 = time.perf_counter(), time.process_time()
    model.quantize(calib, batch_size=a.batch)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        model.save(tmp)
        del model
        q = GPTQModel.load(tmp, device="cpu", dtype=torch.bfloat16)
        weights = _dequantized(q.model)
        _plain_dir(q.model, Path(a.model), Path(a.out), weights)
    import gptqmodel

    return {"seconds": seconds, "cpu_seconds": cpu, "quantized": len(weights),
            "version": f"gptqmodel {gptqmodel.__version__} (bf16 calibration)"}


def _gptqmodel_logprobs(a: argparse.Namespace) -> dict[str, Any]:
    """Load a GPTQ checkpoint with gptqmodel (its own kernels) and save its log-probs."""
    import numpy as np
    import torch
    from gptqmodel import GPTQModel

    t0 = time.perf_counter()
    q = GPTQModel.load(a.model, device="cpu", dtype=torch.float32)
    load_s = time.perf_counter() - t0
    kinds = sorted({type(m).__name__ for m in q.model.modules() if hasattr(m, "qweight")})
    weights = _dequantized(q.model)  # before any forward: its kernels repack on first use
    windows = np.load(a.windows)
    rows = []
    with torch.inference_mode():
        for w in windows:
            logits = q.model(torch.tensor(w[None].astype(np.int64))).logits[0]
            lp = torch.log_softmax(logits[a.start: len(w) - 1].float(), dim=-1)
            rows.append(lp.numpy().astype(np.float16))
    np.save(a.out, np.stack(rows))
    diff = 0.0
    if a.plain:  # the same weights as edgesmith's own dequantization?
        from safetensors import safe_open

        for f in sorted(Path(a.plain).glob("*.safetensors")):
            with safe_open(str(f), "pt") as st:
                for k in st.keys():  # noqa: SIM118
                    if k in weights:
                        diff = max(diff, float((st.get_tensor(k).float() - weights[k]).abs()
                                               .max()))
    return {"load_seconds": load_s, "kernels": kinds, "quantized": len(weights),
            "max_weight_diff": diff}


WORKERS = {"llmc-gptq": _llmc_gptq, "llmc-sparse": _llmc_sparse,
           "gptqmodel-awq": _gptqmodel_awq, "gptqmodel-logprobs": _gptqmodel_logprobs}


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="_libvenv.py worker")
    ap.add_argument("task", choices=sorted(WORKERS))
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calib")
    ap.add_argument("--windows")
    ap.add_argument("--plain", help="a plain HF dir whose weights the loaded ones must equal")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--pattern", help="N:M (llm-compressor's mask_structure)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--result", required=True, help="JSON file for the worker's figures")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    res = WORKERS[a.task](a)
    Path(a.result).write_text(json.dumps(res))


def work(name: str, task: str, args: list[str], timeout: float | None = None) \
        -> dict[str, Any]:
    """Run worker ``task`` in library ``name``'s venv; its JSON result, or VenvError."""
    import tempfile

    py = ensure(name)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS",
                                                                    "2"),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": ""}
        log = Path(tmp) / "log"
        with open(log, "w") as f:
            try:
                p = subprocess.run([str(py), __file__, "worker", task, *args, "--result",
                                    str(result)], stdout=f, stderr=subprocess.STDOUT, env=env,
                                   timeout=timeout, cwd=tmp)
            except subprocess.TimeoutExpired as e:
                raise VenvError(f"{name} {task}: timed out after {timeout} s") from e
        if p.returncode != 0 or not result.exists():
            raise VenvError(f"{name} {task} failed (exit {p.returncode}):\n"
                            + log.read_text()[-2500:])
        res: dict[str, Any] = json.loads(result.read_text())
        res["log_tail"] = log.read_text()[-1500:]
        return res


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker_main(sys.argv[2:])
        raise SystemExit(0)
    if "--help" in sys.argv or "-h" in sys.argv:
        print(__doc__)
        raise SystemExit(0)
    for lib in sys.argv[1:] or list(LIBS):
        try:
            print(lib, ensure(lib))
        except VenvError as e:
            print(e)
