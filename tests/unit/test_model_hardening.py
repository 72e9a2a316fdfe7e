"""Hostile and absurd model directories and files (issue 10, items 14-17).

Each case is the tiny random Llama of tests/conftest.py with one thing damaged: its
model.safetensors (a header that is JSON but not an object, nests 100000 deep, or lies about
shapes, offsets and types), its config.json (sizes that are absurd or disagree with the
tensors), or a GGUF input the structural check refuses. Every one must be a ModelError from
models.resolve, and one line + exit 2 through both `edgesmith compress` and `edgesmith export`
before any heavy work. Today's main answered with AttributeError, RecursionError,
SafetensorError, RuntimeError or AssertionError (exit 1), ran past 90 s and 3.3 GB, or wrote
a GGUF of the lie.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from edgesmith import models
from edgesmith.errors import ModelError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import tiny_gguf

TOKENIZER = ("tokenizer.json", "tokenizer_config.json")


def _blob(header: Any, data: bytes = b"") -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _f32(shape: list[int], begin: int, end: int) -> dict[str, Any]:
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


# name -> (the model.safetensors, what the one-line error says)
SAFETENSORS: dict[str, tuple[bytes, str]] = {
    # 14: JSON but not an object (AttributeError), nested deep (RecursionError)
    "header-array": (_blob([1, 2, 3]), "the header is a JSON array, not an object"),
    "header-string": (_blob("abc"), "the header is a JSON string, not an object"),
    "header-nested-arrays": (_blob(b"[" * 100_000 + b"]" * 100_000),
                             r"the header's JSON nests 100000\+ levels deep"),
    "header-nested-objects": (_blob(b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
                              r"nests 50000\+ levels deep"),
    # 15: lies (internal error: SafetensorError)
    "shape-beyond-the-data": (_blob({"w": _f32([1_000_000, 1_000_000], 0, 16)}, bytes(16)),
                              r"shape \[1000000, 1000000\] of F32 needs 4000000000000 bytes, "
                              r"its data_offsets \[0, 16\] span 16"),
    "negative-offset": (_blob({"w": _f32([4], -16, 0)}, bytes(16)),
                        r"data_offsets \[-16, 0\], not two integers in \[0, 2\*\*64\)"),
    "dtype-f128": (_blob({"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                         bytes(16)), 'the dtype "F128", not one that torch loads'),
    "metadata-list": (_blob({"__metadata__": [1], "w": _f32([4], 0, 16)}, bytes(16)),
                      "__metadata__ is a JSON array, not an object of strings"),
    "overlapping-tensors": (_blob({"a": _f32([4], 0, 16), "b": _f32([2], 8, 16)}, bytes(16)),
                            r"tensor 'b' \(data \[8, 16\]\) overlaps the tensor before it"),
    "gap-in-the-data": (_blob({"a": _f32([2], 8, 16)}, bytes(16)),
                        "8 bytes of the data section before tensor 'a' belong to no tensor"),
    "bytes-after-the-data": (_blob({"a": _f32([2], 0, 8)}, bytes(16)),
                             "8 bytes after the last tensor's data belong to no tensor"),
    "duplicate-tensor": (_blob(b'{"a": ' + json.dumps(_f32([4], 0, 16)).encode() + b', "a": '
                               + json.dumps(_f32([4], 0, 16)).encode() + b"}", bytes(16)),
                         "the key 'a' appears twice"),
}


def _set(**fields: Any) -> Callable[[dict[str, Any]], str]:
    return lambda cfg: json.dumps({**cfg, **fields})


# name -> (config.json text from the tiny model's config, what the one-line error says)
CONFIGS: dict[str, tuple[Callable[[dict[str, Any]], str], str]] = {
    # 16: was a two-line error / RuntimeError / AssertionError / AttributeError / TypeError
    "hidden-size-1e9": (_set(hidden_size=10**9), r"hidden_size is 1000000000, outside 1\.\."),
    "vocab-size-1e12": (_set(vocab_size=10**12), r"vocab_size is 1000000000000, outside 1\.\."),
    "vocab-size-negative": (_set(vocab_size=-1), r"vocab_size is -1, outside 1\.\."),
    "a-json-list": (lambda cfg: json.dumps([cfg]), "config.json is a JSON list, not an object"),
    "hidden-size-1e999": (lambda cfg: json.dumps({**cfg, "hidden_size": 0}).replace(
        '"hidden_size": 0', '"hidden_size": 1e999'), "hidden_size is inf, not an integer"),
    # ran past 90 s and 3.3 GB (compress), 6 GB (export)
    "layers-1e9": (_set(num_hidden_layers=10**9), r"num_hidden_layers is 1000000000, outside"),
    # the sizes against the tensors present (transformers and the converter took them)
    "layers-3-of-2": (_set(num_hidden_layers=3), "num_hidden_layers is 3 but the weights hold 2 "
                                                 r"layers \(layer 2 has no tensors\)"),
    "layers-1-of-2": (_set(num_hidden_layers=1), "num_hidden_layers is 1 but the weights hold a "
                                                 "layer 1"),
    "vocab-against-the-embedding": (_set(vocab_size=50_000),
                                    r"vocab_size 50000 and hidden_size 256 disagree with the "
                                    r"tensor model.embed_tokens.weight of shape \[49152, 256\]"),
    "intermediate-against-the-mlp": (_set(intermediate_size=512),
                                     r"intermediate_size and hidden_size disagree with the tensor "
                                     r"model.layers.0.mlp.\w+_proj.weight"),
    "heads-against-k-proj": (_set(num_key_value_heads=4),
                             r"num_key_value_heads and hidden_size disagree with the tensor "
                             r"model.layers.0.self_attn.[kv]_proj.weight of shape \[128, 256\]"),
    "architectures-an-object": (_set(architectures={"a": 1}),
                                "architectures is {'a': 1}, not a list of names"),
    "nested-100000-deep": (lambda cfg: "[" * 100_000 + "]" * 100_000, "it nests too deep"),
}


@pytest.fixture(scope="module")
def bad_dirs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-models")
    cfg = json.loads((tiny_llama / "config.json").read_text())
    out = {}
    for name, (data, _) in SAFETENSORS.items():
        d = out[name] = root / name
        d.mkdir()
        for f in ("config.json", *TOKENIZER):
            shutil.copy(tiny_llama / f, d / f)
        (d / "model.safetensors").write_bytes(data)
    for name, (text, _) in CONFIGS.items():
        d = out[name] = root / name
        d.mkdir()
        for f in TOKENIZER:
            shutil.copy(tiny_llama / f, d / f)
        (d / "model.safetensors").symlink_to(tiny_llama / "model.safetensors")  # read only
        (d / "config.json").write_text(text(cfg))
    return out


CASES = {**{k: v[1] for k, v in SAFETENSORS.items()}, **{k: v[1] for k, v in CONFIGS.items()}}


def test_the_tiny_model_passes(tiny_llama: Path) -> None:
    """The untouched model resolves (so each case below is refused for its one change)."""
    from edgesmith import hf_check

    ref = models.resolve(str(tiny_llama))
    models.check_load_memory(ref)
    assert len(hf_check.safetensors_tensors(tiny_llama)) == 20


@pytest.mark.parametrize("name", list(CASES))
def test_resolve_refuses(name: str, bad_dirs: dict[str, Path]) -> None:
    with pytest.raises(ModelError) as info:
        models.resolve(str(bad_dirs[name]))
    line = info.value.one_line()
    assert str(bad_dirs[name]) in line and "\n" not in line and len(line) < 600, line
    assert re.search(CASES[name], line), line


# What a refusal may cost at most: the absurd configs took 3.3 GB (compress) and 6 GB (export)
# and ran past 90 s; a refusal reads headers only (seconds, even on a busy machine).
CLI_ADDRESS_SPACE = 4 << 30
CLI_TIMEOUT_S = 180


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The edgesmith command line, as a user runs it, under an address-space cap (also a
    safety net: a check that regressed must not take the machine's memory)."""
    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (CLI_ADDRESS_SPACE, CLI_ADDRESS_SPACE))

    return subprocess.run([sys.executable, "-m", "edgesmith.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          preexec_fn=cap, env={**os.environ, "COLUMNS": "300"})


def _one_line_exit_2(p: subprocess.CompletedProcess[str], says: str, out: Path) -> None:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), \
        (p.returncode, p.stderr[-3000:])
    assert re.search(says, lines[0]), lines[0]
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())


