"""Hostile GGUF files (issue 10, items 8 and 10-13): each is refused before any heavy work with
one line naming the file and the problem, and through the CLI with exit code 2.

Every file is the tiny llama GGUF of tests/data/tiny_gguf.py (which llama.cpp loads and runs)
with one field patched. On the code before these checks they gave a RecursionError, a
ZeroDivisionError, a TypeError, a TemplateSyntaxError (exit 1), llama.cpp's GGML_ASSERT
(SIGABRT, exit 134, no message) or llama.cpp's bare "Failed to load model from file".
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import tiny_gguf as T

from edgesmith import gguf_file
from edgesmith.errors import ModelError
from edgesmith.models import builtin_path

Patch = Callable[[bytes, bytes], bytes]


def _u32(key: str, value: int) -> Patch:
    return lambda base, _: bytes(T.set_value(bytearray(base), key, "<I", value))


def _insert(key: str, vtype: int, payload: bytes) -> Patch:
    return lambda base, _: bytes(T.insert_kv(base, key, vtype, payload))


def _tensor(name: str, what: str, change: Callable[[int], int]) -> Patch:
    def patch(base: bytes, _: bytes) -> bytes:
        data = bytearray(base)
        type_at, offset_at = T.tensor_fields(base, name)
        at, fmt = (type_at, "<I") if what == "type" else (offset_at, "<Q")
        (v,) = struct.unpack_from(fmt, data, at)
        struct.pack_into(fmt, data, at, change(v))
        return bytes(data)
    return patch


def _overlap(base: bytes, _: bytes) -> bytes:
    data = bytearray(base)
    _, q_at = T.tensor_fields(base, "blk.0.attn_q.weight")
    _, k_at = T.tensor_fields(base, "blk.0.attn_k.weight")
    data[k_at : k_at + 8] = data[q_at : q_at + 8]
    return bytes(data)


def _swap_dims(name: str) -> Patch:
    def patch(base: bytes, _: bytes) -> bytes:
        data = bytearray(base)
        at = T.layout(base).tensor_at[name] + 4  # past n_dims: the dimensions
        data[at : at + 16] = data[at + 8 : at + 16] + data[at : at + 8]
        return bytes(data)
    return patch


def _no_tensors(base: bytes, _: bytes) -> bytes:
    data = bytearray(base)
    struct.pack_into("<Q", data, 8, 0)
    return bytes(data)


ARRAY, UINT32, STRING = 9, 4, 8
# name -> (patch of the tiny model's bytes (and of its copy without general.alignment), what
# the one-line error must say)
CASES: dict[str, tuple[Patch, str]] = {
    # 10: arrays nested 5000 deep (RecursionError)
    "nested-arrays": (_insert("test.nested", ARRAY, T.nested_arrays(5000)), "arrays nested"),
    # 11: alignment 0 (ZeroDivisionError), a list (TypeError), not a power of two
    "alignment-0": (_u32("general.alignment", 0), "general.alignment is 0, not a power of two"),
    "alignment-48": (_u32("general.alignment", 48), "general.alignment is 48, not a power"),
    "alignment-list": (
        lambda _, noalign: bytes(T.insert_kv(noalign, "general.alignment", ARRAY,
                                             struct.pack("<IQII", UINT32, 2, 32, 32))),
        "general.alignment is an array of 2 items, not an unsigned 32-bit integer"),
    # 12: llama.cpp's limits and the tensors present (SIGABRT in llama.cpp for the first four)
    "block-count-1000": (_u32("llama.block_count", 1000), r"llama.block_count is 1000, outside "
                                                          r"\[1, 512\]"),
    "experts-used-without-experts": (_insert("llama.expert_used_count", UINT32,
                                             struct.pack("<I", 2)), "with no experts"),
    "nextn-layers-past-the-blocks": (_insert("llama.nextn_predict_layers", UINT32,
                                             struct.pack("<I", 5)), "nextn_predict_layers is 5"),
    "unknown-rope-scaling": (_insert("llama.rope.scaling.type", STRING,
                                     struct.pack("<Q", 5) + b"bogus"),
                             "rope.scaling.type is 'bogus', not one of none, linear"),
    "block-count-3": (_u32("llama.block_count", 3), "block_count is 3 but the tensors are of "
                                                    "blk.0 to blk.1"),
    "kv-heads-not-dividing": (_u32("llama.attention.head_count_kv", 3),
                              "4 attention heads and 3 key-value heads"),
    "kv-heads-0": (_u32("llama.attention.head_count_kv", 0), "head_count_kv is 0"),
    "embedding-length": (_u32("llama.embedding_length", 4096),
                         "embedding_length is 4096 but token_embd.weight has shape"),
    # 13: shapes, offsets, sizes and types against the file (compress dequantized garbage)
    "rope-dims-4096": (_u32("llama.rope.dimension_count", 4096),
                       "rope.dimension_count is 4096, must be equal to the head size 16"),
    "context-length-0": (_u32("llama.context_length", 0), "context_length is 0"),
    "type-q8_0-to-f32": (_tensor("blk.0.attn_q.weight", "type", lambda _: 0),
                         r"blk.0.attn_q.weight \(F32, shape \[64, 64\]\) ends at .*overlap"),
    "type-to-unknown": (_tensor("blk.0.attn_q.weight", "type", lambda _: 200),
                        "unknown type 200"),
    "misaligned-offset": (_tensor("blk.0.attn_q.weight", "offset", lambda v: v + 1),
                          "not aligned to 32 bytes"),
    "overlapping-offsets": (_overlap, "attn_k.weight starts at data offset .* overlap"),
    "gap-between-tensors": (_tensor("blk.0.attn_q.weight", "offset", lambda v: v + 32),
                            "a gap"),
    "zero-tensors": (_no_tensors, "holds no tensors"),
    # found by running llama.cpp on files the fuzz corpus let through: SIGABRT / SIGSEGV
    "duplicate-token": (lambda base, _: bytes(T.rename(bytearray(base), "<0x41>", "<0x42>")),
                        "the token '<0x42>' is in tokenizer.ggml.tokens twice"),
    "negative-rms-epsilon": (
        lambda base, _: bytes(T.set_value(bytearray(base),
                                          "llama.attention.layer_norm_rms_epsilon", "<f", -1.0)),
        "layer_norm_rms_epsilon is -1.0, not a finite number >= 0"),
    "weight-of-integers": (_tensor("blk.0.attn_v.weight", "type", lambda _: 25),  # F16 -> I16
                           "blk.0.attn_v.weight has type I16, which llama.cpp cannot compute"),
    "shape-transposed": (_swap_dims("blk.1.ffn_up.weight"),  # same size, other shape
                         r"blk.1.ffn_up.weight has shape \[128, 64\], the hyperparameters "
                         r"give \[64, 128\]"),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    d = tmp_path_factory.mktemp("tiny-gguf")
    return (T.build(d / "tiny.gguf").read_bytes(),
            T.build(d / "noalign.gguf", alignment=False).read_bytes())


@pytest.fixture(scope="module")
def hostile(models: tuple[bytes, bytes], tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    out = {}
    for name, (patch, _) in CASES.items():
        out[name] = d / f"{name}.gguf"
        out[name].write_bytes(patch(*models))
    out["template"] = T.build(d / "template.gguf", template="{% for %}")
    return out


def _refusal(path: Path) -> str:
    with pytest.raises(ModelError) as info:
        gguf_file.check_structure(path)
    return info.value.one_line()


def test_the_tiny_model_and_smollm2_pass(models: tuple[bytes, bytes], tmp_path: Path) -> None:
    """The untouched files pass (so each case below is refused for its one patch)."""
    from edgesmith.bench.runners.llama_cpp import LlamaCppRunner

    for i, data in enumerate(models):
        (tmp_path / f"{i}.gguf").write_bytes(data)
        gguf_file.check_structure(tmp_path / f"{i}.gguf")
    gguf_file.check_structure(builtin_path("smollm2-135m"))
    sess = LlamaCppRunner().open(tmp_path / "0.gguf", n_ctx=64)
    assert len(sess.generate(sess.tokenize("a a"), 3).generated_tokens) == 3
    sess.close()


@pytest.mark.parametrize("name", list(CASES))
def test_check_structure_refuses(name: str, hostile: dict[str, Path]) -> None:
    """What compress (models.resolve), bench and serve call before any heavy work."""
    line = _refusal(hostile[name])
    assert str(hostile[name]) in line and "\n" not in line
    assert re.search(CASES[name][1], line), line


@pytest.mark.parametrize("name", ["nested-arrays", "alignment-0", "alignment-list"])
def test_reader_raises_only_its_format_error(name: str, hostile: dict[str, Path]) -> None:
    with pytest.raises(gguf_file.GGUFFormatError, match=CASES[name][1]):
        gguf_file.read_header(hostile[name])


@pytest.mark.parametrize(("etype", "count", "says"), [
    (0, (1 << 23) + 1, "array of 8388609 numbers at byte 37: over 8388608"),
    (STRING, (1 << 22) + 1, "array of 4194305 strings at byte 37: over 4194304"),
])
def test_huge_metadata_arrays_are_refused_unread(etype: int, count: int, says: str,
                                                 tmp_path: Path) -> None:
    """An array as large as the file allows (sparse zeros here: empty strings, zero bytes)
    is refused before it becomes a list of millions of Python objects."""
    import tracemalloc

    bad = tmp_path / "huge-array.gguf"
    with open(bad, "wb") as f:
        f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + T.kv_bytes("x", ARRAY, struct.pack(
            "<IQ", etype, count)))
        f.truncate(64 + 8 * count)
    tracemalloc.start()
    try:
        with pytest.raises(gguf_file.GGUFFormatError, match=says):
            gguf_file.read_header(bad)
        assert tracemalloc.get_traced_memory()[1] < 10 * 2**20
    finally:
        tracemalloc.stop()


def _bench(path: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgesmith.cli", "bench", str(path), "--repeat", "1",
         "--warmup", "0", "--prompt-tokens", "4", "--gen-tokens", "2", "-o",
         str(tmp_path / "r.json")],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "300"}, timeout=300)


@pytest.mark.parametrize(("name", "says"), [
    ("nested-arrays", "arrays nested"),  # was: internal error: RecursionError, exit 1
    ("alignment-0", "general.alignment is 0"),  # internal error: ZeroDivisionError
    ("block-count-1000", "block_count is 1000"),  # SIGABRT, exit 134, nothing printed
    ("unknown-rope-scaling", "rope.scaling.type"),  # SIGABRT
    ("duplicate-token", "twice"),  # SIGABRT
    # 8: was internal error: TemplateSyntaxError, exit 1 (llama-cpp-python compiles it)
    ("template", r"chat template tokenizer.chat_template of \S+ does not compile: "
                 r"TemplateSyntaxError: Expected an expression.*\(line 1\)"),
    ("type-q8_0-to-f32", "overlap"),  # llama.cpp: "Failed to load model from file" only
])
def test_bench_cli_one_line_exit_2(name: str, says: str, hostile: dict[str, Path],
                                   tmp_path: Path) -> None:
    p = _bench(hostile[name], tmp_path)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, \
        (p.returncode, p.stderr[-2000:])
    assert str(hostile[name]) in errors[0]
    assert re.search(says, errors[0]), errors[0]
    assert not (tmp_path / "r.json").exists()


def test_llama_cpp_refusal_names_its_reason(models: tuple[bytes, bytes],
                                            tmp_path: Path) -> None:
    """A file that passes the header checks but that llama.cpp refuses (a required tensor is
    missing) says what llama.cpp logged, not only "Failed to load model from file"."""
    bad = tmp_path / "missing-tensor.gguf"
    bad.write_bytes(T.rename(bytearray(models[0]), "blk.0.ffn_up.weight",
                             "blk.0.ffn_xp.weight"))
    gguf_file.check_structure(bad)  # the header is consistent: only llama.cpp knows the names
    p = _bench(bad, tmp_path)
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert p.returncode == 2 and len(errors) == 1, p.stderr[-2000:]
    assert f"llama.cpp cannot load {bad}: tensor 'blk.0.ffn_up.weight' not found" in errors[0]


@pytest.mark.parametrize(("name", "says"), [
    ("block-count-1000", "block_count is 1000"),  # was SIGABRT, exit 134, nothing printed
    ("template", r"chat template tokenizer.chat_template of \S+ does not compile"),
])
def test_serve_cli_one_line_exit_2(name: str, says: str, hostile: dict[str, Path]) -> None:
    """serve opens the model through the same runner: refused before llama.cpp sees it."""
    import socket

    with socket.socket() as s:  # a free port (the model is refused before serving anyway)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "edgesmith.cli", "serve", str(hostile[name]),
                        "--port", str(port)], capture_output=True, text=True,
                       env={**os.environ, "COLUMNS": "300"}, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr
    assert re.search(says, errors[0]), errors[0]
