"""Reading an ``.mlpackage`` back on Linux: its spec, its MIL program and its weights.

Core ML's ``predict`` needs macOS, so on Linux a package is checked by what can be read:
the spec (``skip_model_load=True``: inputs, outputs, states), the MIL program (milproto load),
and every weight decompressed from the package (``materialized_val_inference()`` of each
``constexpr_*`` op, the value of each ``const``), mapped back to HF parameter names. The
runner puts those weights into the PyTorch module that was traced, so quality is measured on
the package's weights (an estimate: Core ML computes in fp16 on the device).
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import DependencyError, ModelError

PACKAGE = "model.mlpackage"
WEIGHT_SUFFIXES = ("_gptq", "_quantized", "_palettized", "_sparsified", "_to_fp16")
MIN_WEIGHT = 2048  # coremltools' default weight_threshold: smaller constants stay fp16


def require() -> Any:
    """coremltools, or a one-line error naming the extra."""
    try:
        with quiet():
            import coremltools
    except ImportError as exc:
        raise DependencyError("the Core ML format needs coremltools",
                              "pip install 'edgesmith[coreml]'") from exc
    return coremltools


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """coremltools' import banners, untested-torch warnings and progress bars off stderr."""
    lg = logging.getLogger("coremltools")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        lg.setLevel(level)


def package_path(artifact: Path) -> Path:
    """The ``.mlpackage`` of an artifact (the package itself or the folder holding it)."""
    artifact = Path(artifact)
    if artifact.suffix == ".mlpackage":
        return artifact
    if (artifact / PACKAGE).is_dir():
        return artifact / PACKAGE
    raise ModelError(f"{artifact} holds no {PACKAGE}",
                     "pass a folder written by `edgesmith export --format coreml`")


def model_folder(artifact: Path) -> Path:
    """The folder with config.json and the tokenizer beside the package."""
    pkg = package_path(artifact)
    if (pkg.parent / "config.json").exists():
        return pkg.parent
    raise ModelError(f"no config.json beside {pkg}",
                     "pass the whole folder written by `edgesmith export --format coreml`")


def weight_name_map(param_names: list[str]) -> dict[str, str]:
    """Core ML constant name stem (``model_layers_0_mlp_up_proj_weight``) -> HF name."""
    return {n.replace(".", "_"): n for n in param_names}


def hf_name(op_name: str, names: dict[str, str]) -> str | None:
    stem = op_name
    changed = True
    while changed:
        changed = False
        for suf in WEIGHT_SUFFIXES:
            if stem.endswith(suf):
                stem, changed = stem[: -len(suf)], True
    return names.get(stem)


def load_program(pkg: Path) -> tuple[Any, Any]:
    """(spec, pymil Program) of a package, without Core ML (``skip_model_load``)."""
    ct = require()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    pkg = Path(pkg)
    try:
        with quiet():
            model = ct.models.MLModel(str(pkg), skip_model_load=True)
            spec = model.get_spec()
            prog = milproto_load(model_spec=spec, specification_version=spec.specificationVersion,
                                 file_weights_dir=str(pkg / "Data" / "com.apple.CoreML"
                                                      / "weights"))
    except Exception as exc:
        raise ModelError(f"coremltools cannot read {pkg}: {str(exc).splitlines()[0][:200]}",
                         "re-export it with `edgesmith export --format coreml`") from exc
    return spec, prog


def load_weights_program(pkg: Path) -> Any:
    """The package's program cut down to its constants (``const`` and ``constexpr_*`` ops):
    what ``weights`` reads, loaded in seconds where the whole program's shape inference takes
    minutes for a 30-layer model."""
    ct = require()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    pkg = Path(pkg)
    try:
        with quiet():
            spec = ct.models.MLModel(str(pkg), skip_model_load=True).get_spec()
            fn = spec.mlProgram.functions["main"]
            block = fn.block_specializations[fn.opset]
            keep = [op for op in block.operations
                    if op.type == "const" or op.type.startswith("constexpr_")]
            outs = [op.outputs[0].name for op in keep if op.type.startswith("constexpr_")] or \
                [op.outputs[0].name for op in keep]
            del block.operations[:]
            block.operations.extend(keep)
            del block.outputs[:]
            block.outputs.extend(outs)
            return milproto_load(model_spec=spec, specification_version=spec.specificationVersion,
                                 file_weights_dir=str(pkg / "Data" / "com.apple.CoreML"
                                                      / "weights"))
    except Exception as exc:
        raise ModelError(f"coremltools cannot read the weights of {pkg}: "
                         f"{str(exc).splitlines()[0][:200]}",
                         "re-export it with `edgesmith export --format coreml`") from exc


def describe(spec: Any) -> dict[str, Any]:
    """Inputs, outputs and states of a spec: name -> (data type, shape ranges)."""

    def one(f: Any) -> dict[str, Any]:
        kind = f.type.WhichOneof("Type")
        arr = f.type.multiArrayType if kind == "multiArrayType" else \
            f.type.stateType.arrayType if kind == "stateType" else None
        if arr is None:
            return {"name": f.name, "kind": kind}
        ranges = [[r.lowerBound, r.upperBound] for r in arr.shapeRange.sizeRanges]
        return {"name": f.name, "dtype": type(arr).ArrayDataType.Name(arr.dataType),
                "shape": ranges or [[int(s), int(s)] for s in arr.shape]}

    d = spec.description
    return {"inputs": [one(f) for f in d.input], "outputs": [one(f) for f in d.output],
            "states": [one(f) for f in getattr(d, "state", [])],
            "spec_version": int(spec.specificationVersion),
            "model_type": spec.WhichOneof("Type")}


def weights(prog: Any, param_names: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The package's weights decompressed, by HF name, and each weight's storage op type
    (``const``, ``constexpr_blockwise_shift_scale``, ``constexpr_lut_to_dense``)."""
    names = weight_name_map(param_names)
    out: dict[str, np.ndarray] = {}
    kinds: dict[str, str] = {}
    with quiet():
        for op in prog.functions["main"].operations:
            if op.op_type == "const":
                children = op.outputs[0].child_ops
                if children and all(c.op_type.startswith("constexpr_") for c in children):
                    continue  # the codes/scales of a compressed weight
                val = op.outputs[0].val
            elif op.op_type.startswith("constexpr_"):
                val = op.materialized_val_inference()
            else:
                continue
            name = hf_name(op.name, names)
            if name is None or not isinstance(val, np.ndarray):
                continue
            if name in out:
                raise ModelError(f"{name} is stored twice in the package",
                                 "a tied weight must be one constant: re-export the model")
            out[name], kinds[name] = val, op.op_type
    return out, kinds


def fill_identity_norms(got: dict[str, np.ndarray], param_names: list[str],
                        hidden: int) -> list[str]:
    """Norm weights absent from the package were all ones (coremltools removes a multiply by
    ones as a no-op): put ones back so the program's function is complete; returns them."""
    filled = []
    for name in param_names:
        if name not in got and name.endswith("norm.weight"):
            got[name] = np.ones(hidden, dtype=np.float16)
            filled.append(name)
    return filled

