"""int4 weights in an exported ONNX model: ``MatMulNBits`` (com.microsoft), written once.

Every Linear's ``MatMul`` becomes ``MatMulNBits`` (4 bits, ``block_size`` columns per scale,
asymmetric, fp32 scales, packed uint8 zero points, no ``accuracy_level``: activations stay fp32
on every runtime, so Python's CPU kernels and the browser compute alike). When the model came
from a GPTQ/AWQ checkpoint, its integer codes and scales are written as they are: the weight is
not quantized again. Only a weight the format cannot hold (bits other than 4/8, act-order
columns out of order) is re-quantized, and named in ``not_written``.

The embedding and the output head dominate a small model's quality and size, so each has its
own choice: ``fp32``, ``fp16`` (stored half, cast after the lookup), ``int8`` (block-32 codes,
looked up with plain Gather ops, so every runtime runs it); the head also ``int4`` or ``tied``
(it reads the embedding's own storage when the model ties them: int8 codes through an 8-bit
``MatMulNBits`` on the very same initializers, or the fp16 table transposed).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ModelError
from edgesmith.fsutil import atomic_dir

MS = "com.microsoft"


@dataclass(frozen=True)
class QuantOptions:
    block_size: int = 32
    embedding: str = "int8"
    head: str = "tied"
    dtype: str = "q4"
    search: bool = False
    int8_layers: tuple[str, ...] = ()

    @property
    def file_name(self) -> str:
        return f"model_{self.dtype}.onnx"


def _pack_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack uint8 values along the last axis, ``8 // bits`` per byte, first value low."""
    if bits == 8:
        return values.astype(np.uint8)
    per = 8 // bits
    pad = (-values.shape[-1]) % per
    if pad:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], pad), values.dtype)], -1)
    v = values.astype(np.uint8).reshape(*values.shape[:-1], -1, per)
    out = np.zeros(v.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= v[..., i] << (bits * i)
    return out


def nbits_tensors(q: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MatMulNBits' B ``[N, blocks, blob]``, scales ``[N, blocks]`` and zero points of a
    QuantizedLinear (codes ``[out=N, in=K]``)."""
    codes = q.codes.numpy().astype(np.uint8)
    n, k = codes.shape
    blocks = k // q.group_size
    b = _pack_rows(codes.reshape(n, blocks, q.group_size), q.bits)
    scales = q.scales.numpy().astype(np.float32)
    zeros = _pack_rows(q.zeros.numpy().astype(np.uint8), q.bits)
    return b, scales, zeros


def _rtn(weight: np.ndarray, bits: int, block: int, name: str, search: bool = False) -> Any:
    """Round-to-nearest codes of a ``[out, in]`` weight, asymmetric with integer zero points
    (0..2^bits-1: MatMulNBits has no GPTQ-v1 ``zero - 1`` constraint). With ``search``, each
    block's range is shrunk by the factor in ``SHRINK`` that gives the least squared error
    (clipping a few outliers buys a finer grid for the rest)."""
    import torch

    from edgesmith.compress.qweights import QuantizedLinear

    w = torch.from_numpy(np.array(weight, dtype=np.float32, copy=True))
    out, k = w.shape
    if k % block:
        raise ModelError(f"{name} has {k} input features, not a multiple of the block {block}",
                         "use block_size 16 or 32")
    x = w.reshape(out, k // block, block)
    maxq = (1 << bits) - 1
    lo0, hi0 = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)
    best_err = best_s = best_z = None
    for f in SHRINK if search else (1.0,):
        lo, hi = lo0 * f, hi0 * f
        scale = ((hi - lo) / maxq).to(torch.float32)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale).clamp(0, maxq)
        codes = torch.clamp(torch.round(x / scale[..., None]) + zero[..., None], 0, maxq)
        err = (((codes - zero[..., None]) * scale[..., None] - x) ** 2).sum(-1)
        if best_err is None:
            best_err, best_s, best_z = err, scale, zero
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, scale, best_s)
            best_z = torch.where(better, zero, best_z)
    codes = torch.clamp(torch.round(x / best_s[..., None]) + best_z[..., None], 0, maxq)
    return QuantizedLinear(codes.reshape(out, k).to(torch.uint8), best_s, best_z.to(torch.uint8),
                           bits, block, False)


SHRINK = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8, 0.775, 0.75)


class _Graph:
    """The model proto with a name -> initializer index and helpers to add nodes."""

    def __init__(self, proto: Any) -> None:
        self.proto = proto
        self.inits = {i.name: i for i in proto.graph.initializer}
        self.counter = 0

    def array(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name])

    def add_init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        self.proto.graph.initializer.append(numpy_helper.from_array(arr, name))
        self.inits[name] = self.proto.graph.initializer[-1]
        return name

    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}/{self.counter}"

    def drop_unused(self) -> None:
        """Remove nodes whose outputs nothing reads, then initializers nothing reads."""
        graph_out = {o.name for o in self.proto.graph.output}
        while True:
            used = {i for n in self.proto.graph.node for i in n.input} | graph_out
            live = [n for n in self.proto.graph.node if any(o in used for o in n.output)]
            if len(live) == len(self.proto.graph.node):
                break
            del self.proto.graph.node[:]
            self.proto.graph.node.extend(live)
        keep = [i for i in self.proto.graph.initializer if i.name in used]
        del self.proto.graph.initializer[:]
        self.proto.graph.initializer.extend(keep)


def _matmul_nbits(g: _Graph, node: Any, prefix: str, b: np.ndarray, scales: np.ndarray,
                  zeros: np.ndarray | None, k: int, n: int, bits: int, block: int) -> Any:
    from onnx import helper

    names = [g.add_init(f"{prefix}.qweight", b), g.add_init(f"{prefix}.scales", scales)]
    if zeros is not None:
        names.append(g.add_init(f"{prefix}.qzeros", zeros))
    return helper.make_node("MatMulNBits", [node.input[0], *names], list(node.output),
                            name=f"{prefix}/MatMulNBits", domain=MS, K=k, N=n, bits=bits,
                            block_size=block)


def _int8_table(weight: np.ndarray, block: int, name: str) -> tuple[np.ndarray, ...]:
    q = _rtn(weight, 8, block, name)
    return nbits_tensors(q)


def _embedding_nodes(g: _Graph, gather: Any, emb: str, opts: QuantOptions,
                     hidden: int) -> tuple[list[Any], dict[str, str]]:
    """Replacement nodes for the embedding lookup; returns them and the names it stored."""
    from onnx import TensorProto, helper

    w = g.array(emb)
    ids = gather.input[1]
    out = gather.output[0]
    if opts.embedding == "fp32":
        return [gather], {"table": emb}
    if opts.embedding == "fp16":
        g.add_init(f"{emb}.fp16", w.astype(np.float16))
        mid = g.fresh(f"{emb}/gather16")
        return [helper.make_node("Gather", [f"{emb}.fp16", ids], [mid], axis=0),
                helper.make_node("Cast", [mid], [out], to=TensorProto.FLOAT)], \
            {"fp16": f"{emb}.fp16"}
    b, scales, zeros = _int8_table(w, opts.block_size, emb)
    qn = g.add_init(f"{emb}.qweight", b)  # [V, blocks, block]
    sn = g.add_init(f"{emb}.scales", scales)  # [V, blocks]
    zn = g.add_init(f"{emb}.qzeros", zeros)
    shape = g.add_init(f"{emb}.shape", np.array([0, 0, hidden], dtype=np.int64))
    axes = g.add_init(f"{emb}.axes", np.array([-1], dtype=np.int64))
    t = {k: g.fresh(f"{emb}/{k}") for k in ("c", "cf", "z", "zf", "zu", "s", "su", "d", "m")}
    nodes = [
        helper.make_node("Gather", [qn, ids], [t["c"]], axis=0),
        helper.make_node("Cast", [t["c"]], [t["cf"]], to=TensorProto.FLOAT),
        helper.make_node("Gather", [zn, ids], [t["z"]], axis=0),
        helper.make_node("Cast", [t["z"]], [t["zf"]], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [t["zf"], axes], [t["zu"]]),
        helper.make_node("Gather", [sn, ids], [t["s"]], axis=0),
        helper.make_node("Unsqueeze", [t["s"], axes], [t["su"]]),
        helper.make_node("Sub", [t["cf"], t["zu"]], [t["d"]]),
        helper.make_node("Mul", [t["d"], t["su"]], [t["m"]]),
        helper.make_node("Reshape", [t["m"], shape], [out]),
    ]
    return nodes, {"qweight": qn, "scales": sn, "qzeros": zn}


def _load(path: Path) -> Any:
    import onnx

    return onnx.load(str(path), load_external_data=True)


def quantize(base: Artifact, dest: Path, opts: QuantOptions, ctx: RunContext) -> Artifact:
    """Write ``dest``: the folder of ``base`` (fp32) with ``onnx/model_q4.onnx`` (int4)."""
    import onnx
    from onnx import TensorProto, helper

    from edgesmith.compress import gptq_format
    from edgesmith.export.onnx import copy_model_files

    t0 = time.perf_counter()
    src = Path(base.path)
    cfg = json.loads((src / "config.json").read_text())
    tied = bool(cfg.get("tie_word_embeddings", False))
    if opts.head == "tied" and not tied:
        opts = dataclasses.replace(opts, head="int8")
    proto = _load(src / "onnx" / "model.onnx")
    g = _Graph(proto)
    ckpt_path = base.meta.get("gptq_checkpoint")
    ckpt = gptq_format.GPTQCheckpoint(Path(ckpt_path)) if ckpt_path else None
    qnames = set(ckpt.quantized_names()) if ckpt else set()
    written: list[str] = []
    not_written: list[dict[str, str]] = []
    tensors: list[dict[str, Any]] = []
    emb_name = next((n for n in g.inits if n.endswith("embed_tokens.weight")), None)
    hidden = int(cfg["hidden_size"])
    new_nodes: list[Any] = []
    stored: dict[str, str] = {}
    # a tied head reads the embedding through a Transpose node (the exporter cannot fold it)
    emb_t = {n.output[0] for n in proto.graph.node if n.op_type == "Transpose" and emb_name
             and n.input[0] == emb_name}
    linears = {n.output[0] for n in proto.graph.node if n.op_type == "MatMul" and (
        (n.input[1].endswith(".weight.T") and n.input[1] in g.inits) or n.input[1] in emb_t)}
    task = ctx.task(f"ONNX {opts.dtype}: MatMulNBits", total=len(linears))
    # the embedding first: a tied head reads its storage
    for node in list(proto.graph.node):
        if node.op_type == "Gather" and emb_name and node.input[0] == emb_name:
            nodes, stored = _embedding_nodes(g, node, emb_name, opts, hidden)
            tensors.append({"name": emb_name, "type": opts.embedding if opts.embedding != "int8"
                            else f"int8-b{opts.block_size}"})
            new_nodes += nodes
            continue
        if node.op_type == "Transpose" and node.output[0] in emb_t:
            continue  # emitted again below only where the head still needs it
        if node.output[0] not in linears:
            new_nodes.append(node)
            continue
        ctx.progress.advance(task)
        if node.input[1] in emb_t:
            hf, wt = "lm_head", g.array(emb_name).T  # tied: [K, N]
            node = helper.make_node("MatMul", [node.input[0], g.fresh("lm_head/wt")],
                                    list(node.output))
            new_nodes.append(helper.make_node("Transpose", [emb_name], [node.input[1]],
                                              perm=[1, 0]))
        else:
            hf = node.input[1][: -len(".weight.T")]
            wt = g.array(node.input[1])  # [K, N]
        k, n = wt.shape
        is_head = n == int(cfg["vocab_size"]) and "lm_head" in hf
        if is_head and opts.head in ("fp32", "fp16", "tied") and not (
                opts.head == "tied" and opts.embedding == "int8"):
            if opts.head == "fp32":
                new_nodes.append(node)
                kind = "fp32"
            elif opts.head == "fp16" or "fp16" not in stored:
                g.add_init(f"{hf}.weight.T.fp16", wt.astype(np.float16))
                mid = g.fresh(f"{hf}/w")
                new_nodes += [helper.make_node("Cast", [f"{hf}.weight.T.fp16"], [mid],
                                               to=TensorProto.FLOAT),
                              helper.make_node("MatMul", [node.input[0], mid], list(node.output))]
                kind = "fp16"
            else:  # tied to the fp16 embedding table [V, H]
                c, tr = g.fresh(f"{hf}/c"), g.fresh(f"{hf}/t")
                new_nodes += [helper.make_node("Cast", [stored["fp16"]], [c], to=TensorProto.FLOAT),
                              helper.make_node("Transpose", [c], [tr], perm=[1, 0]),
                              helper.make_node("MatMul", [node.input[0], tr], list(node.output))]
                kind = "fp16 (tied to the embedding)"
            tensors.append({"name": hf, "type": kind})
            continue
        if is_head and opts.head == "tied":  # the int8 embedding's own codes, 8-bit MatMulNBits
            new_nodes.append(helper.make_node(
                "MatMulNBits", [node.input[0], stored["qweight"], stored["scales"],
                                stored["qzeros"]], list(node.output), name=f"{hf}/MatMulNBits",
                domain=MS, K=k, N=n, bits=8, block_size=opts.block_size))
            tensors.append({"name": hf, "type": f"int8-b{opts.block_size} (tied)"})
            continue
        bits = 8 if (is_head and opts.head == "int8") or hf.endswith(opts.int8_layers) else 4
        q = None
        if hf in qnames:
            q = ckpt.quantized(hf)
            reason = None
            if q.bits not in (4, 8):
                reason = f"{q.bits}-bit codes (MatMulNBits here takes 4 and 8)"
            elif not q.ordinal:
                reason = "act-order columns out of group order"
            elif q.group_size < 16 or q.group_size & (q.group_size - 1):
                reason = f"group size {q.group_size} is not a power of two >= 16"
            if reason:
                not_written.append({"tensor": hf, "hf": hf, "reason": reason})
                q = None
            else:
                written.append(hf)
        if q is None:
            q = _rtn(wt.T, bits, opts.block_size, hf, opts.search)
        b, scales, zeros = nbits_tensors(q)
        new_nodes.append(_matmul_nbits(g, node, hf, b, scales, zeros, k, n, q.bits,
                                       q.group_size))
        tensors.append({"name": hf, "type": f"int{q.bits}-b{q.group_size}",
                        "from": "gptq codes" if hf in written else "rtn"})
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)
    g.drop_unused()
    if not any(op.domain == MS for op in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS, 1))
    missing = sorted(qnames - set(written) - {d["hf"] for d in not_written})
    if missing:
        raise ModelError(f"the GPTQ checkpoint's {missing[0]} has no MatMul in the ONNX graph",
                         "re-export the model from the checkpoint")
    with atomic_dir(Path(dest)) as tmp:
        (tmp / "onnx").mkdir()
        onnx.save_model(proto, str(tmp / "onnx" / opts.file_name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=opts.file_name + "_data",
                        size_threshold=1024)
        copy_model_files(src, tmp)
    return Artifact(Path(dest), "onnx", {
        "type": opts.dtype, "block_size": opts.block_size, "embedding": opts.embedding,
        "head": opts.head, "search": opts.search, "int8_layers": list(opts.int8_layers),
        "tensors": tensors, "written": written, "not_written": not_written,
        "quantize_s": round(time.perf_counter() - t0, 2)})
