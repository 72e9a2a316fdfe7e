"""Importance matrix (llama.cpp's "imatrix" technique) computed on calibration text.

For every matrix multiplication y = W x, the importance of input column j is the mean of x_j^2
over the calibration tokens: quantization error in columns that see large activations costs
more, so llama.cpp's quantizers weight their rounding error by it. We collect it with forward
pre-hooks on the reference model's Linear layers (the same statistic llama-imatrix gathers
from ggml's matmul inputs; bf16 where the CPU multiplies it natively, 2.5x faster than fp32).

Each entry is named after the GGUF tensor it weights, and those names come from llama.cpp's
converter itself, not from a table of ours: the converter's own model class for the
checkpoint (its registry, keyed by ``architectures[0]``) is run over the checkpoint with lazy
tensors, so every renaming, fusion (Phi-3's qkv_proj, gate_up_proj), split, permutation or
dropped tensor its per-model code does is what we see, without reading a weight. Each tensor
it would write carries the names of the checkpoint tensors it is made of; a Linear whose weight
is one of them gives that GGUF tensor its statistic (a tied head's is token_embd's). After the
conversion, ``check_against_gguf`` compares the entries with the tensors llama.cpp's quantizer
will quantize in the real GGUF.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgesmith.errors import ModelError, ToolError
from edgesmith.fsutil import atomic_path, sha256_text

NAMING = "converter-v1"  # how entries are named; part of the cache key


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str = Field("builtin:calibration", description="builtin:calibration or a .txt path")
    samples: int = Field(32, ge=1, le=4096)
    seq_len: int = Field(512, ge=16, le=8192)

    def text(self) -> str:
        from edgesmith.bench.quality import corpus

        if self.source == "builtin:calibration":
            return corpus("calibration")
        path = Path(self.source)
        if not path.is_file():
            raise ModelError(f"calibration file {path} does not exist",
                             "use builtin:calibration or a path to a UTF-8 .txt file")
        return path.read_text(encoding="utf-8")


@dataclass
class IMatrix:
    """GGUF tensor name -> mean squared input activation per column."""

    data: dict[str, np.ndarray]
    tokens: int
    chunks: int


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor llama.cpp's converter writes: GGUF name, shape (numpy order, the row length
    last), type, and the checkpoint tensors it is computed from."""

    name: str
    shape: tuple[int, ...]
    type: str
    sources: tuple[str, ...]


# Run in llama.cpp's converter directory, in a subprocess (the converter's bundled gguf-py
# must not replace the installed gguf in this process). It builds the converter's model class
# for the checkpoint as convert_hf_to_gguf.py does, tags every checkpoint tensor with its name
# as the leaf of a lazy tensor, runs prepare_tensors() with a writer that only records, and
# walks each recorded tensor's lazy graph back to the names it came from. No weight is read
# unless the model's own code needs a value.
_PLAN_SCRIPT = r"""
import json, logging, sys
from pathlib import Path
logging.disable(logging.CRITICAL)
src, hf_dir, out = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
sys.path[0:0] = [src, src + "/gguf-py"]
import gguf, torch, conversion
from conversion import LazyTorchTensor, ModelBase, ModelType, get_model_architecture

class Source:
    def __init__(self, name): self.name = name

class Recorder:
    def __init__(self): self.tensors = []
    def add_tensor(self, name, tensor, raw_shape=None, raw_dtype=None, **_):
        self.tensors.append((name, tensor, raw_dtype))
    def __getattr__(self, _name): return lambda *a, **k: None

def sources(t):
    found, seen, stack = set(), set(), [t]
    while stack:
        o = stack.pop()
        if id(o) in seen: continue
        seen.add(id(o))
        if isinstance(o, Source): found.add(o.name)
        elif isinstance(o, gguf.LazyBase): stack.extend((o._args, o._kwargs))
        elif isinstance(o, (list, tuple)): stack.extend(o)
        elif isinstance(o, dict): stack.extend(o.values())
    return sorted(found)

def tagged(name, gen):
    def load():
        t = gen()
        meta = t._meta if isinstance(t, gguf.LazyBase) else LazyTorchTensor.eager_to_meta(t)
        return LazyTorchTensor(meta=meta, args=(t, Source(name)), func=lambda x, _s: x)
    return load

hparams = ModelBase.load_hparams(hf_dir, False)
hf_arch = get_model_architecture(hparams, ModelType.TEXT)
cls = conversion.get_model_class(hf_arch)
with torch.inference_mode():
    model = cls(hf_dir, gguf.LlamaFileType.MOSTLY_F16, hf_dir / "unused.gguf", dry_run=True)
    model.model_tensors = {n: tagged(n, g) for n, g in model.model_tensors.items()}
    model.gguf_writer = Recorder()
    model.prepare_tensors()
tensors = [{"name": n, "shape": [int(d) for d in t.shape], "sources": sources(t),
            "type": getattr(q, "name", str(q))} for n, t, q in model.gguf_writer.tensors]
with open(out, "w") as f:
    json.dump({"hf_arch": hf_arch, "arch": gguf.MODEL_ARCH_NAMES[model.model_arch],
               "tensors": tensors}, f)
"""


