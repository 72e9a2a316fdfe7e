"""edgesmith's GPTQ and AWQ against the reference libraries, on the same model, calibration and
held-out evaluation, with the anchors measured in the same run.

Torch-side rows (each model: the fake-quantized fp32 model in torch, mean KLD vs the fp32 model
on the held-out text, edgesmith.bench.quality):
  RTN w4 g128 sym / asym                 anchors (edgesmith's grid, round to nearest)
  edgesmith GPTQ w4 g128 sym             compress/gptq.py run_dir (streamed), act-order static
  llm-compressor 0.14 GPTQ               same bits, group, damp, act-order (its own venv)
  edgesmith AWQ w4 g128 asym, then RTN   compress/awq.py (scales + clipping) on its grid
  gptqmodel 7.7 AWQ w4 g128 asym         its own venv, GPTQMODEL_CPU_WORKERS=2
  gptqmodel loading edgesmith's GPTQ checkpoint: KLD of its logits vs our fake-quantized model
GGUF rows (llama.cpp runtime, one evaluator in llama-cpp-python):
  edgesmith compress --recipe raspberry-pi-5-gptq-q4_0 (GPTQ g32 codes written as Q4_0 blocks)
  llama.cpp's convert + llama-imatrix + llama-quantize Q4_0 and Q4_K_M (the anchors)
  and `edgesmith bench` decode tokens/s of each (same threads).
Models: the off-grid reference (SmolLM2-135M continued-pretrained, benchmarks/offgrid_reference.py)
and the tiny trained Llama for the torch rows; the off-grid reference and SmolLM2 itself (a
dequantized Q4_1 GGUF: on-grid, so every group-32 method looks nearly lossless) for the GGUF rows.
Every method gets the same calibration chunks: the first SAMPLES x SEQ_LEN tokens of the bundled
calibration text. A library that cannot run here is reported with why; no row is made up.

Usage: python benchmarks/gptq_awq_vs_libraries.py [--samples 32] [--seq-len 512] [--threads 2]
       [--skip-torch] [--skip-gguf] [--skip-libs] [--skip-bench] [--models offgrid,tiny,smollm2]
       [--quick]
  --quick  tiny trained Llama only for the torch rows, SmolLM2 for the GGUF rows, 4 x 128
           calibration, 2 evaluation windows (checks every path in minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _libvenv  # noqa: E402
import offgrid_reference as offgrid  # noqa: E402


# --- evaluation -----------------------------------------------------------------------------
class _InMemory:
    """A quality.evaluate session over an in-memory (fake-quantized) HF model."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        import torch

        with torch.inference_mode():
            logits = self.model(torch.tensor([token_ids])).logits[0, start: len(token_ids) - 1]
            return torch.log_softmax(logits.float(), dim=-1).numpy()


class _Precomputed:
    """A session whose log-probs were computed elsewhere (another venv), window by window."""

    def __init__(self, lps: np.ndarray) -> None:
        self.lps, self.i = lps, 0

    def logprobs(self, token_ids: list[int], start: int = 0) -> np.ndarray:
        out = np.asarray(self.lps[self.i], dtype=np.float32)
        self.i += 1
        return out


def _q(sess: Any, ref: Any) -> dict[str, float]:
    from edgesmith.bench import quality

    r = quality.evaluate(sess, ref)
    return {"kld": r.kld_mean, "ppl": r.ppl_increase_pct, "top1": r.top1_agreement}


def _eval_dir(plain: Path, ref: Any) -> dict[str, float]:
    from edgesmith.models import load_hf

    model, _ = load_hf(plain)
    out = _q(_InMemory(model), ref)
    del model
    return out


def _rtn_in_place(model: Any, bits: int, group: int, sym: bool) -> None:
    import torch

    from edgesmith.compress import layerwise
    from edgesmith.compress import qweights as qw

    _, layers = layerwise.decoder_layers(model)
    spec = qw.QuantSpec(bits, group, sym)
    with torch.no_grad():
        for layer in layers:
            for name, m in layerwise.linears(layer):
                m.weight.copy_(qw.quantize_rtn(m.weight, spec, name).dequantize())


class _Clock:
    """Wall and CPU seconds (this process, all threads) of a block: on a shared machine the
    CPU seconds are what compares methods; wall time is printed too."""

    def __enter__(self) -> _Clock:
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *_: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self.cpu_seconds = time.process_time() - self.c0

    def figures(self) -> dict[str, float]:
        return {"seconds": self.seconds, "cpu_seconds": self.cpu_seconds}


