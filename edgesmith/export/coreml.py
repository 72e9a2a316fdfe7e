"""Exporter: a causal LM to a Core ML ``mlprogram`` ``.mlpackage`` (iOS 18), for iPhone apps.

Route: the HF weights in the small generic decoder of ``coreml_llama`` (transformers' own
modelling code does not trace cleanly), checked against transformers on the same tokens,
``torch.jit.trace`` and ``coremltools.convert`` (fp16 compute and weights, iOS 18 target).
The KV cache is a Core ML state (``ct.StateType``) where it converts: inputs ``input_ids``
(int32 ``[1, S]``) and ``causal_mask`` (fp16 ``[1, 1, S, T]``, 0 where visible, -inf/-1e4
where not; T - S tokens are cached), states ``key_cache``/``value_cache`` (fp16
``[layers, 1, kv_heads, context, head_dim]``), output ``logits`` (fp16 ``[1, S, vocab]``).
Where the stateful conversion fails, a fixed-context model without a cache (input
``input_ids`` only, the whole sequence each call); ``meta["kv_cache"]`` says which.
A tied embedding/head is one constant in the package, read by the gather and the head.

The folder: ``model.mlpackage`` and beside it ``config.json``, ``generation_config.json`` and
the tokenizer files; ``coreml_compress`` writes the compressed package the same way.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from edgesmith.context import Artifact, RunContext
from edgesmith.errors import ToolError
from edgesmith.export import coreml_package as pkgio
from edgesmith.fsutil import atomic_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json", "config.json")
MAX_LOGIT_DIFF = 1e-3  # the traced module vs transformers, fp32, same tokens


class CoreMLExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # fp16: the baseline; the others run coreml_compress on it (int8 per-channel linear,
    # int4 per-block linear, 4-bit k-means palettization)
    dtype: Literal["fp16", "int8", "int4", "palettize4"] = "fp16"
    block_size: Literal[16, 32, 64, 128] = 32
    context: int = 2048  # positions of the KV cache (or of the fixed-context model)
    stateful: bool = True  # the KV cache as Core ML states; False: a fixed-context model


def versions() -> str:
    ct = pkgio.require()
    import torch

    return f"coremltools-{ct.__version__}.torch-{torch.__version__}"


def check_exportable(hf_dir: Path, context: int) -> None:
    """Refuse an architecture the decoder does not cover (seconds, before any work)."""
    from edgesmith.export.coreml_llama import spec_of

    spec_of(json.loads((Path(hf_dir) / "config.json").read_text()), context)


GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def doctor_checks(ref: Any, context: int = 2048) -> list[Any]:
    """``edgesmith doctor``'s checks for the coreml format (header-only, seconds): the
    architecture the decoder covers, coremltools installed."""
    from edgesmith.doctor import Check
    from edgesmith.errors import EdgesmithError
    from edgesmith.export.coreml_llama import COVERED

    checks = []
    if ref.kind == "gguf":
        arch = GGUF_ARCHS.get(ref.architecture())
        ok = arch is not None
        detail = f"{ref.architecture()} -> {arch}" if ok else \
            f"GGUF architecture {ref.architecture()} is not covered"
    else:
        try:
            check_exportable(ref.path, context)
            ok, detail = True, f"{ref.architecture()} traces with the Core ML decoder"
        except EdgesmithError as exc:
            ok, detail = False, exc.message
    checks.append(Check("coreml", "architecture", "ok" if ok else "fail", detail,
                        "" if ok else f"it exports {', '.join(COVERED)}; use --format gguf"))
    try:
        pkgio.require()
        checks.append(Check("coreml", "coremltools", "ok", versions()))
    except EdgesmithError as exc:
        checks.append(Check("coreml", "coremltools", "fail", exc.message, exc.hint))
    return checks


def _against_transformers(module: Any, hf_dir: Path) -> dict[str, Any]:
    """Max |logit difference| of the module (stateless) vs transformers on 32 tokens."""
    import torch

    from edgesmith.models import load_hf

    ref, _ = load_hf(hf_dir)
    vocab = int(module.s.vocab)
    ids = torch.tensor([[(i * 7919 + 13) % vocab for i in range(32)]])
    with torch.no_grad():
        diff = float((ref(ids).logits[0] - module(ids)[0]).abs().max())
    del ref
    return {"name": "traced module matches transformers (fp32 logits, 32 tokens)",
            "passed": diff <= MAX_LOGIT_DIFF, "detail": f"max |diff| {diff:.2e}"}


def _convert(module: Any, context: int, stateful: bool) -> Any:
    import numpy as np
    import torch

    ct = pkgio.require()
    ids = torch.zeros((1, 4), dtype=torch.int32)
    inputs = [ct.TensorType(name="input_ids", shape=(1, ct.RangeDim(1, context)),
                            dtype=np.int32)]
    states = None
    example: tuple[Any, ...] = (ids,)
    if stateful:
        example = (ids, torch.zeros((1, 1, 4, 4)))
        inputs.append(ct.TensorType(name="causal_mask", shape=(
            1, 1, ct.RangeDim(1, context), ct.RangeDim(1, context)), dtype=np.float16))
        shape = tuple(module.key_cache.shape)
        states = [ct.StateType(wrapped_type=ct.TensorType(shape=shape, dtype=np.float16),
                               name=n) for n in ("key_cache", "value_cache")]
    with torch.no_grad(), pkgio.quiet():
        traced = torch.jit.trace(module, example)
        if stateful:  # tracing wrote into the cache buffers
            module.key_cache.zero_()
            module.value_cache.zero_()
        # no const_deduplication: it would merge equal weights (norms initialised to one)
        # into one constant under one parameter's name, and the read-back names them all
        pipeline = ct.PassPipeline.DEFAULT
        pipeline.remove_passes({"common::const_deduplication"})
        return ct.convert(traced, inputs=inputs, states=states, pass_pipeline=pipeline,
                          outputs=[ct.TensorType(name="logits", dtype=np.float16)],
                          minimum_deployment_target=ct.target.iOS18, convert_to="mlprogram",
                          compute_precision=ct.precision.FLOAT16, skip_model_load=True)


def package_checks(pkg: Path, stateful: bool, param_names: list[str],
                   expected: dict[str, Any] | None = None,
                   more: Callable[[dict[str, Any], dict[str, str]], dict[str, Any]] | None = None,
                   expected_name: str = "weights decompressed from the package equal those "
                                        "meant (fp16 rounding)") -> list[dict[str, Any]]:
    """What Linux can check of a package: spec + MIL program load, the app-facing interface,
    and (``expected``: HF name -> the fp32 value meant; its check named ``expected_name``) the
    weights read back; ``more`` is one more check computed from the same read-back (weights by
    HF name, their storage op types)."""
    import numpy as np

    spec, prog = pkgio.load_program(pkg)
    d = pkgio.describe(spec)
    ins = [i["name"] for i in d["inputs"]]
    want_in = ["input_ids", "causal_mask"] if stateful else ["input_ids"]
    want_st = ["key_cache", "value_cache"] if stateful else []
    iface_ok = (ins == want_in and [o["name"] for o in d["outputs"]] == ["logits"]
                and [s["name"] for s in d["states"]] == want_st
                and d["model_type"] == "mlProgram")
    checks = [
        {"name": "spec and MIL program load (skip_model_load)", "passed": True,
         "detail": f"mlProgram, specification version {d['spec_version']}"},
        {"name": "inputs/outputs/states an app expects", "passed": iface_ok,
         "detail": f"inputs {ins}, outputs {[o['name'] for o in d['outputs']]}, "
                   f"states {[s['name'] for s in d['states']]}"},
    ]
    got, kinds = pkgio.weights(prog, param_names)
    ones = pkgio.fill_identity_norms(got, param_names, int(spec_hidden(got)))
    missing = sorted(set(param_names) - set(got))
    wrong_ones = [n for n in ones if expected is not None and n in expected
                  and not np.all(np.asarray(expected[n]) == 1)]
    checks.append({"name": "every weight is in the package, a tied head once",
                   "passed": not missing and not wrong_ones,
                   "detail": f"{len(got) - len(ones)} weights stored"
                             + (f", {len(ones)} all-ones norm weights folded away" if ones
                                else "")
                             + (f"; missing {missing[:3]}" if missing else "")
                             + (f"; folded but not ones: {wrong_ones[:3]}" if wrong_ones
                                else "")})
    if expected is not None:
        worst, where = 0.0, ""
        for name, want in expected.items():
            if name not in got:
                continue
            w = np.asarray(want, dtype=np.float32)
            err = float(np.abs(got[name].astype(np.float32) - w).max() /
                        max(float(np.abs(w).max()), 1e-12))
            if err > worst:
                worst, where = err, name
        checks.append({"name": expected_name, "passed": worst <= 1e-3,
                       "detail": f"max relative error {worst:.1e}" + (f" ({where})" if where
                                                                       else "")})
    if more is not None:
        checks.append(more(got, kinds))
    return checks


def spec_hidden(weights: dict[str, Any]) -> int:
    """The hidden size, from the embedding's width."""
    return int(weights["model.embed_tokens.weight"].shape[-1])


