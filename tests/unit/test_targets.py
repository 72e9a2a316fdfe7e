"""Target profiles and the memory-fit estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesmith import models
from edgesmith.errors import TargetError
from edgesmith.targets import fit, profile


def test_required_targets_exist_and_validate() -> None:
    names = profile.names()
    for need in ("raspberry-pi-5", "raspberry-pi-4", "android-midrange", "iphone-15",
                 "webgpu-browser"):
        assert need in names
    pi5, pi4 = profile.load("raspberry-pi-5"), profile.load("raspberry-pi-4")
    assert (pi5.ram_gb, pi4.ram_gb) == (8, 4)
    assert "gguf" in pi5.formats and pi5.default_recipe == "raspberry-pi-5-q4km"


def test_unknown_target() -> None:
    with pytest.raises(TargetError, match="unknown target 'pi-9'.*raspberry-pi-5"):
        profile.load("pi-9")


def test_fit_kv_cache_and_roofline(tiny_llama: Path) -> None:
    ref = models.resolve(str(tiny_llama))
    t = profile.load("raspberry-pi-5")
    r = fit.estimate(ref, t, ctx=1000, quant="Q8_0")
    # K and V, 2 layers, 2 KV heads of 64, f16, 1000 tokens
    assert r.kv_cache_bytes == 2 * 2 * 2 * 64 * 2 * 1000
    n_params = sum(p for p in [49152 * 256, 2 * (256 * 256 * 2 + 256 * 128 * 2 + 3 * 256 * 768
                                                   + 2 * 256), 256])
    assert r.weights_bytes == pytest.approx(n_params * 8.5 / 8)
    assert r.decode_tps_upper_bound == pytest.approx(17.1e9 / r.bytes_read_per_token)
    assert r.fits and r.total_bytes < t.usable_ram_bytes
    # the KV cache grows with the context until the model no longer fits
    huge = fit.estimate(ref, profile.load("raspberry-pi-4"), ctx=r.max_ctx_that_fits * 2,
                        quant="Q8_0")
    assert not huge.fits
    # the tiny model was built with 2048 positions: a longer context is flagged
    assert r.model_ctx_limit == 2048 and not r.ctx_beyond_model and huge.ctx_beyond_model


def test_fit_gguf_is_measured_from_tensors() -> None:
    ref = models.resolve("builtin:smollm2-135m")
    r = fit.estimate(ref, profile.load("raspberry-pi-4"), ctx=2048)
    size = ref.path.stat().st_size
    assert 0.9 * size < r.weights_bytes < size
    assert r.kv_cache_bytes == 2 * 30 * 3 * 64 * 2 * 2048
    assert r.model_ctx_limit == 8192 and not r.ctx_beyond_model  # llama.context_length
