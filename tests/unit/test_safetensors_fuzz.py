"""Fuzz: thousands of damaged safetensors files through the header check that models.resolve
runs on every shard (models.check_safetensors).

The corpus is generated from a fixed seed (hypothesis is not a dependency), starting from real
headers: files written by the safetensors library itself and the header of the packaged MiniLM
encoder (its data a sparse hole). Each damaged file must either pass or be refused with a
one-line ModelError, never another exception, within 1 s and 200 MB (tracemalloc). A file the
check passes must also load with the safetensors library (it is what transformers reads next).
"""

from __future__ import annotations

import json
import random
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
from safetensors.numpy import save

from edgesmith.errors import ModelError
from edgesmith.models import builtin_path, check_safetensors

SEED = 20240610
N_CASES = 4000
MAX_SECONDS = 1.0
MAX_BYTES = 200 << 20


def _small_files() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [
        save({"a": rng.standard_normal((2, 3)).astype(np.float32),
              "b": np.arange(5, dtype=np.int64), "c": np.zeros((0, 4), np.float16)},
             metadata={"format": "pt"}),
        save({f"model.layers.{i}.w": rng.standard_normal((4, 4)).astype(np.float16)
              for i in range(6)}),
        save({"x": np.ones((1, 1, 1, 3), np.uint8), "y": np.zeros(7, np.bool_),
              "z": np.ones((3, 2), np.float64)}, metadata={"k": "v", "format": "np"}),
    ]


def _real_header() -> tuple[bytes, int]:
    """The packaged MiniLM encoder's header (104 tensors), and its file's size."""
    path = builtin_path("minilm-l6") / "model.safetensors"
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(0)
        return f.read(8 + n), path.stat().st_size


def _pack(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


def _split(blob: bytes) -> tuple[bytes, bytes]:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8:8 + n], blob[8 + n:]


# -- damage to the bytes ------------------------------------------------------------------

def _flip(r: random.Random, blob: bytes) -> bytes:
    data = bytearray(blob)
    for _ in range(r.randint(1, 8)):
        data[r.randrange(min(len(data), 8 + len(_split(blob)[0])))] = r.randrange(256)
    return bytes(data)


def _truncate(r: random.Random, blob: bytes) -> bytes:
    return blob[: r.randrange(len(blob))]


def _insert(r: random.Random, blob: bytes) -> bytes:
    at = r.randrange(8, len(blob))
    junk = bytes(r.choice(b'{}[]",:0123456789-eE.\\ \x00\xff') for _ in range(r.randint(1, 16)))
    return blob[:at] + junk + blob[at:]


def _length_field(r: random.Random, blob: bytes) -> bytes:
    n = len(_split(blob)[0])
    value = r.choice([0, 1, n - 1, n + 1, len(blob) - 8, len(blob), 2**63, 2**64 - 1,
                      100_000_001, r.randrange(2**64)])
    return struct.pack("<Q", value) + blob[8:]


def _resize_data(r: random.Random, blob: bytes) -> bytes:
    header, data = _split(blob)
    cut = r.choice([-1, 1, -8, 8, -len(data)])
    data = data[:cut] if cut < 0 else data + b"\0" * cut
    return _pack(header) + data


_WEIRD: list[Any] = [None, True, False, -1, 0, 1, 2**64, -(2**63), 1.5, 1e308, "", "F32", "F128",
                     "f32", [], [1], [[1]], {}, {"a": 1}, [-1, 4], [4, 2], [0, 2**70],
                     [0.0, 4.0], [0, 4, 8], ["0", "4"], [True, False], 10**30]


def _json_damage(r: random.Random, obj: dict[str, Any]) -> bytes | None:
    """Change the parsed header ``obj`` in place, or return raw JSON text to use instead
    (deep nesting, duplicate keys, non-JSON constants)."""
    names = [k for k in obj if k != "__metadata__"]
    choice = r.randrange(10)
    if choice == 0 and names:  # one field of one tensor gets a strange value
        info = obj[r.choice(names)]
        info[r.choice(["dtype", "shape", "data_offsets"])] = r.choice(_WEIRD)
    elif choice == 1 and names:  # a field goes missing, or a tensor becomes a scalar
        name = r.choice(names)
        if r.random() < 0.5:
            obj[name].pop(r.choice(["dtype", "shape", "data_offsets"]))
        else:
            obj[name] = r.choice(_WEIRD)
    elif choice == 2 and names:  # a shape lies about the size
        info = obj[r.choice(names)]
        info["shape"] = [r.choice([0, 1, 2, 3, 10**6, 2**40]) for _ in range(r.randint(0, 4))]
    elif choice == 3 and names:  # offsets moved, swapped, shared or pointed outside
        info = obj[r.choice(names)]
        b, e = info["data_offsets"]
        info["data_offsets"] = r.choice([[e, b], [b + 1, e + 1], [b - 1, e], [0, e - b],
                                         [b, e + 2**40], [b + 4, e + 4]])
    elif choice == 4 and names:  # the dtype changes to one of another size or to none
        obj[r.choice(names)]["dtype"] = r.choice(["F16", "F64", "U8", "BF16", "F4", "F6_E2M3",
                                                  "I32", "C64", "X", "BOOL"])
    elif choice == 5:  # __metadata__ of the wrong kind
        obj["__metadata__"] = r.choice([[1], "x", 5, {"a": 1}, {"a": None}, {"a": ["b"]}, None])
    elif choice == 6:  # another JSON value at the top
        return json.dumps(r.choice([[1, 2, 3], "abc", 7, None, True, [obj]])).encode()
    elif choice == 7:  # nested deep, as arrays or objects, in various places
        depth = r.choice([4, 9, 100, 5000, 100_000])
        inner = (b"[" * depth + b"]" * depth) if r.random() < 0.5 else \
            (b'{"a":' * depth + b"1" + b"}" * depth)
        where = r.choice(["top", "shape", "meta"])
        body = json.dumps(obj).encode()
        if where == "top":
            return inner
        if where == "shape" and names:
            info = json.dumps(obj[names[0]]).encode()
            new = info.replace(b'"shape": [', b'"shape": [' + inner + b", ", 1)
            return body.replace(info, new, 1)
        return body[:-1] + b', "__x__": ' + inner + b"}"
    elif choice == 8 and names:  # a duplicate key, or a non-JSON constant
        info = json.dumps(obj[names[0]]).encode()
        body = json.dumps(obj).encode()
        extra = r.choice([b'"' + names[0].encode() + b'": ' + info,
                          b'"n": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 0]}',
                          b'"n": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}',
                          b'"n": {"dtype": "F32", "shape": [' + b"9" * 5000 + b"]}"])
        return body[:-1] + b", " + extra + b"}"
    elif names:  # a tensor dropped or added: a gap, an overlap, or an extra tensor
        if r.random() < 0.5:
            obj.pop(r.choice(names))
        else:
            src = obj[r.choice(names)]
            obj["extra"] = dict(src)
    return None