def export_fp16(hf_dir: Path, dest: Path, ctx: RunContext, context: int,
                stateful: bool) -> dict[str, Any]:
    """Export ``hf_dir`` (a plain safetensors HF model) to the fp16 folder ``dest``."""
    import torch

    from edgesmith.export.coreml_llama import from_hf
    from edgesmith.export.onnx import copy_model_files

    pkgio.require()
    check_exportable(hf_dir, context)
    task = ctx.task("export Core ML (torch.jit.trace + coremltools)", total=3)
    t0 = time.perf_counter()
    module = from_hf(hf_dir, context, stateful)
    checks = [_against_transformers(module, Path(hf_dir))]
    if not checks[0]["passed"]:
        raise ToolError(f"the Core ML decoder disagrees with transformers on {hf_dir}: "
                        f"{checks[0]['detail']}", "this architecture variant is not covered; "
                        "use --format gguf or onnx")
    ctx.progress.advance(task)
    kv_cache = "stateful"
    try:
        mlmodel = _convert(module, context, stateful)
    except Exception as exc:  # coremltools raises many types; fall back to a fixed context
        if not stateful:
            raise ToolError(f"coremltools could not convert {hf_dir}: "
                            f"{str(exc).splitlines()[0][:300]}",
                            "use --format gguf or onnx for this model") from exc
        kv_cache = f"none: stateful conversion failed ({str(exc).splitlines()[0][:120]})"
        stateful = False
        module = from_hf(hf_dir, context, False)
        mlmodel = _convert(module, context, False)
    if not stateful and kv_cache == "stateful":
        kv_cache = "none (fixed context)"
    ctx.progress.advance(task)
    names = [n for n, _ in module.named_parameters()]
    expected = {n: p.detach().to(torch.float16).float().numpy()
                for n, p in module.named_parameters()}
    with atomic_dir(dest) as tmp:
        with pkgio.quiet():
            mlmodel.save(str(tmp / pkgio.PACKAGE))
        copy_model_files(Path(hf_dir), tmp)
        checks += package_checks(tmp / pkgio.PACKAGE, stateful, names, expected)
    ctx.progress.advance(task)
    s = module.s
    return {"type": "fp16", "export_s": round(time.perf_counter() - t0, 2),
            "kv_cache": kv_cache, "stateful": stateful, "context": context,
            "target": "iOS18", "layers": s.layers, "kv_heads": s.kv_heads,
            "head_dim": s.head_dim, "tied": s.tied, "checks": checks,
            "exporter": versions()}


