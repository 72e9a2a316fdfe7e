"""How much of structured pruning's perplexity loss distillation wins back, and how fast it trains,
measured in PyTorch (fp32 evaluation), on CUDA where torch sees a GPU, else on this CPU.

The torch-side half of ``prune_distill.py`` (which needs llama.cpp for its GGUF rows), so that
it can run on a machine with a GPU and no llama.cpp. On ``--model`` (default SmolLM2-135M):

  1. the fp32 reference's held-out perplexity (the same windows the pipeline scores),
  2. the structured prune pass (``edgesmith.compress.prune``) -> held-out ppl,
  3. the distill pass (``edgesmith.compress.distill``) from the original -> held-out ppl,
  4. the anchor for training speed: a plain ``transformers.Trainer`` loop with the same
     student, teacher, loss, batch, sequence length, optimizer and precision, for
     ``--trainer-steps`` steps; tokens/s of both.

Prints ppl before pruning / after pruning / after distillation, the share of the increase won
back, training tokens, time and tokens/s vs the Trainer's.

Example: python benchmarks/distill_recovery.py --steps 600 --batch-size 16
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from edgesmith import models
from edgesmith.bench import quality
from edgesmith.bench.runners.torch import TorchSession
from edgesmith.compress.distill import DistillConfig, DistillPass, chunks, kd_loss, training_text
from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.compress.prune import PruneConfig, PrunePass
from edgesmith.context import RunContext, make_progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_distill import add_prune_distill_args


def _ppl(model: Any, tok: Any, ref: quality.Reference, tmp: Path, name: str) -> dict[str, Any]:
    d = tmp / name
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    sess = TorchSession(d, None)
    try:
        return quality.evaluate(sess, ref, None, name).as_dict()
    finally:
        sess.close()


def _trainer_tokens_per_s(student: Any, teacher: Any, data: torch.Tensor, c: DistillConfig,
                          steps: int, out: Path, bf16: bool) -> float:
    """A plain transformers Trainer loop on the same model, loss, batch and precision (``bf16``:
    what the distill pass chose, so that a CPU with bf16 runs both in bf16)."""
    from transformers import Trainer, TrainingArguments

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = teacher.to(device).eval()

    class KDTrainer(Trainer):
        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         **kw: Any) -> Any:
            ids = inputs["input_ids"]
            with torch.no_grad():
                t = teacher(input_ids=ids, use_cache=False).logits
            s = model(input_ids=ids, use_cache=False).logits
            return kd_loss(s, t, ids, c.temperature, c.alpha)[0]

    ds = [{"input_ids": row} for row in data]
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=c.batch_size, max_steps=steps,
        learning_rate=c.lr, weight_decay=c.weight_decay, warmup_steps=min(10, steps // 10),
        lr_scheduler_type="cosine", bf16=bf16,
        logging_steps=max(1, steps), save_strategy="no", report_to=[],
        dataloader_num_workers=0, use_cpu=device == "cpu", disable_tqdm=True,
        remove_unused_columns=False)
    trainer = KDTrainer(model=student, args=args, train_dataset=ds,
                        data_collator=lambda rows: {"input_ids": torch.stack(
                            [r["input_ids"] for r in rows])})
    t0 = time.perf_counter()
    trainer.train()
    return steps * c.batch_size * c.seq_len / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prune_distill_args(ap, steps_flag="--steps")
    ap.add_argument("--data", default="builtin:calibration",
                    help="distillation text (file, JSONL or builtin:calibration)")
    ap.add_argument("--trainer-steps", type=int, default=30)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()

    hf_dir = models.as_hf_dir(models.resolve(a.model))
    tmp = Path(tempfile.mkdtemp(prefix="distill-recovery-"))
    ref = quality.reference(hf_dir, quality.EvalSpec(ctx=512, windows=a.windows), tmp)
    model, tok = models.load_hf(hf_dir)
    ctx = RunContext(out_dir=tmp, cache_dir=tmp, progress=make_progress(quiet=True))
    ctx.extras.update(calibration=CalibrationConfig(samples=a.samples, seq_len=256),
                      tokenizer=tok, source_dir=str(hf_dir))
    t0 = time.perf_counter()
    pruned = PrunePass(PruneConfig(method="structured", ffn_keep=a.ffn_keep,
                                   drop_layers=a.drop_layers, multiple_of=a.multiple_of)
                       ).run(model, ctx)
    prune_s = time.perf_counter() - t0
    n_before = sum(p.numel() for p in models.load_hf(hf_dir)[0].parameters())
    n_after = sum(p.numel() for p in pruned.parameters())
    q_pruned = _ppl(pruned, tok, ref, tmp, "pruned")
    student_for_trainer = copy.deepcopy(pruned)
    dcfg = DistillConfig(teacher="original", steps=a.distill_steps, batch_size=a.batch_size,
                         seq_len=a.seq_len, lr=a.lr, temperature=a.temperature, alpha=a.alpha,
                         data=a.data)
    distilled = DistillPass(dcfg).run(pruned, ctx)
    report = ctx.extras["pass_reports"][-1]
    q_dist = _ppl(distilled, tok, ref, tmp, "distilled")
    text, _ = training_text(dcfg, ctx)
    data = chunks(tok, text, a.seq_len)
    teacher = models.load_hf(hf_dir)[0]
    trainer_tps = _trainer_tokens_per_s(student_for_trainer, teacher, data, dcfg,
                                        a.trainer_steps, tmp / "trainer", bool(report["bf16"]))
    recovered = (q_pruned["ppl"] - q_dist["ppl"]) / max(1e-9, q_pruned["ppl"] - ref.ppl)
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    fig = {"model": a.model, "device": dev, "params_before": n_before, "params_after": n_after,
           "ppl_reference": ref.ppl, "pruned": q_pruned, "distilled": q_dist,
           "recovered_share": recovered, "prune_s": prune_s,
           "training_tokens": report["training_tokens"], "distill_s": report["seconds"],
           "distill_tokens_per_s": report["tokens_per_s"], "trainer_tokens_per_s": trainer_tps,
           "bf16": report["bf16"], "data_sequences": report["data_sequences"],
           "loss_first": report["loss_curve"][0], "loss_last": report["loss_curve"][-1],
           "settings": vars(a) | {"json": None}}
    print(f"model {a.model} on {dev}; prune ffn_keep {a.ffn_keep} (multiple of "
          f"{a.multiple_of}), drop_layers {a.drop_layers}: {n_after / 1e6:.1f} M of "
          f"{n_before / 1e6:.1f} M parameters ({n_after / n_before:.3f}x)")
    print(f"| held-out ppl (PyTorch fp32, {a.windows} x 512-token windows) | value | "
          "vs reference |")
    print("|---|---:|---:|")
    print(f"| reference (before pruning) | {ref.ppl:.2f} | 1.000x |")
    print(f"| pruned | {q_pruned['ppl']:.2f} | {q_pruned['ppl'] / ref.ppl:.3f}x |")
    print(f"| pruned + distilled | {q_dist['ppl']:.2f} | {q_dist['ppl'] / ref.ppl:.3f}x |")
    print(f"| share of the increase won back | {recovered:.1%} | goal >= 50% |")
    print(f"KLD to the reference: pruned {q_pruned['kld_mean']:.3f}, distilled "
          f"{q_dist['kld_mean']:.3f}")
    print(f"distillation: {report['training_tokens']:,} training tokens "
          f"({report['data_sequences']} sequences of {a.seq_len}), {report['seconds']:.0f} s, "
          f"bf16 {report['bf16']}; loss {report['loss_curve'][0]['loss']:.3f} -> "
          f"{report['loss_curve'][-1]['loss']:.3f}")
    print(f"training tokens/s: edgesmith distill {report['tokens_per_s']:,.0f}, transformers "
          f"Trainer (same model, loss, batch) {trainer_tps:,.0f}: "
          f"{report['tokens_per_s'] / trainer_tps:.2f}x")
    if a.json:
        a.json.write_text(json.dumps(fig, indent=2, default=str) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
