"""Format-side pass: an exported fp16 ``.mlpackage``'s weights compressed for the iPhone.

Modes (``coremltools.optimize.coreml``, iOS 18 ops):
- ``int8``: linear symmetric int8, one scale per output channel
  (``constexpr_blockwise_shift_scale``);
- ``int4``: linear int4 per block of ``block_size`` input columns (asymmetric, int4 offsets);
  the embedding (and a head tied to it) int8 per channel unless ``embedding: int4``;
- ``palettize4``: 4-bit k-means look-up tables per group of 16 output channels
  (``constexpr_lut_to_dense``; the Neural Engine's preferred form; needs scikit-learn, slow);
- ``sparse``: the zeros an unstructured ``prune`` step left stored as a bit mask and the other
  values as fp16 (``constexpr_sparse_to_dense``: 16 x (1 - s) + 1 bits a weight at sparsity s,
  lossless); ``sparse_int8``: the same mask with the non-zero values int8 per channel (joint
  compression, 8 x (1 - s) + 1 bits). A weight with under ``min_sparsity`` zeros stays dense
  (fp16, or int8 for ``sparse_int8``). This is where unstructured sparsity pays: GGUF and ONNX
  store every zero.

When the recipe ran GPTQ/AWQ, the checkpoint's own integer codes, zero points and fp16 scales
are written as ``constexpr_blockwise_shift_scale`` constants (uint codes, uint offsets): the
weight is quantized once. Only a tensor Core ML cannot hold that way (act-order groups out of
column order, a group that does not divide the row) is re-quantized, named in ``not_written``.
The result is read back (milproto) and every weight compared with what was meant.
"""

from __future__ import annotations

import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from edgesmith.compress.format_pass import FormatPass
from edgesmith.context import Artifact, RunContext
from edgesmith.export import coreml_package as pkgio
from edgesmith.fsutil import atomic_dir


class CoreMLCompressConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mode: Literal["int8", "int4", "palettize4", "sparse", "sparse_int8"] = "int8"
    block_size: Literal[16, 32, 64, 128] = 32
    # the embedding (and a tied head): int8 per channel keeps a small model usable
    embedding: Literal["int8", "int4", "fp16"] = "int8"
    # sparse modes: a weight with a smaller fraction of exact zeros is stored dense
    min_sparsity: float = Field(0.2, ge=0.0, lt=1.0)


LABELS = {"int8": "int8-per-channel", "int4": "int4-b{b}", "palettize4": "lut4-g16",
          "fp16": "fp16", "sparse": "sparse-fp16", "sparse_int8": "sparse-int8"}
SPARSE = ("sparse", "sparse_int8")


def _op_config(mode: str, block_size: int) -> Any:
    import coremltools.optimize.coreml as cto

    if mode in SPARSE:  # the zeros already there (a prune step made them), nothing new
        return cto.OpThresholdPrunerConfig(threshold=1e-30, minimum_sparsity_percentile=0.0,
                                           weight_threshold=pkgio.MIN_WEIGHT)
    if mode == "int8":
        return cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8",
                                           granularity="per_channel")
    if mode == "int4":
        return cto.OpLinearQuantizerConfig(mode="linear", dtype="int4",
                                           granularity="per_block", block_size=block_size)
    return cto.OpPalettizerConfig(nbits=4, mode="kmeans", granularity="per_grouped_channel",
                                  group_size=16)


def _gptq_pass(codes: dict[str, Any]) -> Any:
    """A graph pass writing each named const as the GPTQ codes (uint), zeros and scales."""
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types
    from coremltools.converters.mil.mil.passes.defs.quantization import (
        AbstractQuantizationPass,
    )

    class WriteCodes(AbstractQuantizationPass):  # type: ignore[misc]
        def is_valid_op(self, op: Any) -> bool:
            return op.op_type == "const" and op.name in codes

        def transform_op(self, op: Any) -> None:
            q = codes[op.name]
            dt = types.np_uint4_dtype if q.bits == 4 else np.uint8
            new = mb.constexpr_blockwise_shift_scale(
                data=q.codes.numpy().astype(dt), scale=q.scales.numpy().astype(np.float16),
                offset=q.zeros.numpy().astype(dt), before_op=op, name=op.name + "_gptq")
            op.enclosing_block.replace_uses_of_var_after_op(
                anchor_op=op, old_var=op.outputs[0], new_var=new, no_check_var_types=True)
            op.enclosing_block.remove_ops([op])

    return WriteCodes()


