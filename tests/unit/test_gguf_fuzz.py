"""Fuzz test of the GGUF header reader and check_structure (issue 10, "Must show").

Thousands of damaged headers, made from the tiny llama GGUF of tests/data/tiny_gguf.py by a
seeded generator (the corpus is the seed: the same cases on every run and machine): bit flips,
overwritten bytes, truncations, metadata and tensor-table fields set to boundary values, counts
and string lengths set to huge ones, value types changed, inserted items (nested arrays among
them). Each must give a header or the project's own error (ModelError; GGUFFormatError is
one), within 1 s and 200 MB (tracemalloc) per file. A failure prints the case to replay.
"""

from __future__ import annotations

import random
import struct
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import tiny_gguf as T

from edgesmith import gguf_file
from edgesmith.errors import ModelError

CASES = 2500  # per test; about 5 s each here
MAX_S, MAX_BYTES = 1.0, 200 * 2**20
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 9, 12, 13, 15, 16, 31, 32, 33, 48, 64, 255, 256, 511, 512,
               513, 1000, 4096, 2**16 - 1, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**48,
               2**63 - 1, 2**63, 2**64 - 1]


def _number(rng: random.Random, bits: int) -> int:
    v = rng.choice(INTERESTING) if rng.random() < 0.8 else rng.getrandbits(bits)
    return v % 2**bits


def _mutators(base: bytes) -> dict[str, Callable[[random.Random], bytes]]:
    lay = T.layout(base)
    keys, tensors = list(lay.value_at), list(lay.tensor_at)
    head = lay.header_end + 64

    def flips(rng: random.Random) -> bytes:
        d = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            d[rng.randrange(head)] ^= 1 << rng.randrange(8)
        return bytes(d)

    def bytes_(rng: random.Random) -> bytes:
        d = bytearray(base)
        at = rng.randrange(head)
        n = rng.randint(1, 16)
        d[at : at + n] = rng.randbytes(n)
        return bytes(d)

    def truncate(rng: random.Random) -> bytes:
        return base[: rng.randrange(head) if rng.random() < 0.7 else rng.randrange(len(base))]

    def value(rng: random.Random) -> bytes:
        d = bytearray(base)
        _, at = lay.value_at[rng.choice(keys)]
        fmt = rng.choice(["<B", "<I", "<Q"])
        struct.pack_into(fmt, d, at, _number(rng, 8 * struct.calcsize(fmt)))
        return bytes(d)

    def vtype(rng: random.Random) -> bytes:
        d = bytearray(base)
        at, _ = lay.value_at[rng.choice(keys)]
        struct.pack_into("<I", d, at, rng.choice([*range(14), 2**31, 2**32 - 1]))
        return bytes(d)

    def length(rng: random.Random) -> bytes:  # a key's or a string's length field
        d = bytearray(base)
        key = rng.choice(keys)
        at, val = lay.value_at[key]
        pos = rng.choice([at - len(key.encode()) - 8, val])
        struct.pack_into("<Q", d, pos, _number(rng, 64))
        return bytes(d)

    def counts(rng: random.Random) -> bytes:
        d = bytearray(base)
        struct.pack_into("<Q", d, rng.choice([8, 16]), _number(rng, 64))
        return bytes(d)

    def tensor(rng: random.Random) -> bytes:
        d = bytearray(base)
        at = lay.tensor_at[rng.choice(tensors)]
        (n_dims,) = struct.unpack_from("<I", d, at)
        field = rng.choice(["n_dims", "dim", "type", "offset"])
        if field == "n_dims":
            struct.pack_into("<I", d, at, _number(rng, 32))
        elif field == "dim":
            struct.pack_into("<Q", d, at + 4 + 8 * rng.randrange(n_dims), _number(rng, 64))
        elif field == "type":
            struct.pack_into("<I", d, at + 4 + 8 * n_dims, _number(rng, 32) % 64)
        else:
            struct.pack_into("<Q", d, at + 8 + 8 * n_dims, _number(rng, 64))
        return bytes(d)

    def insert(rng: random.Random) -> bytes:
        key = rng.choice(["general.alignment", "llama.block_count", "llama.expert_count",
                          "llama.expert_used_count", "llama.attention.head_count",
                          "llama.rope.scaling.type", "tokenizer.chat_template", "x"])
        kind = rng.randrange(4)
        if kind == 0:  # arrays nested up to 5000 deep
            return bytes(T.insert_kv(base, key, 9, T.nested_arrays(
                rng.choice([1, 2, 3, 4, 5, 8, 100, 5000]))))
        if kind == 1:  # an array of numbers, sized to the file or not
            etype = rng.choice([0, 4, 6, 10])
            count = _number(rng, 64) if rng.random() < 0.5 else rng.randrange(40)
            payload = struct.pack("<IQ", etype, count) + rng.randbytes(rng.randrange(200))
            return bytes(T.insert_kv(base, key, 9, payload))
        if kind == 2:  # a string, or a scalar of any type
            vt = rng.choice([8, 4, 6, 7, 10, 11, 12])
            payload = (struct.pack("<Q", rng.randrange(12)) if vt == 8 else b"") \
                + rng.randbytes(rng.randrange(1, 12))
            return bytes(T.insert_kv(base, key, vt, payload))
        return bytes(T.insert_kv(base, key, rng.randrange(16), rng.randbytes(rng.randrange(32))))

    return {f.__name__: f for f in (flips, bytes_, truncate, value, vtype, length, counts,
                                    tensor, insert)}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return T.build(tmp_path_factory.mktemp("fuzz") / "tiny.gguf").read_bytes()