def _try(rows: dict[str, dict[str, Any]], label: str, fn: Any) -> None:
    """rows[label] = fn()'s figures, or the reason it could not run (never a made-up row)."""
    print(f"  {label} ...", flush=True)
    try:
        rows[label] = fn()
    except Exception as e:  # a library that fails here is reported, the others go on
        msg = str(e).strip().splitlines()
        rows[label] = {"error": " / ".join(msg[-3:])[:400] or type(e).__name__}
        print(f"    could not run: {rows[label]['error']}", flush=True)


# --- torch-side rows ------------------------------------------------------------------------
def _group_size(model_dir: Path, wanted: int) -> int:
    """``wanted`` (0: 128) when every Linear's width is a multiple of it, else the largest of
    64 / 32 that is (SmolLM2-135M's hidden 576 is 4.5 x 128)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    heads = cfg["num_attention_heads"] * (cfg.get("head_dim") or
                                          cfg["hidden_size"] // cfg["num_attention_heads"])
    widths = [cfg["hidden_size"], cfg["intermediate_size"], heads]  # q/k/v/gate/up, down, o
    for g in ([wanted] if wanted else [128, 64, 32]):
        if all(w % g == 0 for w in widths):
            return g
    raise SystemExit(f"{model_dir}: widths {widths} take no group size {wanted}")


def torch_rows(model_dir: Path, args: argparse.Namespace, work: Path,
               rows: dict[str, Any]) -> dict[str, Any]:
    import torch

    from edgesmith.bench import quality
    from edgesmith.compress import awq, gptq, gptq_format
    from edgesmith.compress.imatrix import CalibrationConfig
    from edgesmith.context import RunContext, make_progress
    from edgesmith.models import load_hf

    ref = quality.reference(model_dir, quality.EvalSpec(512, args.windows),
                            offgrid.refs_dir(model_dir), threads=args.threads)
    model, tok = load_hf(model_dir)
    del model
    calib = CalibrationConfig(samples=args.samples, seq_len=args.seq_len)
    ids = awq.calibration_ids(tok, calib).numpy()  # the chunks every method gets
    np.save(work / "calib.npy", ids)
    g = _group_size(model_dir, args.group_size)
    args.groups_used[model_dir.name] = g

    def ctx() -> RunContext:
        c = RunContext(out_dir=work, cache_dir=work, progress=make_progress(quiet=True),
                       threads=args.threads)
        c.extras.update(calibration=calib, tokenizer=tok)
        return c

    def rtn(sym: bool) -> dict[str, Any]:
        m, _ = load_hf(model_dir)
        with _Clock() as c:
            _rtn_in_place(m, 4, g, sym)
        return {**c.figures(), **_q(_InMemory(m), ref)}

    ckpt = work / "es-gptq"

    def es_gptq() -> dict[str, Any]:
        cfg = gptq.GPTQConfig(bits=4, group_size=g, sym=True, act_order=args.act_order,
                              damp=args.damp)
        with _Clock() as c:
            gptq.GPTQPass(cfg).run_dir(model_dir, ckpt, ctx())
        plain = gptq_format.dequantize_checkpoint(ckpt, work / "es-gptq-plain")
        return {**c.figures(), **_eval_dir(plain, ref)}

    lib_args = ["--model", str(model_dir), "--calib", str(work / "calib.npy"), "--bits", "4",
                "--group-size", str(g), "--damp", str(args.damp), "--threads",
                str(args.threads), "--batch", "8"]

    def llmc() -> dict[str, Any]:
        out = work / "llmc-plain"
        res = _libvenv.work("llmcompressor", "llmc-gptq", [
            *lib_args, "--out", str(out), *(["--act-order"] if args.act_order else [])])
        return {"seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"],
                "note": res["version"], **_eval_dir(out, ref)}

    def es_awq() -> dict[str, Any]:
        m, _ = load_hf(model_dir)
        with _Clock() as c:
            awq.AWQPass(awq.AWQConfig(bits=4, group_size=g, sym=False)).run(m, ctx())
            _rtn_in_place(m, 4, g, False)
        return {**c.figures(), **_q(_InMemory(m), ref)}

    def gqm_awq() -> dict[str, Any]:
        out = work / "gptqmodel-awq-plain"
        res = _libvenv.work("gptqmodel", "gptqmodel-awq", [*lib_args, "--out", str(out)])
        return {"seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"],
                "note": res["version"], **_eval_dir(out, ref)}

    def gqm_load() -> dict[str, Any]:
        if not (ckpt / "config.json").exists():
            raise RuntimeError("edgesmith's GPTQ row did not run, so there is no checkpoint")
        plain = work / "es-gptq-plain"  # our fake-quantized model is the reference here
        ours = quality.reference(plain, quality.EvalSpec(512, args.windows), work / "ours-ref")
        np.save(work / "windows.npy", ours.windows)
        res = _libvenv.work("gptqmodel", "gptqmodel-logprobs", [
            "--model", str(ckpt), "--plain", str(plain), "--windows", str(work / "windows.npy"),
            "--start",
            str(ours.start), "--out", str(work / "gqm-lp.npy"), "--threads",
            str(args.threads)])
        lps = np.load(work / "gqm-lp.npy", mmap_mode="r")
        return {"seconds": res["load_seconds"],
                "note": f"kernels {','.join(res['kernels'])}; its dequantized weights differ "
                        f"from ours by at most {res['max_weight_diff']:.1e}",
                **_q(_Precomputed(lps), ours)}

    torch.set_num_threads(args.threads)
    _try(rows, f"RTN w4 g{g} sym (anchor)", lambda: rtn(True))
    _try(rows, f"edgesmith GPTQ w4 g{g} sym", es_gptq)
    if not args.skip_libs:
        _try(rows, f"llm-compressor GPTQ w4 g{g} sym", llmc)
    _try(rows, f"RTN w4 g{g} asym (anchor)", lambda: rtn(False))
    _try(rows, f"edgesmith AWQ w4 g{g} asym + RTN", es_awq)
    if not args.skip_libs:
        _try(rows, f"gptqmodel AWQ w4 g{g} asym", gqm_awq)
        _try(rows, "gptqmodel loads edgesmith's GPTQ checkpoint (KLD vs ours)", gqm_load)
    return rows


def print_torch(name: str, rows: dict[str, Any], args: argparse.Namespace) -> None:
    g = next((int(k.split(" g")[1].split()[0]) for k in rows if " g" in k), 128)
    print(f"\n### {name}: torch fake-quantized, {args.samples} x {args.seq_len} calibration "
          f"tokens, damp {args.damp}, act-order {'static' if args.act_order else 'off'}, "
          f"{args.windows} x 512 held-out windows\n")
    print("| method | wall s | CPU s | mean KLD | ppl vs ref | top-1 | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for k, r in rows.items():
        if "error" in r:
            print(f"| {k} | - | - | - | - | - | could not run: {r['error']} |")
        else:
            cpu = f"{r['cpu_seconds']:.1f}" if "cpu_seconds" in r else "-"
            print(f"| {k} | {r['seconds']:.1f} | {cpu} | {r['kld']:.5f} | {r['ppl']:+.2f}% | "
                  f"{100 * r['top1']:.1f}% | {r.get('note', '')} |")

    def ratio(a: str, b: str, key: str, target: float, what: str) -> None:
        ra, rb = rows.get(a, {}), rows.get(b, {})
        if key in ra and key in rb and rb[key] > 0:
            v = ra[key] / rb[key]
            print(f"- {what}: {v:.2f}x (target <= {target}x: "
                  f"{'met' if v <= target else 'MISSED'})")
        else:
            print(f"- {what}: not measured ({ra.get('error') or rb.get('error') or 'skipped'})")

    es, lc = f"edgesmith GPTQ w4 g{g} sym", f"llm-compressor GPTQ w4 g{g} sym"
    ea, ga = f"edgesmith AWQ w4 g{g} asym + RTN", f"gptqmodel AWQ w4 g{g} asym"
    print("\nratios")
    ratio(es, lc, "kld", 1.05, "GPTQ KLD, edgesmith / llm-compressor")
    ratio(es, f"RTN w4 g{g} sym (anchor)", "kld", 0.5, "GPTQ KLD, edgesmith / RTN")
    ratio(es, lc, "cpu_seconds", 1.0, "GPTQ CPU time, edgesmith / llm-compressor")
    ratio(es, lc, "seconds", 1.0, "GPTQ wall time, edgesmith / llm-compressor")
    ratio(ea, ga, "kld", 1.05, "AWQ KLD, edgesmith / gptqmodel")
    ratio(ea, f"RTN w4 g{g} asym (anchor)", "kld", 1.0, "AWQ KLD, edgesmith / RTN asym")
    ratio(ea, ga, "cpu_seconds", 1.0, "AWQ CPU time, edgesmith / gptqmodel")
    ratio(ea, ga, "seconds", 1.0, "AWQ wall time, edgesmith / gptqmodel")
    load = rows.get("gptqmodel loads edgesmith's GPTQ checkpoint (KLD vs ours)", {})
    if "kld" in load:
        print(f"- gptqmodel runs edgesmith's GPTQ checkpoint: mean KLD vs our fake-quantized "
              f"torch model {load['kld']:.2e} (target < 1e-3: "
              f"{'met' if load['kld'] < 1e-3 else 'MISSED'}), top-1 {100 * load['top1']:.1f}%")


# --- GGUF rows ------------------------------------------------------------------------------
def _run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])}... failed: {(p.stderr or p.stdout)[-1500:]}")
    return time.perf_counter() - t0


def _decode_tps(path: Path, threads: int, repeat: int) -> float:
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", "bench", str(path), "--threads",
                        str(threads), "--prompt-tokens", "64", "--gen-tokens", "64",
                        "--repeat", str(repeat), "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-800:])
    return float(json.loads(p.stdout)["metrics"]["decode_tps"]["median"])


def gguf_rows(model_dir: Path, args: argparse.Namespace, work: Path,
              rows: dict[str, Any]) -> dict[str, Any]:
    from edgesmith.bench import quality
    from edgesmith.bench.runners.llama_cpp import LlamaCppRunner
    from edgesmith.export import llamacpp_src

    src = llamacpp_src.source_dir()
    bindir = llamacpp_src.build_tools(("llama-quantize", "llama-imatrix"))
    t = str(args.threads)
    recipe = (HERE.parent / "recipes" / "raspberry-pi-5-gptq-q4_0.yaml").read_text()
    recipe = recipe.replace("samples: 32, seq_len: 512",
                            f"samples: {args.samples}, seq_len: {args.seq_len}")
    recipe = recipe.replace("windows: 8", f"windows: {args.windows}")
    # the benchmark measures every artifact; the recipe's quality gates would withhold one
    recipe = recipe.replace("max_ppl_increase_pct: 12", "max_ppl_increase_pct: 10000")
    recipe = recipe.replace("max_kld: 0.15", "max_kld: 100")
    (work / "gptq-q4_0.yaml").write_text(recipe)

    def es() -> dict[str, Any]:
        out = work / "es-out"
        wall = _run([sys.executable, "-m", "edgesmith.cli", "compress", str(model_dir),
                     "--recipe", str(work / "gptq-q4_0.yaml"), "-o", str(out), "--threads", t,
                     "--force"])
        man = json.loads((out / "manifest.json").read_text())
        return {"path": str(out / man["artifacts"][0]["path"]), "wall": wall,
                "exact": man.get("exact_tensors", {})}

    f16 = work / "lc.F16.gguf"
    calib = work / "calibration.txt"
    calib.write_text(quality.corpus("calibration"))

    def lc(qtype: str) -> dict[str, Any]:
        wall = 0.0
        if not f16.exists():
            wall += _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir),
                          "--outfile", str(f16), "--outtype", "f16"])
        imx = work / "imatrix.gguf"
        if not imx.exists():
            wall += _run([str(bindir / "llama-imatrix"), "-m", str(f16), "-f", str(calib),
                          "-c", str(args.seq_len), "--chunks", str(args.samples), "-t", t,
                          "-o", str(imx)])
        dest = work / f"lci.{qtype}.gguf"
        wall += _run([str(bindir / "llama-quantize"), "--imatrix", str(imx), str(f16),
                      str(dest), qtype, t])
        return {"path": str(dest), "wall": wall}

    _try(rows, "edgesmith GPTQ g32 -> exact Q4_0 blocks (pi-5 recipe)", es)
    _try(rows, "llama.cpp imatrix Q4_0 (anchor)", lambda: lc("Q4_0"))
    _try(rows, "llama.cpp imatrix Q4_K_M (anchor)", lambda: lc("Q4_K_M"))
    ref = quality.reference(model_dir, quality.EvalSpec(512, args.windows),
                            offgrid.refs_dir(model_dir), threads=args.threads)
    for r in list(rows.values()):
        if "path" not in r:
            continue
        sess = LlamaCppRunner().open(Path(r["path"]), threads=args.threads, n_ctx=512,
                                     logits_all=True)
        r.update(_q(sess, ref), size=Path(r["path"]).stat().st_size)
        sess.close()
        if not args.skip_bench:
            try:
                r["tps"] = _decode_tps(Path(r["path"]), args.threads, args.repeat)
            except RuntimeError as e:
                r["tps_error"] = str(e)[-200:]
    return rows


def print_gguf(name: str, rows: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\n### {name}: GGUF in llama.cpp, {args.samples} x {args.seq_len} calibration, "
          f"{args.windows} x 512 held-out windows, decode with {args.threads} threads\n")
    print("| artifact | size MB | mean KLD | ppl vs ref | top-1 | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, r in rows.items():
        if "kld" not in r:
            print(f"| {k} | - | - | - | - | {r.get('error', 'not evaluated (stopped)')} |")
            continue
        tps = f"{r['tps']:.1f}" if "tps" in r else "-"
        print(f"| {k} | {r['size'] / 1e6:.1f} | {r['kld']:.5f} | {r['ppl']:+.2f}% | "
              f"{100 * r['top1']:.1f}% | {tps} |")
    es = rows.get("edgesmith GPTQ g32 -> exact Q4_0 blocks (pi-5 recipe)", {})
    q40 = rows.get("llama.cpp imatrix Q4_0 (anchor)", {})
    q4k = rows.get("llama.cpp imatrix Q4_K_M (anchor)", {})
    print("\nratios")
    if "kld" in es and "kld" in q40:
        v = es["kld"] / q40["kld"]
        print(f"- GPTQ Q4_0 KLD / llama.cpp imatrix Q4_0 = {v:.2f}x at size ratio "
              f"{es['size'] / q40['size']:.3f}x (target <= 0.8x: "
              f"{'met' if v <= 0.8 else 'MISSED'})")
    if "kld" in es and "kld" in q4k:
        print(f"- GPTQ Q4_0 KLD / llama.cpp imatrix Q4_K_M = {es['kld'] / q4k['kld']:.2f}x at "
              f"size ratio {es['size'] / q4k['size']:.3f}x; decode "
              + (f"{es['tps'] / q4k['tps']:.2f}x" if "tps" in es and "tps" in q4k else "-"))
    print("- stretch (GPTQ on the Q4_K grid, a Q4_K_M-sized file <= 0.85x llama.cpp's imatrix "
          "Q4_K_M): not built (issue item 5), no row")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    ap.add_argument("--group-size", type=int, default=0,
                    help="0 (default): 128 where the widths allow it, else 64")
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="edgesmith bench repeats")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-gguf", action="store_true")
    ap.add_argument("--skip-libs", action="store_true", help="no llm-compressor / gptqmodel")
    ap.add_argument("--skip-bench", action="store_true", help="no decode speed")
    ap.add_argument("--models", default="offgrid,tiny,smollm2",
                    help="which of offgrid,tiny,smollm2 to run (torch rows: offgrid, tiny; "
                         "GGUF rows: offgrid, smollm2)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    if args.quick:
        args.samples, args.seq_len, args.windows, args.repeat = 4, 128, 2, 1
    args.groups_used = {}

    from edgesmith import models

    want = set(args.models.split(","))
    if args.quick:
        want &= {"tiny", "smollm2"}
    smol = models.as_hf_dir(models.resolve("builtin:smollm2-135m"), None)
    named = {"offgrid": ("off-grid SmolLM2-135M (cpt)",
                         offgrid.smollm2_offgrid if "offgrid" in want else None),
             "tiny": ("tiny-trained Llama", offgrid.tiny_trained if "tiny" in want else None),
             "smollm2": ("SmolLM2-135M (on-grid: dequantized Q4_1)", lambda: smol)}
    dirs = {k: (label, fn()) for k, (label, fn) in named.items() if k in want and fn}
    work = Path(tempfile.mkdtemp(prefix="es-gptq-libs-"))
    tables: list[tuple[str, str, dict[str, Any]]] = []
    t0 = time.perf_counter()
    try:
        for kind, keys in (("torch", ("offgrid", "tiny")), ("gguf", ("offgrid", "smollm2"))):
            if getattr(args, f"skip_{kind}"):
                continue
            for key in keys:
                if key not in dirs:
                    continue
                name, d = dirs[key]
                print(f"[{kind} rows] {name}", flush=True)
                w = work / f"{kind}-{key}"
                w.mkdir()
                rows: dict[str, Any] = {}  # printed at the end, also when stopped midway
                tables.append((kind, name, rows))
                (torch_rows if kind == "torch" else gguf_rows)(d, args, w, rows)
    finally:
        for kind, name, rows in tables:
            (print_torch if kind == "torch" else print_gguf)(name, rows, args)
        print(f"\ntotal wall {time.perf_counter() - t0:.0f} s; work folder {work}"
              + ("" if args.keep else " (removed)"))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    import signal

    def _stop(*_: Any) -> None:
        raise SystemExit("stopped (SIGTERM)")  # so the tables measured so far are printed

    signal.signal(signal.SIGTERM, _stop)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
