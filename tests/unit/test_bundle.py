"""`edgesmith bundle` on a real compress result of a tiny model: the files an app ships, the
manifest's checksums, and `--verify` catching a changed byte, a missing and an extra file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgesmith.fsutil import sha256_file
from tests.unit.test_pipeline_tiny import error_line, run

RECIPE = """name: tiny-android-q8
target: android-midrange
calibration: {samples: 2, seq_len: 128}
eval: {ctx: 128, windows: 2}
steps:
  - export: {format: gguf, outtype: f16}
  - gguf_quantize: {type: Q8_0}
gates: {max_kld: 10}
"""


@pytest.fixture(scope="module")
def model(tiny_llama: Path, smollm2_hf_dir: Path,
          tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with SmolLM2's chat template file beside its tokenizer."""
    dest = tmp_path_factory.mktemp("bundle-model") / "tiny-llama"
    shutil.copytree(tiny_llama, dest)
    shutil.copy(smollm2_hf_dir / "chat_template.jinja", dest / "chat_template.jinja")
    return dest


@pytest.fixture(scope="module")
def result(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("bundle")
    (d / "r.yaml").write_text(RECIPE)
    p = run("compress", str(model), "--recipe", str(d / "r.yaml"), "-o", str(d / "out"),
            "--threads", "2")
    assert p.returncode == 0, p.stderr
    return d / "out"


@pytest.fixture(scope="module")
def bundled(result: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("assets") / "model"
    p = run("bundle", str(result), "--platform", "android", "-o", str(out), "--json")
    assert p.returncode == 0, p.stderr
    return out, json.loads(p.stdout)


def test_bundle_holds_model_tokenizer_template_and_checksums(
        result: Path, bundled: tuple[Path, dict], model: Path) -> None:
    out, man = bundled
    compress_man = json.loads((result / "manifest.json").read_text())
    art = compress_man["artifacts"][0]
    assert man["platform"] == "android" and man["model"]["format"] == "gguf"
    assert (out / art["path"]).read_bytes() == (result / art["path"]).read_bytes()
    # the tokenizer and chat template come from the input model
    assert json.loads((out / "tokenizer.json").read_text()) == \
        json.loads((model / "tokenizer.json").read_text())
    assert (out / "chat_template.jinja").read_text() == \
        (model / "chat_template.jinja").read_text()
    assert man["chat_template"] == "chat_template.jinja"
    listed = {e["path"]: e for e in man["files"]}
    assert art["path"] in listed and "tokenizer.json" in listed and "report.md" not in listed
    for rel, e in listed.items():
        assert sha256_file(out / rel) == e["sha256"] and (out / rel).stat().st_size == \
            e["size_bytes"]
    assert json.loads((out / "bundle.json").read_text()) == man
    # quality and memory figures are the result's, not re-invented
    assert man["quality"]["artifact"] == art["quality"]
    cfg = json.loads((model / "config.json").read_text())
    assert man["context_length"] == min(cfg["max_position_embeddings"], 4096)
    kv = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * \
        (cfg["hidden_size"] // cfg["num_attention_heads"]) * man["context_length"] * 2
    assert man["memory"]["kv_cache_bytes"] == kv
    assert man["memory"]["weights_bytes"] == art["size_bytes"]
    assert man["fit"]["target"] == "android-midrange" and man["fit"]["fits"] is True
    # SmolLM2's tokenizer is HF BPE: the MediaPipe .task is not built, and the bundle says why
    assert man["mediapipe_task"]["built"] is False
    assert "SentencePiece" in man["mediapipe_task"]["why"]


def test_verify_passes_then_catches_a_changed_byte(bundled: tuple[Path, dict],
                                                   tmp_path: Path) -> None:
    src, man = bundled
    out = tmp_path / "b"
    shutil.copytree(src, out)
    p = run("bundle", "--verify", str(out))
    assert p.returncode == 0, p.stderr
    model = out / man["model"]["path"]
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 1
    model.write_bytes(bytes(data))
    p = run("bundle", "--verify", str(out))
    assert p.returncode == 2
    assert man["model"]["path"] in error_line(p) and "sha256" in error_line(p)


def test_verify_catches_missing_and_extra_files(bundled: tuple[Path, dict],
                                                tmp_path: Path) -> None:
    src, _ = bundled
    out = tmp_path / "b"
    shutil.copytree(src, out)
    (out / "tokenizer.json").unlink()
    (out / "stray.bin").write_bytes(b"x")
    p = run("bundle", "--verify", str(out), "--json")
    assert p.returncode == 2
    problems = json.loads(p.stdout)["problems"]
    assert any("tokenizer.json is missing" in x for x in problems)
    assert any("stray.bin is not listed" in x for x in problems)


def test_refusals(result: Path, bundled: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = bundled
    # an existing bundle is not overwritten without --force
    p = run("bundle", str(result), "--platform", "android", "-o", str(out))
    assert p.returncode == 2 and "--force" in error_line(p)
    p = run("bundle", str(result), "--platform", "web", "-o", str(tmp_path / "w"))
    assert p.returncode == 2 and "unknown platform" in error_line(p)
    p = run("bundle", str(result))
    assert p.returncode == 2 and "-o" in error_line(p)
    p = run("bundle", "--verify", str(tmp_path))
    assert p.returncode == 2 and "bundle.json" in error_line(p)
    # a result that no longer matches its manifest is refused before anything is copied
    broken = tmp_path / "broken"
    shutil.copytree(result, broken)
    gguf = next(broken.glob("*.gguf"))
    gguf.write_bytes(gguf.read_bytes()[:-1])
    p = run("bundle", str(broken), "--platform", "ios", "-o", str(tmp_path / "ios"))
    assert p.returncode == 2 and "does not match" in error_line(p)
    assert not (tmp_path / "ios").exists()