@pytest.mark.parametrize("command", ["compress", "export"])
@pytest.mark.parametrize("name", list(CASES))
def test_cli_one_line_exit_2(name: str, command: str, bad_dirs: dict[str, Path],
                             tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["-t", "raspberry-pi-5"] if command == "compress" else []
    p = _cli(command, str(bad_dirs[name]), *args, "-o", str(out), cwd=tmp_path)
    _one_line_exit_2(p, CASES[name], out)
    assert str(bad_dirs[name]) in p.stderr


def test_load_errors_of_compress_are_one_line(tiny_llama: Path, copy_model: Any,
                                              tmp_path: Path) -> None:
    """A config.json that the header checks cannot judge (an unknown activation) fails in
    transformers: compress says so in one line, exit 2 (was: internal error: KeyError)."""
    d = tmp_path / "act"
    d.mkdir()
    for f in TOKENIZER:
        shutil.copy(tiny_llama / f, d / f)
    (d / "model.safetensors").symlink_to(tiny_llama / "model.safetensors")
    cfg = json.loads((tiny_llama / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "no-such-activation"}))
    out = tmp_path / "out"
    p = _cli("compress", str(d), "-t", "raspberry-pi-5", "-o", str(out), cwd=tmp_path)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, \
        (p.returncode, p.stderr[-3000:])
    assert errors[0] == p.stderr.strip().splitlines()[-1]
    assert f"transformers cannot load {d}: KeyError: 'no-such-activation'" in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_missing_weights_are_refused_not_left_random(tiny_llama: Path, tmp_path: Path) -> None:
    """A tensor the config needs but the file lacks: transformers would initialise it at
    random (a warning) and the reference model would be wrong; load_hf refuses."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "missing"
    d.mkdir()
    for f in ("config.json", *TOKENIZER):
        shutil.copy(tiny_llama / f, d / f)
    weights = load_file(tiny_llama / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    models.resolve(str(d))  # the headers are consistent: only the architecture knows
    with pytest.raises(ModelError, match=r"lacks weights its config.json needs: "
                                         r"model.layers.1.mlp.up_proj.weight"):
        models.load_hf(d)


def _too_big_for_this_machine(tiny_llama: Path, dest: Path) -> Path:
    """A consistent model whose fp32 load needs more than this machine's RAM: a sparse file
    (no disk used), its config.json agreeing with its tensors."""
    ram = psutil.virtual_memory().total
    hidden = 8192 if ram < 64 << 30 else 1 << 17
    vocab = min(ram // (4 * hidden) + 1, 1 << 22)
    dest.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
               intermediate_size=4 * hidden, num_attention_heads=64, num_key_value_heads=8,
               head_dim=hidden // 64)
    (dest / "config.json").write_text(json.dumps(cfg))
    for f in TOKENIZER:
        shutil.copy(tiny_llama / f, dest / f)
    emb = vocab * hidden * 4
    header = json.dumps({"model.embed_tokens.weight": _f32([vocab, hidden], 0, emb),
                         "model.layers.0.input_layernorm.weight":
                         _f32([hidden], emb, emb + 4 * hidden)}).encode()
    with open(dest / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + emb + 4 * hidden)
    return dest


def test_a_load_bigger_than_ram_is_refused_before_allocating(tiny_llama: Path,
                                                             tmp_path: Path) -> None:
    d = _too_big_for_this_machine(tiny_llama, tmp_path / "big")
    ref = models.resolve(str(d))  # a real model (for a bigger machine): resolve takes it
    with pytest.raises(ModelError, match=r"loading .*big in fp32 needs about [\d,.]+ GB of "
                                         r"memory, this machine has [\d,.]+ GB of RAM"):
        models.check_load_memory(ref)
    out = tmp_path / "out"
    # under the address-space cap (far below the load): a regressed check fails, not the machine
    p = _cli("compress", str(d), "-t", "raspberry-pi-5", "-o", str(out), cwd=tmp_path)
    _one_line_exit_2(p, "needs about .* GB of memory, this machine has", out)


def test_require_memory() -> None:
    from edgesmith import hf_check

    hf_check.require_memory(10**9, "x", ram=2 * 10**9)
    with pytest.raises(ModelError, match="x needs about 3.0 GB of memory, this machine has "
                                         "2.0 GB of RAM"):
        hf_check.require_memory(3 * 10**9, "x", ram=2 * 10**9)


# -- GGUF inputs: gguf_file.check_structure runs in models.resolve ---------------------------

def _u32(key: str, value: int) -> Callable[[bytes], bytes]:
    return lambda base: bytes(tiny_gguf.set_value(bytearray(base), key, "<I", value))


def _no_tensors(base: bytes) -> bytes:
    data = bytearray(base)
    struct.pack_into("<Q", data, 8, 0)
    return bytes(data)


GGUF_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    # 13: compress dequantized garbage through transformers (past 6 GB in 35 s on a real model)
    "rope-dims-4096": (_u32("llama.rope.dimension_count", 4096), "rope.dimension_count is 4096"),
    "context-length-0": (_u32("llama.context_length", 0), "context_length is 0"),
    "zero-tensors": (_no_tensors, "holds no tensors"),
    "block-count-3": (_u32("llama.block_count", 3), "block_count is 3 but the tensors"),
}


@pytest.fixture(scope="module")
def bad_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad-gguf")
    base = tiny_gguf.build(root / "tiny.gguf").read_bytes()
    out = {}
    for name, (patch, _) in GGUF_CASES.items():
        out[name] = root / f"{name}.gguf"
        out[name].write_bytes(patch(base))
    return out


@pytest.mark.parametrize("command", ["compress", "export"])
@pytest.mark.parametrize("name", list(GGUF_CASES))
def test_gguf_cli_one_line_exit_2(name: str, command: str, bad_ggufs: dict[str, Path],
                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["-t", "raspberry-pi-5"] if command == "compress" else []
    p = _cli(command, str(bad_ggufs[name]), *args, "-o", str(out), cwd=tmp_path)
    _one_line_exit_2(p, f"invalid GGUF file {re.escape(str(bad_ggufs[name]))}: .*"
                     + GGUF_CASES[name][1], out)
