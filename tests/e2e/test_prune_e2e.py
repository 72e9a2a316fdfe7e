"""End to end on the real packaged SmolLM2-135M: structured prune + a short distillation +
Q4_K_M through `edgesmith compress --recipe`, loaded and scored by llama.cpp."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

RECIPE = """name: smollm2-pruned-distilled-q4km
target: raspberry-pi-4
calibration: {source: builtin:calibration, samples: 8, seq_len: 256}
eval: {ctx: 512, windows: 4}
steps:
  - prune: {method: structured, ffn_keep: 0.75, drop_layers: 3, multiple_of: 128}
  - distill: {teacher: original, steps: 12, batch_size: 4, seq_len: 128, lr: 0.0002,
              log_every: 4}
  - export: {format: gguf, outtype: f16}
  - gguf_quantize: {type: Q4_K_M, imatrix: true}
gates:
  max_ppl_increase_pct: 400
  max_kld: 2.0
"""


def test_smollm2_pruned_distilled_q4km(tmp_path: Path, watched) -> None:  # type: ignore[no-untyped-def]
    import gguf

    (tmp_path / "r.yaml").write_text(RECIPE)
    out = tmp_path / "out"
    p = watched([sys.executable, "-m", "edgesmith.cli", "compress", "builtin:smollm2-135m",
                 "--recipe", str(tmp_path / "r.yaml"), "-o", str(out), "--threads", "2"],
                env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    man = json.loads((out / "manifest.json").read_text())
    prune, distill = man["passes"]
    assert prune["pass"] == "prune" and distill["pass"] == "distill"
    assert len(prune["dropped_layers"]) == 3 and prune["params_ratio"] < 0.8
    assert prune["structure_after"]["intermediate_size"] == 1152
    assert distill["training_tokens"] == 12 * 4 * 128 and distill["heldout_lines_removed"] == 0
    assert [c["step"] for c in distill["loss_curve"]] == [4, 8, 12]
    art = man["artifacts"][0]
    reader = gguf.GGUFReader(str(out / art["path"]))
    fields = {f.name: f.parts[f.data[0]].tolist() for f in reader.fields.values()
              if f.name.startswith("llama.") and f.data}
    assert fields["llama.block_count"] == [27] and fields["llama.feed_forward_length"] == [1152]
    assert fields["llama.attention.head_count"] == [9]
    # llama.cpp loaded and scored it against the unpruned fp32 reference
    q, base = art["quality"], man["baseline"]["quality"]
    assert q["tokens_scored"] == 4 * 255
    assert q["top1_agreement"] > 0.4 and q["ppl"] < 4 * q["ppl_ref"]
    assert q["kld_mean"] - base["kld_mean"] < 0.1  # Q4_K_M adds little to the pruned F16's
    assert art["size_bytes"] < 0.85 * 105.5e6  # the unpruned Q4_K_M of SmolLM2 is 105.5 MB
    print(f"\npruned+distilled Q4_K_M: params {prune['params_before']} -> "
          f"{prune['params_after']} ({prune['params_ratio']:.3f}x), dropped "
          f"{prune['dropped_layers']}, size {art['size_bytes'] / 1e6:.1f} MB, ppl {q['ppl']:.2f} "
          f"(ref {q['ppl_ref']:.2f}), KLD {q['kld_mean']:.4f}, top-1 {q['top1_agreement']:.3f}; "
          f"distill loss {distill['loss_curve'][0]['loss']} -> "
          f"{distill['loss_curve'][-1]['loss']}, {distill['tokens_per_s']} tokens/s; "
          f"timings {man['timings_s']}")
