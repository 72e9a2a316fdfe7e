"""Knowledge distillation: train the (pruned) student to match the teacher's distributions.

Loss per token: ``alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student)``,
where ``p^T`` is the softmax at temperature T (Hinton et al. 2015; the T^2 keeps the gradient
scale independent of T). AdamW, linear warm-up then cosine decay; gradient checkpointing on
request; bf16 autocast where the CPU multiplies bf16 natively (AMX / AVX512-BF16) or on CUDA,
which is used when torch sees a GPU.

- Teacher ``original``: the model the recipe started from (the input, with any merge_lora
  adapters merged again), loaded when the pass runs; or a model path (same tokenizer).
- Data: a text file, a JSONL file (one ``{"text": ...}`` per line), or ``builtin:calibration``
  (the recipe's calibration text). Lines of the bundled held-out text (on which the pipeline
  measures quality) are removed from it first, and the report says how many were.
- Checkpoints (student, optimizer, step, loss curve) every ``checkpoint_minutes`` (or every
  ``checkpoint_every`` steps, where set) in the run cache, keyed by the config and the
  student's starting weights: a killed run resumes at the last checkpoint and
  ends with the weights an uninterrupted run would have.
- Progress: one step per optimizer step, with the loss and training tokens/s.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from functools import cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from edgesmith.context import RunContext
from edgesmith.errors import ModelError
from edgesmith.fsutil import atomic_dir, sha256_file, sha256_text


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    teacher: str = Field("original", description="'original' (the recipe's input) or a model")
    data: str = Field("builtin:calibration", description=".txt, .jsonl or builtin:calibration")
    steps: int = Field(300, ge=1, le=1_000_000)
    batch_size: int = Field(8, ge=1, le=1024)
    seq_len: int = Field(256, ge=16, le=8192)
    lr: float = Field(1e-4, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    temperature: float = Field(2.0, gt=0, le=100)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KL term (1-alpha: CE)")
    gradient_checkpointing: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # a killed run loses at most checkpoint_minutes of training (or checkpoint_every steps
    # where set): a checkpoint (student + AdamW state) is 3x the model's fp32 size on disk
    checkpoint_every: int | None = Field(None, ge=1, description="steps between checkpoints")
    checkpoint_minutes: float = Field(5.0, gt=0, description="minutes between checkpoints")
    log_every: int = Field(10, ge=1)
    seed: int = 0

    @field_validator("data")
    @classmethod
    def _data(cls, v: str) -> str:
        if v != "builtin:calibration" and not Path(v).is_file():
            raise ValueError(f"distillation data {v} is not a file")
        return v

    @computed_field  # type: ignore[prop-decorator]
    @property
    def data_sha256(self) -> str:
        """Part of the torch passes' cache key: changed data trains again."""
        return "builtin" if self.data == "builtin:calibration" else _sha(self.data)


@cache
def _sha(path: str) -> str:
    return sha256_file(Path(path))


def _bf16_cpu() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def training_text(config: DistillConfig, ctx: RunContext) -> tuple[str, int]:
    """The training text, and how many held-out lines were removed from it."""
    from edgesmith.bench.quality import corpus

    if config.data == "builtin:calibration":
        calib = ctx.extras.get("calibration")
        text = ctx.calibration_text or (calib.text() if calib else corpus("calibration"))
    elif config.data.endswith(".jsonl"):
        docs = []
        for i, line in enumerate(Path(config.data).read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                docs.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{config.data}:{i + 1} is not a JSON object with a 'text'",
                                 'one {"text": "..."} per line') from exc
        text = "\n\n".join(docs)
    else:
        text = Path(config.data).read_text(encoding="utf-8")
    held = {ln.strip() for ln in corpus("heldout").splitlines() if len(ln.strip()) >= 40}
    lines = text.splitlines()
    kept = [ln for ln in lines if ln.strip() not in held]
    return "\n".join(kept), len(lines) - len(kept)