def _reheader(r: random.Random, blob: bytes) -> bytes:
    """Re-encode the header with a change at the JSON level (its length right, same data)."""
    header, data = _split(blob)
    obj = json.loads(header)
    text = _json_damage(r, obj)
    return _pack(json.dumps(obj).encode() if text is None else text) + data


DAMAGE: list[Callable[[random.Random, bytes], bytes]] = [
    _flip, _truncate, _insert, _length_field, _resize_data, _reheader, _reheader, _reheader,
    _reheader,
]


def _write(path: Path, data: bytes, file_size: int | None) -> Path:
    with open(path, "wb") as f:
        f.write(data)
        if file_size is not None:
            f.truncate(file_size)  # the rest of a real file: a sparse hole
    return path


def _run(path: Path) -> tuple[str, float, int]:
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    t0 = time.perf_counter()
    try:
        check_safetensors(path)
        outcome = "ok"
    except ModelError as exc:
        line = exc.one_line()
        assert "\n" not in line and len(line) < 1000, line
        outcome = "refused"
    return outcome, time.perf_counter() - t0, tracemalloc.get_traced_memory()[1] - base


def test_the_untouched_files_pass(tmp_path: Path) -> None:
    for blob in _small_files():
        check_safetensors(_write(tmp_path / "small.safetensors", blob, None))
    head, size = _real_header()
    assert len(check_safetensors(_write(tmp_path / "real.safetensors", head, size))
               .tensors) == 104


def test_damaged_headers_are_refused_with_a_model_error_within_bounds(tmp_path: Path) -> None:
    r = random.Random(SEED)
    small = _small_files()
    head, size = _real_header()
    counts = {"ok": 0, "refused": 0}
    slowest, largest = 0.0, 0
    tracemalloc.start()
    try:
        for i in range(N_CASES):
            real = i % 10 == 0  # the real header is checked without its data (file size only)
            base = head if real else r.choice(small)
            damage = r.choice(DAMAGE[:1] + DAMAGE[2:4] + DAMAGE[5:] if real else DAMAGE)
            data = damage(r, base)
            path = _write(tmp_path / "fuzz.safetensors", data,
                          max(size + len(data) - len(head), len(data)) if real else None)
            try:
                outcome, seconds, peak = _run(path)
            except Exception as exc:  # anything but the project's own error type
                pytest.fail(f"case {i} ({damage.__name__}): {type(exc).__name__}: {exc}; "
                            f"header starts {data[:200]!r}")
            assert seconds < MAX_SECONDS, (i, damage.__name__, seconds)
            assert peak < MAX_BYTES, (i, damage.__name__, peak)
            slowest, largest = max(slowest, seconds), max(largest, peak)
            counts[outcome] += 1
            if outcome == "ok" and not real:  # what we pass, the library must load
                try:
                    safetensors.deserialize(data)
                except Exception as exc:
                    pytest.fail(f"case {i} ({damage.__name__}) passed the check but "
                                f"safetensors refuses it: {exc}; header {data[:300]!r}")
    finally:
        tracemalloc.stop()
    # the corpus really exercises the refusals, and some damage is harmless (a changed
    # metadata value, a flipped byte inside a name)
    assert counts["refused"] > N_CASES * 0.7 and counts["ok"] > 0, counts
    print(f"{counts}, slowest {slowest * 1000:.1f} ms, largest {largest / 1e6:.1f} MB")


def _depth(v: Any) -> int:
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


def _value(r: random.Random, depth: int) -> Any:
    kind = r.randrange(4) if depth < 12 else 3
    if kind == 0:
        return [_value(r, depth + 1) for _ in range(r.randint(0, 3))]
    if kind == 1:
        return {_string(r): _value(r, depth + 1) for _ in range(r.randint(0, 3))}
    return _string(r) if r.random() < 0.7 else r.randint(-9, 9)


def _string(r: random.Random) -> str:
    return "".join(r.choice('[]{}"\\ab') for _ in range(r.randint(0, 6)))


def test_nesting_depth_ignores_brackets_in_strings() -> None:
    """The depth check before json.loads, against the parsed depth of random JSON whose
    strings are full of brackets, quotes and backslashes."""
    from edgesmith.safetensors_check import nesting_depth

    r = random.Random(SEED + 2)
    for _ in range(2000):
        v = _value(r, 0)
        assert nesting_depth(json.dumps(v).encode()) == _depth(v), json.dumps(v)
