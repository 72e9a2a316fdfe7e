"""Distillation on a tiny pruned Llama: the KL to the teacher on held-out text falls, a killed run
resumes from its checkpoint and ends with the uninterrupted run's weights, the held-out text is
removed from the training data, and the loss is KL at temperature T (times T^2) mixed with CE."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from edgesmith.compress.distill import DistillConfig, DistillPass, kd_loss, training_text
from edgesmith.compress.imatrix import CalibrationConfig
from edgesmith.compress.prune import PruneConfig, PrunePass
from edgesmith.context import RunContext, make_progress
from edgesmith.errors import ModelError
from edgesmith.models import load_hf


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
        max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    dest = tmp_path_factory.mktemp("distill") / "teacher"
    model.save_pretrained(dest, safe_serialization=True)
    tok.save_pretrained(dest)
    return dest


def _ctx(tmp: Path, tok: Any, progress: Any = None) -> RunContext:
    ctx = RunContext(out_dir=tmp, cache_dir=tmp, progress=progress or make_progress(quiet=True),
                     threads=2)
    ctx.extras["calibration"] = CalibrationConfig(samples=4, seq_len=64)
    ctx.extras["tokenizer"] = tok
    return ctx


def _pruned(teacher_dir: Path, ctx: RunContext) -> Any:
    model, _ = load_hf(teacher_dir)
    return PrunePass(PruneConfig(method="structured", ffn_keep=0.25, heads_keep=0.5,
                                 multiple_of=64)).run(model, ctx)


def _heldout_kl(model: Any, teacher: Any, tok: Any) -> float:
    from edgesmith.bench.quality import corpus

    ids = torch.tensor(tok(corpus("heldout")[:8000])["input_ids"][:512]).reshape(4, 128)
    with torch.no_grad():
        return float(kd_loss(model(ids).logits, teacher(ids).logits, ids, 1.0, 1.0)[1])


CFG = {"steps": 6, "batch_size": 2, "seq_len": 64, "lr": 2e-3, "warmup_steps": 1,
       "checkpoint_every": 2, "log_every": 2, "precision": "fp32", "device": "cpu"}


def test_distillation_lowers_heldout_kl(teacher_dir: Path, tmp_path: Path) -> None:
    teacher, tok = load_hf(teacher_dir)
    ctx = _ctx(tmp_path, tok)
    student = _pruned(teacher_dir, ctx)
    before = _heldout_kl(student, teacher, tok)
    cfg = DistillConfig(**{**CFG, "steps": 20, "batch_size": 4, "log_every": 5, "alpha": 0.9,
                           "lr": 1e-3})
    student = DistillPass(cfg).run(student, ctx)
    after = _heldout_kl(student, teacher, tok)
    assert after < 0.8 * before, (before, after)
    rep = ctx.extras["pass_reports"][-1]
    assert rep["pass"] == "distill" and rep["training_tokens"] == 20 * 4 * 64
    assert [p["step"] for p in rep["loss_curve"]] == [5, 10, 15, 20]
    assert rep["loss_curve"][-1]["loss"] < rep["loss_curve"][0]["loss"]
    assert all(p["tokens_per_s"] > 0 for p in rep["loss_curve"])
    assert not student.training and not any(tmp_path.glob("distill-*"))  # checkpoint cleaned


_KILLED = r"""
import os, sys, torch
sys.path.insert(0, {tests!r})
from pathlib import Path
from test_distill import _ctx, _pruned, CFG
from edgesmith.compress.distill import DistillConfig, DistillPass
from edgesmith.models import load_hf

class Killer:  # the process dies (no cleanup) once step 3 is done: after the checkpoint of 2
    def add_task(self, *a, **k): return 0
    def advance(self, *a, **k): pass
    def update(self, task, advance=0, **k):
        self.n = getattr(self, "n", 0) + advance
        if self.n == 3:
            os._exit(9)

