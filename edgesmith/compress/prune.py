"""The ``prune`` pass: structured (a smaller dense model) or unstructured (zeros in the weights).

- ``method: structured`` (compress/prune_structured.py) removes FFN intermediate channels,
  attention heads / KV groups (GQA-consistent: every KV group keeps the same number of query
  heads) and whole decoder layers, and writes a smaller dense HF model whose config.json says
  so. It is the only pruning that makes a GGUF or ONNX file smaller and faster.
- ``method: magnitude | wanda | sparsegpt`` (compress/prune_unstructured.py) sets a fraction of
  each Linear's weights, or N of every M (2:4), to zero. The file an exporter writes is as
  large as before (GGUF and ONNX MatMulNBits store every zero), and llama.cpp and onnxruntime
  on a CPU run no faster: the report says so, and the manifest shows the artifact's size.

Only the Linears of the decoder layers are pruned; ``lm_head`` and the embeddings stay as they
are unless ``modules`` names them (magnitude pruning only: the other methods need their inputs).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from edgesmith.compress import gptq, layerwise
from edgesmith.context import RunContext
from edgesmith.errors import ModelError

STRUCTURED_KEYS = {"ffn_keep", "heads_keep", "kv_groups_keep", "drop_layers", "importance",
                   "multiple_of", "update"}
UNSTRUCTURED_KEYS = {"sparsity", "pattern", "scope", "modules", "damp", "block_size"}
SPARSITY_WARNING = ("unstructured sparsity: GGUF, ONNX and LiteRT files store every zero, so the "
                    "artifact is not smaller (its size is in the manifest's artifacts) and "
                    "llama.cpp and onnxruntime do not run faster on a CPU; use method: "
                    "structured for that, or Core ML with coreml_compress mode sparse or "
                    "sparse_int8, which stores the zeros as a mask")


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Literal["structured", "magnitude", "wanda", "sparsegpt"] = "structured"
    # unstructured
    sparsity: float = Field(0.5, gt=0, lt=1, description="fraction of each Linear set to zero")
    pattern: str | None = Field(None, description="N:M sparsity, e.g. '2:4' (overrides sparsity)")
    scope: Literal["layer", "global"] = Field("layer", description="magnitude: threshold scope")
    modules: list[str] = Field(default_factory=list,
                               description="also prune these (lm_head, model.embed_tokens)")
    damp: float = Field(0.01, gt=0, le=1, description="sparsegpt: Hessian dampening")
    block_size: int = Field(128, ge=16, le=4096, description="sparsegpt: columns per block")
    # structured
    ffn_keep: float = Field(1.0, gt=0, le=1, description="fraction of FFN channels kept")
    heads_keep: float = Field(1.0, gt=0, le=1, description="fraction of each group's q heads")
    kv_groups_keep: float = Field(1.0, gt=0, le=1, description="fraction of KV groups kept")
    drop_layers: int = Field(0, ge=0, description="decoder layers removed (most similar in/out)")
    importance: Literal["activations", "magnitude"] = "activations"
    multiple_of: int = Field(64, ge=1, le=4096, description="FFN width rounded to this")
    update: bool = Field(True, description="least-squares refit of down/o_proj on what is kept")
    # calibration
    samples: int | None = Field(None, ge=1, le=4096, description="default: the recipe's")
    seq_len: int | None = Field(None, ge=16, le=8192, description="default: the recipe's")
    batch_size: int = Field(8, ge=1, le=512)
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("pattern")
    @classmethod
    def _nm(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = re.fullmatch(r"(\d+):(\d+)", v)
        if not m or not 0 < int(m.group(1)) < int(m.group(2)) <= 64:
            raise ValueError(f"pattern {v!r} is not N:M with 0 < N < M <= 64 (e.g. '2:4')")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        given = self.model_fields_set
        wrong = sorted(given & (UNSTRUCTURED_KEYS if self.method == "structured"
                                else STRUCTURED_KEYS))
        if wrong:
            raise ValueError(f"{', '.join(wrong)} do not apply to method {self.method}")
        if self.method == "structured" and self.ffn_keep == 1 and self.heads_keep == 1 \
                and self.kv_groups_keep == 1 and self.drop_layers == 0:
            raise ValueError("structured pruning with nothing to remove: set ffn_keep, "
                             "heads_keep, kv_groups_keep or drop_layers")
        if self.modules and self.method != "magnitude":
            raise ValueError("modules (lm_head, embeddings) can be pruned by method magnitude "
                             "only: wanda and sparsegpt need the module's inputs")
        if self.scope == "global" and self.method != "magnitude":
            raise ValueError("scope: global applies to method magnitude only")
        return self

    def nm(self) -> tuple[int, int] | None:
        if self.pattern is None:
            return None
        n, m = self.pattern.split(":")
        return int(n), int(m)


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Parameters (tied ones once) and the non-zero ones among them."""
    seen: set[int] = set()
    total = nonzero = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        nonzero += int(torch.count_nonzero(p.detach()))
    return {"total": total, "nonzero": nonzero}


def calibration(model: Any, ctx: RunContext, config: PruneConfig) -> list[torch.Tensor]:
    """The calibration batches (the recipe's text, samples and seq_len unless overridden)."""
    name = getattr(model.config, "_name_or_path", "")
    tok, text, samples, seq_len = gptq._tokenizer_and_calibration(
        ctx, config, Path(name) if name else None)  # type: ignore[arg-type]
    return layerwise.calibration_batches(tok, text, samples, seq_len, config.batch_size)


class PrunePass:
    """Torch-side Pass: ``run(model, ctx) -> model`` (pruned in place, or made smaller)."""

    name = "prune"
    Config = PruneConfig
    kind = "torch"

    def __init__(self, config: PruneConfig) -> None:
        self.config = config

    def run(self, model: Any, ctx: RunContext) -> Any:
        from edgesmith.compress import prune_structured, prune_unstructured

        t0 = time.perf_counter()
        if not hasattr(model, "config"):
            raise ModelError("prune needs a transformers model", "pass an HF causal LM")
        ctx.extras.setdefault("source_dir", getattr(model.config, "_name_or_path", "") or None)
        before = count_params(model)
        was_training = model.training
        model.eval()
        if self.config.method == "structured":
            report = prune_structured.prune(model, ctx, self.config)
        else:
            report = prune_unstructured.prune(model, ctx, self.config)
        model.train(was_training)
        after = count_params(model)
        report = {"pass": "prune", "method": self.config.method,
                  "settings": {k: v for k, v in self.config.model_dump(mode="json").items()
                               if k not in (UNSTRUCTURED_KEYS if self.config.method ==
                                            "structured" else STRUCTURED_KEYS)},
                  "params_before": before["total"], "params_after": after["total"],
                  "nonzero_before": before["nonzero"], "nonzero_after": after["nonzero"],
                  "params_ratio": round(after["total"] / before["total"], 4),
                  "nonzero_ratio": round(after["nonzero"] / before["nonzero"], 4),
                  **report, "seconds": round(time.perf_counter() - t0, 2)}
        if self.config.method != "structured":
            report.setdefault("warnings", []).append(SPARSITY_WARNING)
        ctx.extras.setdefault("pass_reports", []).append(report)
        return model
