"""Model resolution and safe loading: each bad input gets a clear ModelError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgesmith import models
from edgesmith.errors import ModelError


def test_builtin_resolves_without_import() -> None:
    ref = models.resolve("builtin:smollm2-135m")
    assert ref.kind == "gguf" and ref.path.suffix == ".gguf"
    assert ref.architecture() == "llama"
    enc = models.resolve("builtin:minilm-l6")
    assert enc.kind == "hf" and enc.architecture() == "BertModel"
    assert not models.is_causal_lm(enc)


def test_unknown_builtin() -> None:
    with pytest.raises(ModelError, match="unknown builtin"):
        models.resolve("builtin:gpt-17")


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        models.resolve(str(tmp_path / "nope"))


def test_no_config(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_unsupported_architecture(tiny_llama: Path, copy_model) -> None:  # type: ignore[no-untyped-def]
    d = copy_model(tiny_llama)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["WhisperForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="unsupported architecture 'WhisperForConditional"):
        models.resolve(str(d))


def test_truncated_safetensors(tiny_llama: Path, copy_model) -> None:  # type: ignore[no-untyped-def]
    d = copy_model(tiny_llama)
    st = d / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt safetensors.*truncated"):
        models.resolve(str(d))


def test_garbage_safetensors_header(tiny_llama: Path, copy_model) -> None:  # type: ignore[no-untyped-def]
    d = copy_model(tiny_llama)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ModelError, match="corrupt safetensors"):
        models.resolve(str(d))


def test_pickle_only_is_refused_unless_opted_in(tiny_llama: Path, copy_model) -> None:  # type: ignore[no-untyped-def]
    d = copy_model(tiny_llama)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle.*--allow-pickle"):
        models.resolve(str(d))
    assert models.resolve(str(d), allow_pickle=True).allow_pickle


def test_opted_in_pickle_is_converted_to_safetensors(tiny_llama: Path, copy_model) -> None:  # type: ignore[no-untyped-def]
    import torch
    from safetensors.torch import load_file

    d = copy_model(tiny_llama)
    weights = load_file(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    torch.save(weights, d / "pytorch_model.bin")  # a real pickle checkpoint
    ref = models.resolve(str(d), allow_pickle=True)
    hf = models.as_hf_dir(ref)
    assert hf != d and (hf / "model.safetensors").exists() and (hf / ".complete").exists()
    assert not list(hf.glob("*.bin"))
    again = load_file(hf / "model.safetensors")
    for name, t in weights.items():
        if name in again:  # the tied output head is saved once
            assert torch.equal(again[name], t), name
    assert models.as_hf_dir(ref) == hf  # converted once, then taken from the cache


def test_not_a_gguf(tmp_path: Path) -> None:
    f = tmp_path / "model.gguf"
    f.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(ModelError, match="not a GGUF"):
        models.resolve(str(f))


def test_truncated_gguf(tmp_path: Path) -> None:
    src = models.builtin_path("smollm2-135m")
    f = tmp_path / "cut.gguf"
    with open(src, "rb") as s:
        f.write_bytes(s.read(5_000_000))
    with pytest.raises(ModelError, match="corrupt or truncated GGUF"):
        models.resolve(str(f))


def test_gguf_header_only_truncation(tmp_path: Path) -> None:
    src = models.builtin_path("smollm2-135m")
    f = tmp_path / "head.gguf"
    with open(src, "rb") as s:
        f.write_bytes(s.read(2000))
    with pytest.raises(ModelError, match="corrupt or truncated GGUF"):
        models.resolve(str(f))