teacher_dir, cache = Path({teacher!r}), Path({cache!r})
_, tok = load_hf(teacher_dir)
ctx = _ctx(cache, tok, Killer())
DistillPass(DistillConfig(**CFG)).run(_pruned(teacher_dir, ctx), ctx)
"""


def test_killed_run_resumes_to_the_same_weights(teacher_dir: Path, tmp_path: Path,
                                                watched: Any) -> None:
    _, tok = load_hf(teacher_dir)
    whole = tmp_path / "whole"
    whole.mkdir()
    ctx = _ctx(whole, tok)
    ref = DistillPass(DistillConfig(**CFG)).run(_pruned(teacher_dir, ctx), ctx)
    ref_curve = ctx.extras["pass_reports"][-1]["loss_curve"]

    killed = tmp_path / "killed"
    killed.mkdir()
    script = tmp_path / "kill.py"
    script.write_text(_KILLED.format(tests=str(Path(__file__).parent), teacher=str(teacher_dir),
                                     cache=str(killed)))
    p = watched([sys.executable, str(script)], env={**os.environ})
    assert p.returncode == 9, p.stderr
    (ck,) = killed.glob("distill-*")
    assert json.loads((ck / "state.json").read_text())["step"] == 2

    ctx = _ctx(killed, tok)
    again = DistillPass(DistillConfig(**CFG)).run(_pruned(teacher_dir, ctx), ctx)
    rep = ctx.extras["pass_reports"][-1]
    assert rep["resumed_from_step"] == 2 and rep["tokens_this_run"] == 4 * 2 * 64
    def losses(curve: list[dict[str, Any]]) -> list[Any]:
        return [(p["step"], p["loss"], p["kl"], p["ce"]) for p in curve]

    assert losses(rep["loss_curve"]) == losses(ref_curve)
    for (n, a), (_, b) in zip(ref.state_dict().items(), again.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=n)


def test_heldout_text_is_never_trained_on(tmp_path: Path) -> None:
    from edgesmith.bench.quality import corpus

    held = [ln for ln in corpus("heldout").splitlines() if len(ln.strip()) >= 40][:3]
    data = tmp_path / "corpus.txt"
    data.write_text("my own first line of text\n" + "\n".join(held) + "\nmy own last line\n")
    ctx = RunContext(out_dir=tmp_path, cache_dir=tmp_path, progress=make_progress(quiet=True))
    text, removed = training_text(DistillConfig(data=str(data)), ctx)
    assert removed == 3 and text == "my own first line of text\nmy own last line"
    jl = tmp_path / "c.jsonl"
    jl.write_text(json.dumps({"text": "doc one"}) + "\n\n" + json.dumps({"text": held[0]}) + "\n")
    text, removed = training_text(DistillConfig(data=str(jl)), ctx)
    assert (text, removed) == ("doc one\n", 1)
    jl.write_text('{"txt": 1}\n')
    with pytest.raises(ModelError, match=r"c\.jsonl:1 is not a JSON object with a 'text'"):
        training_text(DistillConfig(data=str(jl)), ctx)


def test_kd_loss_is_t2_scaled_kl_mixed_with_ce() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    T = 3.0
    ps, pt = (s[:, :-1] / T).log_softmax(-1), (t[:, :-1] / T).log_softmax(-1)
    want_kl = (pt.exp() * (pt - ps)).sum(-1).mean() * T * T
    want_ce = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), labels[:, 1:].flatten())
    loss, kl, ce = kd_loss(s, t, labels, T, 0.25)
    torch.testing.assert_close(kl, want_kl)
    torch.testing.assert_close(ce, want_ce)
    torch.testing.assert_close(loss, 0.25 * want_kl + 0.75 * want_ce)
    assert float(kd_loss(t, copy.deepcopy(t), labels, T, 1.0)[1]) == pytest.approx(0, abs=1e-6)


def test_data_must_exist() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="is not a file"):
        DistillConfig(data="/nonexistent/corpus.txt")
