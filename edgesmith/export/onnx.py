"""Exporter: a causal LM with its KV cache to ONNX, in the layout transformers.js loads.

Route: ``torch.onnx.export(dynamo=True)`` (torch 2.13 + transformers 5), chosen over
onnxruntime-genai's model builder because its graph is plain ONNX ops that every runtime runs
(onnxruntime on CPU, onnxruntime-web on WebGPU and wasm) and it follows transformers' own
modelling code for every architecture, and over optimum-onnx, which pins transformers < 4.58.
The builder's fused GroupQueryAttention graph is onnxruntime-only.

The graph: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.N.key|value`` (``[batch_size, kv_heads, past_sequence_length, head_dim]``),
outputs ``logits`` and ``present.N.key|value``; batch is dynamic and named ``batch_size``, the
head size static (transformers.js builds the empty cache from these names and shapes).

After the export every initializer that holds a Linear weight (the exporter folds its
transpose, ``[in, out]``) is renamed to ``<hf name>.T`` and the embedding to its HF name, by
matching values, so ``onnx_quant`` can find the weights, and a GPTQ checkpoint's codes, by name.

The folder: ``config.json``, ``generation_config.json``, ``tokenizer.json``,
``tokenizer_config.json`` (and the tokenizer's other files), ``onnx/model.onnx`` +
``onnx/model.onnx_data`` (fp32); ``onnx_quant`` adds ``onnx/model_q4.onnx``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ModelError, ToolError
from edgesmith.fsutil import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "config.json")
# architectures whose transformers modelling code exports with a DynamicCache (tested)
EXPORTABLE = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
              "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Olmo2ForCausalLM",
              "GraniteForCausalLM", "SmolLM3ForCausalLM")
OPSET = 18


class OnnxExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal["fp32", "q4"] = "fp32"
    block_size: Literal[16, 32, 64, 128] = 32
    embedding: Literal["fp32", "fp16", "int8"] = "int8"
    head: Literal["fp32", "fp16", "int8", "int4", "tied"] = "tied"
    # round-to-nearest with a per-block range search (least squared error) for the weights
    # no torch-side pass quantized; off by default: on SmolLM2 it lowered KLD 9% but raised
    # perplexity (+25% vs +21%) and takes 10x the time
    search: bool = False
    # Linears (name suffixes, e.g. mlp.down_proj) kept at 8 bits, as Q4_K_M keeps some at Q6_K
    int8_layers: list[str] = []


def versions() -> str:
    """The exporter's identity for cache keys: torch, transformers, onnx, onnxscript."""
    import onnx
    import onnxscript
    import torch
    import transformers

    return (f"torch-{torch.__version__}.tf-{transformers.__version__}.onnx-{onnx.__version__}"
            f".onnxscript-{onnxscript.__version__}")


def _require() -> None:
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise ToolError(f"the ONNX exporter needs {', '.join(missing)}",
                        "pip install 'edgesmith[onnx]'")