def _fuzz(base: bytes, tmp_path: Path, seed: int, target: Callable[[Path], object]) -> Counter:
    mutators = _mutators(base)
    names = sorted(mutators)
    rng = random.Random(seed)
    path = tmp_path / "damaged.gguf"
    outcomes: Counter[str] = Counter()
    tracemalloc.start()
    # the file is rewritten in place: creating it anew costs milliseconds a case here
    with tracemalloc_stopped(), open(path, "wb") as f:
        for case in range(CASES):
            kind = rng.choice(names)
            data = mutators[kind](rng)
            f.seek(0)
            f.write(data)
            f.truncate()
            f.flush()
            replay = f"case {case} of seed {seed} ({kind}, {len(data)} bytes)"
            tracemalloc.reset_peak()
            t0 = time.perf_counter()
            try:
                target(path)
                outcomes["accepted"] += 1
            except ModelError as exc:
                outcomes["refused"] += 1
                assert str(exc).isprintable() and len(str(exc)) < 1500, (replay, str(exc))
            except Exception as exc:
                pytest.fail(f"{replay}: {type(exc).__name__}: {exc}"[:2000])
            took = time.perf_counter() - t0
            peak = tracemalloc.get_traced_memory()[1]
            assert took < MAX_S, f"{replay} took {took:.2f} s"
            assert peak < MAX_BYTES, f"{replay} allocated {peak / 2**20:.0f} MB"
    return outcomes


@contextmanager
def tracemalloc_stopped() -> Iterator[None]:
    try:
        yield
    finally:
        tracemalloc.stop()


def test_damaged_headers_read_header(base: bytes, tmp_path: Path) -> None:
    """The reader: a header or GGUFFormatError, whatever the bytes."""
    def read(path: Path) -> object:
        try:
            return gguf_file.read_header(path)
        except gguf_file.GGUFFormatError as exc:
            raise ModelError(str(exc)) from exc  # only its own error type counts as refused

    outcomes = _fuzz(base, tmp_path, seed=1, target=read)
    assert outcomes["accepted"] > CASES // 10 and outcomes["refused"] > CASES // 2, outcomes


def test_damaged_headers_check_structure(base: bytes, tmp_path: Path) -> None:
    """check_structure: None or ModelError naming the file, whatever the bytes."""
    outcomes = _fuzz(base, tmp_path, seed=2, target=gguf_file.check_structure)
    assert outcomes["accepted"] > CASES // 20 and outcomes["refused"] > CASES // 2, outcomes
