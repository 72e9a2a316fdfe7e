"""The fast GGUF header reader agrees with gguf-py's GGUFReader and refuses damaged files."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesmith.gguf_file import GGUFFormatError, read_header
from edgesmith.models import builtin_path


def _reader_view(path: Path) -> tuple[list[tuple[object, ...]], dict[str, object]]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    tensors = [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape), int(t.n_elements),
                int(t.n_bytes), int(t.data_offset)) for t in r.tensors]
    fields = {}
    for key in ("general.architecture", "tokenizer.ggml.pre", "general.file_type",
                "llama.block_count", "llama.embedding_length"):
        f = r.fields[key]
        v = f.parts[f.data[0]]
        fields[key] = bytes(v).decode() if f.types[0].name == "STRING" else v[0]
    return tensors, fields


def test_matches_gguf_py_on_the_packaged_model() -> None:
    path = builtin_path("smollm2-135m")
    h = read_header(path)
    tensors, fields = _reader_view(path)
    assert [(t.name, t.type, t.shape, t.n_elements, t.n_bytes, t.offset)
            for t in h.tensors] == tensors
    assert {k: h.field(k) for k in fields} == fields
    tokens = h.field("tokenizer.ggml.tokens")
    assert len(tokens) == 49152 and tokens[0] == "<|endoftext|>"
    assert h.tensors[-1].offset + h.tensors[-1].n_bytes <= h.file_size


@pytest.mark.parametrize(("cut", "message"), [
    (10, "too short"), (2000, "truncated|runs past|cannot fit"), (5_000_000, "runs past the end")])
def test_truncated_files_are_refused(tmp_path: Path, cut: int, message: str) -> None:
    with open(builtin_path("smollm2-135m"), "rb") as f:
        data = f.read(cut)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data)
    with pytest.raises(GGUFFormatError, match=message):
        read_header(bad)


def test_bad_magic_and_version(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 60)
    with pytest.raises(GGUFFormatError, match="magic"):
        read_header(bad)
    bad.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + b"\0" * 60)
    with pytest.raises(GGUFFormatError, match="version 7"):
        read_header(bad)


def test_random_damage_is_always_a_format_error(tmp_path: Path) -> None:
    """Bytes flipped anywhere in the header give GGUFFormatError or a header, never a crash."""
    import random

    data = bytearray(builtin_path("smollm2-135m").read_bytes()[:2_000_000])
    rng = random.Random(0)
    bad = tmp_path / "damaged.gguf"
    for _ in range(200):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            damaged[rng.randrange(8, 4096)] = rng.randrange(256)
        bad.write_bytes(damaged)
        with pytest.raises(GGUFFormatError):  # truncated at 2 MB: never a complete GGUF
            read_header(bad)