def chunks(tok: Any, text: str, seq_len: int) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n < 1:
        raise ModelError(f"the distillation text has {len(ids)} tokens, less than one sequence "
                         f"of {seq_len}", "use more data or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len]).reshape(n, seq_len)


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, T: float,
            alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl, ce) over next-token positions; logits ``[B, L, V]``, labels ``[B, L]``."""
    s = student[:, :-1].float().reshape(-1, student.shape[-1])
    t = teacher[:, :-1].float().reshape(-1, teacher.shape[-1])
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / T, -1), torch.log_softmax(t / T, -1),
                                    log_target=True, reduction="batchmean") * T * T
    ce = torch.nn.functional.cross_entropy(s, labels[:, 1:].reshape(-1))
    return alpha * kl + (1 - alpha) * ce, kl, ce


def load_teacher(config: DistillConfig, model: Any, ctx: RunContext) -> Any:
    from edgesmith import models

    if config.teacher == "original":
        src = ctx.extras.get("source_dir") or getattr(model.config, "_name_or_path", "")
        if not src or not (Path(src) / "config.json").exists():
            raise ModelError("distill teacher 'original': the input model's directory is not "
                             "known", "name the teacher model's directory in teacher:")
        teacher, _ = models.load_hf(Path(src))
        from edgesmith.compress.merge_lora import merge

        for adapter in ctx.extras.get("merged_adapters", []):
            merge(teacher, Path(adapter.adapter), adapter.allow_pickle)
        return teacher
    ref = models.resolve(config.teacher)
    teacher, tok = models.load_hf(models.as_hf_dir(ref))
    mine = ctx.extras.get("tokenizer")
    if mine is not None and tok.get_vocab() != mine.get_vocab():
        raise ModelError(f"teacher {config.teacher} has another tokenizer than the student",
                         "distill from a model with the same tokenizer (vocabulary)")
    return teacher


def _fingerprint(model: torch.nn.Module) -> str:
    sums = [f"{n}:{tuple(p.shape)}:{float(p.detach().double().sum()):.10e}"
            for n, p in model.state_dict().items()]
    return sha256_text("|".join(sums))[:16]


def _lr(config: DistillConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / span))


class DistillPass:
    """Torch-side Pass: ``run(model, ctx) -> model`` trained toward the teacher."""

    name = "distill"
    Config = DistillConfig
    kind = "torch"

    def __init__(self, config: DistillConfig) -> None:
        self.config = config

    def _checkpoint_dir(self, model: Any, ctx: RunContext) -> Path:
        key = sha256_text(self.config.model_dump_json() + _fingerprint(model))[:16]
        return Path(ctx.cache_dir) / f"distill-{key}"

    def run(self, model: Any, ctx: RunContext) -> Any:
        from edgesmith.compress.layerwise import pick_device

        c = self.config
        t0 = time.perf_counter()
        tok = ctx.extras.get("tokenizer")
        if tok is None:
            raise ModelError("the distill pass needs the model's tokenizer",
                             "the pipeline passes it in ctx.extras['tokenizer']")
        device = pick_device(c.device)
        bf16 = c.precision == "bf16" or (c.precision == "auto" and (
            device.type == "cuda" or _bf16_cpu()))
        text, removed = training_text(c, ctx)
        data = chunks(tok, text, c.seq_len)
        ckpt = self._checkpoint_dir(model, ctx)
        teacher = load_teacher(c, model, ctx).to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        model.to(device).train()
        if c.gradient_checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        # fused AdamW (one kernel per step, on CUDA and on the CPU), as transformers' Trainer
        # uses by default
        opt = torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay,
                                fused=True)
        start, curve = 0, []
        if (ckpt / "state.json").exists():
            state = json.loads((ckpt / "state.json").read_text())
            model.load_state_dict(torch.load(ckpt / "student.pt", map_location=device,
                                             weights_only=True))
            opt.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=device,
                                           weights_only=True))
            start, curve = state["step"], state["curve"]
        resumed = start
        task = ctx.progress.add_task("distill", total=c.steps, completed=start)
        # the running sums stay on the device: reading a loss is a sync, done at log steps only
        zero = lambda: {k: torch.zeros((), device=device) for k in ("loss", "kl", "ce")}  # noqa: E731
        tokens, t_run, acc, n_acc = 0, time.perf_counter(), zero(), 0
        t_saved = t_run
        amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
        for step in range(start, c.steps):
            g = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
            batch = data[torch.randint(0, len(data), (c.batch_size,), generator=g)].to(device)
            for group in opt.param_groups:
                group["lr"] = _lr(c, step)
            with amp:
                with torch.no_grad():
                    t_logits = teacher(input_ids=batch, use_cache=False).logits
                s_logits = model(input_ids=batch, use_cache=False).logits
                loss, kl, ce = kd_loss(s_logits, t_logits, batch, c.temperature, c.alpha)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del t_logits, s_logits
            tokens += batch.numel()
            for k, v in (("loss", loss), ("kl", kl), ("ce", ce)):
                acc[k] += v.detach()
            n_acc += 1
            rate = tokens / max(1e-9, time.perf_counter() - t_run)
            done = step + 1
            if done % c.log_every == 0 or done == c.steps:
                curve.append({"step": done, **{k: round(float(v) / n_acc, 5)
                                               for k, v in acc.items()},
                              "tokens_per_s": round(rate, 1)})
                acc, n_acc = zero(), 0
                ctx.progress.update(task, description=(
                    f"distill: loss {curve[-1]['loss']:.3f}, {rate:,.0f} tokens/s"))
            ctx.progress.update(task, advance=1)
            due = (done % c.checkpoint_every == 0) if c.checkpoint_every else \
                time.perf_counter() - t_saved >= 60 * c.checkpoint_minutes
            if due and done < c.steps:
                self._save(ckpt, model, opt, done, curve)
                t_saved = time.perf_counter()
        if c.gradient_checkpointing:
            model.gradient_checkpointing_disable()
        model.eval().to("cpu")
        del teacher
        shutil.rmtree(ckpt, ignore_errors=True)  # the trained model is the pass's result now
        seconds = time.perf_counter() - t0
        report = {
            "pass": "distill", "settings": c.model_dump(mode="json"),
            "teacher": c.teacher, "device": device.type, "bf16": bf16,
            "steps": c.steps, "resumed_from_step": resumed,
            "training_tokens": c.steps * c.batch_size * c.seq_len,
            "tokens_this_run": tokens, "tokens_per_s": round(tokens / max(1e-9, time.perf_counter()
                                                                          - t_run), 1),
            "data_sequences": len(data), "heldout_lines_removed": removed,
            "loss_curve": curve, "seconds": round(seconds, 2),
        }
        ctx.extras.setdefault("pass_reports", []).append(report)
        return model

    @staticmethod
    def _save(ckpt: Path, model: Any, opt: Any, step: int, curve: list[Any]) -> None:
        with atomic_dir(ckpt) as tmp:  # replaces the previous checkpoint whole
            torch.save(copy.copy(model.state_dict()), tmp / "student.pt")
            torch.save(opt.state_dict(), tmp / "optimizer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "curve": curve}))