def _reason(q: Any, cols: int) -> str | None:
    if q.bits not in (4, 8):
        return f"{q.bits}-bit codes (Core ML blockwise constants here take 4 and 8)"
    if not q.ordinal:
        return "act-order columns out of group order"
    if cols % q.group_size:
        return f"group size {q.group_size} does not divide {cols} columns"
    return None


def _sparse_check(names: list[str], consts: dict[str, Any], exact: bool,
                  got: dict[str, Any], kinds: dict[str, str]) -> dict[str, Any]:
    """Every weight chosen for sparse storage (``got``/``kinds``: the package read back) is a
    ``constexpr_sparse_to_dense`` that reads back zero wherever the exported weight was zero;
    with ``exact`` (fp16 values) nowhere else (int8 values may round a tiny non-zero to zero:
    counted, not an error)."""
    bad, zeros, extra = [], [], 0
    for n in names:
        was = consts[n].outputs[0].val == 0
        now = got[n] == 0 if n in got else None
        if kinds.get(n) != "constexpr_sparse_to_dense" or now is None or not np.all(now[was]) \
                or (exact and not np.array_equal(now, was)):
            bad.append(n)
            continue
        zeros.append(float(np.mean(was)))
        extra += int(np.sum(now & ~was))
    if not names:
        detail = "no weight reached min_sparsity: run an unstructured prune step first"
    elif zeros:
        detail = f"{len(zeros)} weights sparse, mean sparsity {np.mean(zeros):.1%}"
        if not exact:
            detail += f", {extra} non-zeros rounded to zero by int8"
    else:
        detail = "no sparse weight read back right"
    if bad:
        detail += f"; wrong: {bad[:3]}"
    return {"name": "pruned zeros stored as a sparse mask, read back in place",
            "passed": bool(names) and not bad, "detail": detail}