def converter_plan(hf_dir: Path, progress: Any = None) -> tuple[str, list[PlannedTensor]]:
    """The GGUF architecture and the tensors llama.cpp's converter writes for ``hf_dir``,
    read from the converter's own code without converting (a few seconds)."""
    from edgesmith.export import llamacpp_src

    src = llamacpp_src.source_dir(progress)
    with tempfile.TemporaryDirectory(prefix="edgesmith-plan-") as tmp:
        out = Path(tmp) / "plan.json"
        proc = subprocess.run([sys.executable, "-c", _PLAN_SCRIPT, str(src), str(hf_dir),
                               str(out)], capture_output=True, text=True, cwd=src, timeout=600)
        if proc.returncode != 0 or not out.exists():
            lines = proc.stderr.strip().splitlines() or ["no output"]
            msg = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1])
            raise ToolError(f"llama.cpp's converter cannot name the tensors of {hf_dir}: "
                            f"{msg.strip()}",
                            "check that llama.cpp supports the architecture (edgesmith doctor "
                            "MODEL), or set imatrix: false in the recipe's gguf_quantize step")
        plan = json.loads(out.read_text())
    return plan["arch"], [PlannedTensor(t["name"], tuple(t["shape"]), t["type"],
                                        tuple(t["sources"])) for t in plan["tensors"]]


def _input_width(module: Any) -> int | None:
    """Width of a matmul module's input: Linear, or transformers' Conv1D (weight in x out)."""
    import torch

    if isinstance(module, torch.nn.Linear):
        return int(module.in_features)
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return int(module.weight.shape[0])
    return None


def _matmul_targets(model: Any, plan: list[PlannedTensor]) -> dict[str, list[Any]]:
    """GGUF tensor name -> the HF matmul modules whose weight it is made of."""
    aliases: dict[int, list[str]] = {}  # a weight -> all its names (a tied head has two)
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    by_source: dict[str, Any] = {}
    for _, module in model.named_modules():
        if _input_width(module) is not None:
            for name in aliases.get(id(module.weight), []):
                by_source[name] = module
    targets: dict[str, list[Any]] = {}
    for t in plan:
        if len(t.shape) < 2 or not t.name.endswith("weight"):
            continue
        mods = list({id(m): m for s in t.sources if (m := by_source.get(s)) is not None}
                    .values())
        for m in mods:
            if _input_width(m) != t.shape[-1]:
                raise ToolError(
                    f"llama.cpp's converter writes {t.name} with rows of {t.shape[-1]} from "
                    f"{', '.join(t.sources)}, whose layer takes inputs of {_input_width(m)}: "
                    "the importance matrix cannot be mapped onto it",
                    "set imatrix: false in the recipe's gguf_quantize step")
        if mods:
            targets[t.name] = mods
    return targets