class CoreMLExporter:
    """Exporter plug point: ``export(hf_dir, ctx, dest) -> Artifact`` (a folder)."""

    name = "coreml"
    format = "coreml"
    layout = "folder"
    Config = CoreMLExportConfig

    def __init__(self, config: CoreMLExportConfig | None = None) -> None:
        self.config = config or CoreMLExportConfig()

    @staticmethod
    def version() -> str:
        return versions()

    def artifact_type(self) -> str:
        return self.config.dtype

    def cache_path(self, cache_dir: Path, hf_dir: Path, kind: str) -> Path:
        c = self.config
        tag = hashlib.sha256(f"{versions()}|{c.context}|{c.stateful}|{c.block_size}".encode()
                             ).hexdigest()[:12]
        return Path(cache_dir) / f"coreml-{kind}.{Path(hf_dir).name}.{tag}"

    @staticmethod
    def published_names(model_name: str, final_type: str) -> list[str]:
        """What a compress run writes into -o (the spec file first)."""
        return [f"{pkgio.PACKAGE}/Data/com.apple.CoreML/model.mlmodel", pkgio.PACKAGE,
                *TOKENIZER_FILES]

    def export(self, hf_dir: Path, ctx: RunContext, dest: Path | None = None) -> Artifact:
        from edgesmith.compress import coreml_compress, gptq_format
        from edgesmith.export.gguf import plain_dir

        c = self.config
        dest = Path(dest or ctx.cache_dir / "coreml-fp16")
        source = Path(hf_dir)
        checkpoint = source if gptq_format.is_gptq_dir(source) else None
        plain = plain_dir(source) if checkpoint else source
        check_exportable(plain, c.context)  # before any long work
        if c.dtype == "fp16":
            meta = export_fp16(plain, dest, ctx, c.context, c.stateful)
            if checkpoint:
                meta["gptq_checkpoint"] = str(checkpoint)
            return Artifact(dest, "coreml", meta)
        base_dir = self.cache_path(ctx.cache_dir, source, "fp16")
        if (base_dir / pkgio.PACKAGE).exists() and (base_dir.with_name(base_dir.name + ".json")
                                                    ).exists():
            meta = json.loads(base_dir.with_name(base_dir.name + ".json").read_text())
        else:
            meta = export_fp16(plain, base_dir, ctx, c.context, c.stateful)
            base_dir.with_name(base_dir.name + ".json").write_text(json.dumps(meta))
        base = Artifact(base_dir, "coreml", {**meta, "gptq_checkpoint": str(checkpoint)
                                             if checkpoint else None})
        return coreml_compress.compress(base, dest, coreml_compress.CoreMLCompressConfig(
            mode=c.dtype, block_size=c.block_size), ctx)