def compress(base: Artifact, dest: Path, config: CoreMLCompressConfig,
             ctx: RunContext) -> Artifact:
    """Write ``dest``: the folder of ``base`` (fp16) with its package compressed."""
    import coremltools.optimize.coreml as cto
    import torch
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass

    from edgesmith.compress import gptq_format
    from edgesmith.export.coreml import package_checks

    ct = pkgio.require()
    t0 = time.perf_counter()
    src = Path(base.path)
    pkg = pkgio.package_path(src)
    prog = pkgio.load_weights_program(pkg)
    cfg = json.loads((src / "config.json").read_text())
    task = ctx.task(f"Core ML {config.mode}: compress weights", total=2)
    # which const holds which HF weight (the export names them after the parameters)
    from edgesmith.export.coreml_llama import CoreMLLlama, spec_of

    shell = CoreMLLlama(spec_of(cfg), 2, False)
    param_names = [n for n, _ in shell.named_parameters()]
    names = pkgio.weight_name_map(param_names)
    consts = {pkgio.hf_name(op.name, names): op for op in prog.functions["main"].operations
              if op.op_type == "const" and pkgio.hf_name(op.name, names)}
    ckpt_path = base.meta.get("gptq_checkpoint")
    ckpt = gptq_format.GPTQCheckpoint(Path(ckpt_path)) if ckpt_path else None
    gptq: dict[str, Any] = {}
    written: list[str] = []
    not_written: list[dict[str, str]] = []
    for hf in ckpt.quantized_names() if ckpt else []:
        weight = f"{hf}.weight"
        if weight not in consts:
            not_written.append({"tensor": weight, "hf": hf, "reason": "no constant of that "
                                "name in the package"})
            continue
        q = ckpt.quantized(hf)
        reason = _reason(q, int(consts[weight].outputs[0].shape[-1]))
        if reason:
            not_written.append({"tensor": weight, "hf": hf, "reason": reason})
            continue
        gptq[consts[weight].name] = q
        written.append(hf)
    emb = "model.embed_tokens.weight"
    sparse = config.mode in SPARSE
    op_cfg = _op_config(config.mode, config.block_size)
    # a sparse mode's dense weights: fp16, or int8 for sparse_int8
    dense_mode = "int8" if config.mode == "sparse_int8" else "fp16"
    dense_cfg = _op_config("int8", config.block_size) if dense_mode == "int8" else None
    emb_cfg = None if config.embedding == "fp16" else op_cfg if config.embedding == \
        config.mode else _op_config(config.embedding, config.block_size)
    by_name: dict[str, Any] = {}
    tensors: list[dict[str, Any]] = []
    for hf, op in consts.items():
        if op.name in gptq:
            q = gptq[op.name]
            tensors.append({"name": hf, "type": f"uint{q.bits}-b{q.group_size}",
                            "from": "gptq codes"})
            continue
        val = op.outputs[0].val
        if val is None or val.size < pkgio.MIN_WEIGHT:
            continue
        row: dict[str, Any] = {"name": hf}
        if hf == emb:
            chosen, mode = emb_cfg, "fp16" if emb_cfg is None else config.embedding
        elif sparse:
            row["sparsity"] = round(float(np.mean(val == 0)), 4)
            chosen, mode = (op_cfg, config.mode) if row["sparsity"] >= config.min_sparsity \
                else (dense_cfg, dense_mode)
        else:
            chosen, mode = op_cfg, config.mode
        by_name[op.name] = chosen
        tensors.append({**row, "type": LABELS[mode].format(b=config.block_size),
                        "from": "rtn" if mode.startswith("int") else mode})
    ctx.progress.advance(task)
    passes: list[Any] = []
    if gptq:
        passes.append(_gptq_pass(gptq))
    def _fresh(registered: str, options: dict[str, Any]) -> Any:
        # a pass instance of our own: the registry's is shared, and its options would be too
        p = type(PASS_REGISTRY[registered])()
        p.set_options([PassOption(k, v) for k, v in options.items()])
        return p

    for registered, kind in (("compression::linear_quantize_weights", cto.OpLinearQuantizerConfig),
                             ("compression::palettize_weights", cto.OpPalettizerConfig),
                             ("compression::prune_weights", cto.OpThresholdPrunerConfig)):
        chosen = {k: v for k, v in by_name.items() if isinstance(v, kind)}
        if chosen:
            passes.append(_fresh(registered, {"config": cto.OptimizationConfig(
                global_config=None, op_name_configs=chosen)}))
    if config.mode == "sparse_int8" and any(isinstance(v, cto.OpThresholdPrunerConfig)
                                            for v in by_name.values()):
        # the non-zero values of the sparse weights, int8 per channel (joint compression: only
        # a sparse weight's data is still uncompressed at this point)
        passes.append(_fresh("compression::linear_quantize_weights", {
            "config": cto.OptimizationConfig(global_config=_op_config("int8", config.block_size)),
            "joint_compression": True}))
    with pkgio.quiet():
        mlmodel = ct.models.MLModel(str(pkg), skip_model_load=True)
        out = _apply_graph_pass(mlmodel, passes, spec_version=mlmodel.get_spec()
                                .specificationVersion, skip_model_load=True) if passes \
            else mlmodel
    ctx.progress.advance(task)
    with atomic_dir(Path(dest)) as tmp:
        with pkgio.quiet():
            out.save(str(tmp / pkgio.PACKAGE))
        for f in src.iterdir():
            if f.name != pkgio.PACKAGE and f.is_file():
                shutil.copy2(f, tmp / f.name)
        expected = None
        if gptq:  # the codes must come back as the checkpoint's own dequantized values
            expected = {hf: (gptq[consts[hf].name].dequantize().to(torch.float16).float()
                             .numpy()) for hf in (f"{h}.weight" for h in written)}
        sparse_names = [t["name"] for t in tensors if t["from"] in SPARSE]
        if config.mode == "sparse":  # lossless: the fp16 values themselves
            expected = {hf: consts[hf].outputs[0].val for hf in sparse_names}
        more = functools.partial(_sparse_check, sparse_names, consts,
                                 config.mode == "sparse") if sparse else None
        named = {"expected_name": "GPTQ codes decompressed from the package equal the "
                                  "checkpoint's weights (fp16 rounding)"} if gptq else {}
        checks = package_checks(tmp / pkgio.PACKAGE, bool(base.meta.get("stateful", True)),
                                param_names, expected, more, **named)
    return Artifact(Path(dest), "coreml", {
        "type": config.mode, "block_size": config.block_size, "embedding": config.embedding,
        "kv_cache": base.meta.get("kv_cache"), "stateful": base.meta.get("stateful"),
        "context": base.meta.get("context"), "target": "iOS18",
        "tensors": tensors, "written": written, "not_written": not_written,
        "checks": [*base.meta.get("checks", [])[:1], *checks],
        "quantize_s": round(time.perf_counter() - t0, 2)})


class CoreMLCompressPass(FormatPass):
    """Format-side Pass plug point: ``run(artifact, ctx) -> Artifact``."""

    name = "coreml_compress"
    Config = CoreMLCompressConfig
    formats = ("coreml",)
    type_field = "mode"

    def run(self, artifact: Artifact, ctx: RunContext) -> Artifact:
        return compress(artifact, self.dest(artifact, ctx), self.config, ctx)