def compute(model: Any, tokenizer: Any, calib: CalibrationConfig, progress: Any = None,
            hf_dir: Path | None = None) -> IMatrix:
    """Run the calibration chunks through ``model`` (loaded from ``hf_dir``, by default its
    ``name_or_path``) and collect the importance matrix, named as llama.cpp names the tensors."""
    import torch

    hf_dir = Path(hf_dir if hf_dir is not None else getattr(model, "name_or_path", ""))
    if not (hf_dir / "config.json").is_file():
        raise ModelError(f"the importance matrix needs the model's directory; {hf_dir} has no "
                         "config.json", "load the model from its HF directory")
    _, plan = converter_plan(hf_dir, progress)
    targets = _matmul_targets(model, plan)
    sums: dict[Any, torch.Tensor] = {}
    counts: dict[Any, int] = {}

    def collect(module: Any, inputs: tuple[Any, ...]) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
        sq = (x * x).sum(0)
        sums[module] = sums[module] + sq if module in sums else sq
        counts[module] = counts.get(module, 0) + x.shape[0]

    modules = list({id(m): m for mods in targets.values() for m in mods}.values())
    # The output head's input is the decoder's last hidden state: run the decoder alone and
    # hand that to the head's collector, so the largest matmul (hidden x vocabulary for every
    # token) and its logits, which play no part in the statistic, are never computed.
    head = model.get_output_embeddings()
    decoder = model.get_decoder() if any(m is head for m in modules) else None
    hooks = [m.register_forward_pre_hook(collect) for m in modules if m is not head]
    ids = tokenizer(calib.text(), add_special_tokens=False)["input_ids"]
    n_chunks = min(calib.samples, len(ids) // calib.seq_len)
    if n_chunks < 1:
        for h in hooks:
            h.remove()
        raise ModelError(f"calibration text has {len(ids)} tokens, less than one chunk of "
                         f"{calib.seq_len}", "use a longer calibration text or a smaller seq_len")
    task = progress.add_task("importance matrix (calibration)", total=n_chunks) if progress \
        else None
    # bf16 where the CPU multiplies it natively (2.5x faster on 135M with AVX512-BF16): the
    # statistic weights rounding errors, and bf16 activations move it by well under a percent
    bf16 = torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16())
    try:
        with torch.inference_mode(), bf16:
            for i in range(n_chunks):
                chunk = torch.tensor([ids[i * calib.seq_len : (i + 1) * calib.seq_len]])
                if decoder is not None:
                    hidden = decoder(input_ids=chunk, use_cache=False).last_hidden_state
                    collect(head, (hidden,))
                else:
                    model(chunk, use_cache=False)
                if progress is not None:
                    progress.advance(task)
    finally:
        for h in hooks:
            h.remove()
    data = {}
    for name, mods in targets.items():  # a fused tensor: its layers share one input
        total = sum(sums[m] for m in mods)
        data[name] = (total / sum(counts[m] for m in mods)).numpy().astype(np.float32)
    return IMatrix(data, n_chunks * calib.seq_len, n_chunks)


# What llama.cpp's quantizer leaves unquantized (src/llama-quant.cpp,
# tensor_allows_quantization): 1-D tensors, names not ending in "weight", norms, and these.
_KEPT_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup",
                    "laurel", "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight",
                    "indexer.k_proj.weight", "indexer.q_proj.weight", "time_mix_first.weight",
                    "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
                    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight",
                    "time_mix_a0.weight", "time_mix_a1.weight", "time_mix_a2.weight",
                    "time_mix_g1.weight", "time_mix_g2.weight", "time_mix_decay_w1.weight",
                    "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight",
                    "attn_rel_b.weight", ".position_embd", ".rel_pos", ".patch_embd")