class _WithCache:
    """Wraps a causal LM so its KV cache is flat tensors in and out (dynamo exports those)."""

    def __new__(cls, model: Any, n_layers: int) -> Any:
        import torch
        from transformers import DynamicCache

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.m = model

            def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any,
                        past: tuple[Any, ...]) -> tuple[Any, ...]:
                cache = DynamicCache(config=self.m.config)
                for i in range(n_layers):
                    cache.update(past[2 * i], past[2 * i + 1], i)
                out = self.m(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
                present: list[Any] = []
                for layer in out.past_key_values.layers:
                    present += [layer.keys, layer.values]
                return (out.logits, *present)

        return Wrapped()


def kv_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv heads, head dim) of an HF config."""
    n_layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    return n_layers, kv, head_dim


def _digest(t: Any) -> str:
    import numpy as np

    arr = np.ascontiguousarray(t.detach().float().numpy())
    return hashlib.sha256(arr.tobytes()).hexdigest() + str(arr.shape)


def _rename_weights(proto: Any, model: Any) -> dict[str, str]:
    """Rename the initializers holding Linear weights (transposed) and the embedding to their
    HF names; returns {new name: hf parameter name}."""
    import torch
    from onnx import numpy_helper

    wanted: dict[str, str] = {}
    emb = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            wanted.setdefault(_digest(mod.weight.T), f"{name}.weight.T")
    emb_name = next(n for n, p in model.named_parameters() if p is emb.weight) \
        if any(p is emb.weight for _, p in model.named_parameters()) else "embed_tokens.weight"
    wanted.setdefault(_digest(emb.weight), emb_name)
    shapes = {tuple(int(s) for s in d.split("(")[1].rstrip(")").split(",") if s.strip())
              for d in wanted}
    renamed: dict[str, str] = {}
    mapping: dict[str, str] = {}
    for init in proto.graph.initializer:
        if tuple(init.dims) not in shapes:
            continue
        arr = numpy_helper.to_array(init)
        new = wanted.get(hashlib.sha256(arr.astype("float32").tobytes()).hexdigest()
                         + str(tuple(arr.shape)))
        if new and new not in renamed.values():
            mapping[init.name] = new
            renamed[new] = new.removesuffix(".T")
            init.name = new
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
    return renamed


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx's own warnings (torchvision ops it skips, axis renames) off stderr."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo",
                                              "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def check_exportable(config: dict[str, Any]) -> None:
    archs = config.get("architectures") or []
    if not any(a in EXPORTABLE for a in archs):
        raise ModelError(f"the ONNX exporter does not cover {archs[0] if archs else 'this model'}",
                         f"it exports: {', '.join(EXPORTABLE)}")


def export_fp32(hf_dir: Path, dest: Path, ctx: RunContext) -> dict[str, Any]:
    """Export ``hf_dir`` (a plain safetensors HF model) to the fp32 folder ``dest``."""
    _require()
    import onnx
    import torch
    from torch.export import Dim

    from edgesmith.models import load_hf

    check_exportable(json.loads((Path(hf_dir) / "config.json").read_text()))
    task = ctx.task("export ONNX (torch.onnx dynamo)", total=3)
    t0 = time.perf_counter()
    model, _tok = load_hf(hf_dir)
    model.config.use_cache = True
    n_layers, kv, head_dim = kv_shape(model.config)
    ctx.progress.advance(task)
    b, s = Dim("batch_size"), Dim("sequence_length")
    p, t = Dim("past_sequence_length"), Dim("total_sequence_length")
    past_len, seq = 2, 3
    args = (torch.zeros((1, seq), dtype=torch.long),
            torch.ones((1, past_len + seq), dtype=torch.long),
            torch.arange(past_len, past_len + seq)[None],
            tuple(torch.zeros((1, kv, past_len, head_dim)) for _ in range(2 * n_layers)))
    kv_names = [f"{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    wrapped = _WithCache(model, n_layers)
    try:
        with torch.no_grad(), _quiet():
            prog = torch.onnx.export(
                wrapped, args, dynamo=True, opset_version=OPSET, verbose=False,
                input_names=["input_ids", "attention_mask", "position_ids",
                             *(f"past_key_values.{n}" for n in kv_names)],
                output_names=["logits", *(f"present.{n}" for n in kv_names)],
                dynamic_shapes=({0: b, 1: s}, {0: b, 1: t}, {0: b, 1: s},
                                tuple({0: b, 2: p} for _ in range(2 * n_layers))))
    except Exception as exc:
        raise ToolError(f"torch.onnx.export failed for {hf_dir}: {str(exc).splitlines()[0][:300]}",
                        "this architecture's modelling code does not export; try --format gguf"
                        ) from exc
    ctx.progress.advance(task)
    proto = prog.model_proto
    renamed = _rename_weights(proto, model)
    del prog, model
    with atomic_dir(dest) as tmp:
        (tmp / "onnx").mkdir()
        onnx.save_model(proto, str(tmp / "onnx" / "model.onnx"), save_as_external_data=True,
                        all_tensors_to_one_file=True, location="model.onnx_data",
                        size_threshold=1024)
        copy_model_files(Path(hf_dir), tmp)
    ctx.progress.advance(task)
    return {"type": "fp32", "export_s": round(time.perf_counter() - t0, 2),
            "layers": n_layers, "kv_heads": kv, "head_dim": head_dim,
            "named_weights": len(renamed), "exporter": versions()}


def copy_model_files(hf_dir: Path, dest: Path) -> None:
    """config.json, generation_config.json and the tokenizer files beside the ONNX folder."""
    if not (hf_dir / "tokenizer.json").exists():
        raise ModelError(f"{hf_dir} has no tokenizer.json (a fast tokenizer)",
                         "the browser loads tokenizer.json: save the model's fast tokenizer")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).exists():
            shutil.copy2(hf_dir / name, dest / name)
    cfg = json.loads((dest / "config.json").read_text())
    cfg.pop("quantization_config", None)  # the ONNX folder is not a GPTQ checkpoint
    cfg["use_cache"] = True
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if not (dest / "generation_config.json").exists():
        gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
        (dest / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


class OnnxExporter:
    """Exporter plug point: ``export(hf_dir, ctx, dest) -> Artifact`` (a folder)."""

    name = "onnx"
    format = "onnx"
    layout = "folder"
    Config = OnnxExportConfig

    def __init__(self, config: OnnxExportConfig | None = None) -> None:
        self.config = config or OnnxExportConfig()

    @staticmethod
    def version() -> str:
        return versions()

    def artifact_type(self) -> str:
        return self.config.dtype

    @staticmethod
    def cache_path(cache_dir: Path, hf_dir: Path, kind: str) -> Path:
        """Where an export of ``hf_dir`` is cached (the run cache is per input model): shared by
        ``compress`` and ``export``, keyed by the exporter's tools."""
        tag = hashlib.sha256(versions().encode()).hexdigest()[:12]
        return Path(cache_dir) / f"onnx-{kind}.{Path(hf_dir).name}.{tag}"

    @staticmethod
    def published_names(model_name: str, final_type: str) -> list[str]:
        """What a compress run writes into -o: the transformers.js layout, flat (the model
        file first)."""
        main = "model.onnx" if final_type == "fp32" else f"model_{final_type}.onnx"
        return [f"onnx/{main}", "onnx", *TOKENIZER_FILES]

    def export(self, hf_dir: Path, ctx: RunContext, dest: Path | None = None) -> Artifact:
        from edgesmith.compress import gptq_format
        from edgesmith.export import onnx_quant
        from edgesmith.export.gguf import plain_dir

        dest = Path(dest or ctx.cache_dir / "onnx-fp32")
        source = Path(hf_dir)
        checkpoint = source if gptq_format.is_gptq_dir(source) else None
        plain = plain_dir(source) if checkpoint else source
        if self.config.dtype == "fp32":
            meta = export_fp32(plain, dest, ctx)
            if checkpoint:
                meta["gptq_checkpoint"] = str(checkpoint)
            return Artifact(dest, "onnx", meta)
        fp32 = self.cache_path(ctx.cache_dir, source, "fp32")
        meta = export_fp32(plain, fp32, ctx) if not (fp32 / "onnx" / "model.onnx").exists() \
            else {"type": "fp32"}
        base = Artifact(fp32, "onnx", {**meta, "gptq_checkpoint": str(checkpoint)
                                       if checkpoint else None})
        return onnx_quant.quantize(base, dest, onnx_quant.QuantOptions(
            block_size=self.config.block_size, embedding=self.config.embedding,
            head=self.config.head, search=self.config.search,
            int8_layers=tuple(self.config.int8_layers)), ctx)