_KEPT_NAMES = ("position_embd.weight", "token_types.weight")
# Row-lookup tables: read with get_rows, never a matmul input, so llama-imatrix has no entry
# for them either. token_embd is one unless there is no output.weight (a tied head).
_LOOKUP_TABLES = ("token_embd.weight", "per_layer_token_embd.weight")


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing dimensions of 1 do not count."""
    return max((i + 1 for i, d in enumerate(shape) if d > 1), default=1)


def quantized_tensors(tensors: list[Any]) -> list[Any]:
    """The tensors of a GGUF header that llama.cpp's quantizer quantizes."""
    return [t for t in tensors if _n_dims(t.shape) >= 2 and t.name.endswith("weight")
            and t.name not in _KEPT_NAMES and not any(s in t.name for s in _KEPT_SUBSTRINGS)]


def check_against_gguf(imx: IMatrix, gguf_path: Path) -> None:
    """Check that ``imx`` gives every matmul weight llama.cpp will quantize in ``gguf_path``
    (the unquantized GGUF) its entry, of the right size, and names nothing else; ToolError
    naming the tensors otherwise. llama.cpp would quantize a tensor without an entry silently."""
    from edgesmith.gguf_file import read_header

    tensors = read_header(Path(gguf_path)).tensors
    names = {t.name for t in tensors}
    lookups = set(_LOOKUP_TABLES) - ({"token_embd.weight"} if "output.weight" not in names
                                     else set())
    quantized = {t.name: t for t in quantized_tensors(tensors)}
    missing = sorted(n for n in quantized if n not in imx.data and n not in lookups)
    stray = sorted(n for n in imx.data if n not in quantized)
    wrong = []
    for n, v in sorted(imx.data.items()):
        if n in quantized:
            shape = quantized[n].shape
            want = shape[0] * (shape[2] if len(shape) > 2 else 1)  # ne[0] * experts
            if v.size != want:
                wrong.append(f"{n} ({v.size} values, needs {want})")
    problems = []
    if missing:
        problems.append(f"no entry for {_few(missing)}")
    if stray:
        problems.append(f"entries naming no quantized tensor: {_few(stray)}")
    if wrong:
        problems.append(f"entries of the wrong size: {_few(wrong)}")
    if problems:
        raise ToolError(f"the importance matrix does not match {Path(gguf_path).name}, which "
                        f"llama.cpp will quantize: {'; '.join(problems)}",
                        "set imatrix: false in the recipe's gguf_quantize step to quantize "
                        "without it, and report the model's architecture")


def _few(names: list[str], n: int = 6) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (x86 AMX or AVX512-BF16, Arm BF16); the
    environment variable EDGESMITH_IMATRIX_FP32=1 turns bf16 off."""
    if os.environ.get("EDGESMITH_IMATRIX_FP32") == "1":
        return False
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((ln.split(":", 1)[1].split() for ln in info.splitlines()
                  if ln.startswith(("flags", "Features"))), [])
    return bool({"amx_bf16", "avx512_bf16", "bf16"} & set(flags))


def cache_key(calib: CalibrationConfig) -> str:
    """Key of an importance matrix: the calibration, the precision, how entries are named and
    the llama.cpp whose converter named them."""
    from edgesmith.export import llamacpp_src

    dtype = "bf16" if native_bf16() else "fp32"
    return sha256_text(f"{calib.samples}:{calib.seq_len}:{sha256_text(calib.text())}:{dtype}:"
                       f"{NAMING}:{llamacpp_src.installed_version()}")[:16]


def save(imx: IMatrix, path: Path) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, __tokens__=np.array([imx.tokens, imx.chunks]), **imx.data)


def load(path: Path) -> IMatrix:
    with np.load(path) as z:
        tokens, chunks = (int(v) for v in z["__tokens__"])
        return IMatrix({k: z[k] for k in z.files if k != "__tokens__"}, tokens, chunks)
