"""The safetensors header, checked before safetensors or transformers see the file.

A safetensors file is an 8-byte little-endian header length N, N bytes of UTF-8 JSON, then the
data section. The JSON is an object: ``__metadata__`` (optional, strings to strings) and, per
tensor, ``{"dtype", "shape", "data_offsets": [begin, end]}`` with offsets relative to the data
section. ``read_header`` checks all of it at a cost bounded by the header's size (the data is
never read): the length against the file and a limit, the nesting depth before ``json.loads``,
the types, each tensor's byte count (shape x dtype) against its offsets, and that the tensors
tile the data section exactly, as the safetensors library requires. Every problem is a
ModelError naming the file, the tensor and what is wrong.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgesmith.errors import ModelError

# The safetensors library's own limit: a longer header is refused there too.
MAX_HEADER_BYTES = 100_000_000
# A valid header nests 3 deep (header -> tensor -> shape); the margin only improves messages.
MAX_DEPTH = 8
# Bytes per element of each dtype that the safetensors library loads into torch.
DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E5M2FNUZ": 1,
    "F8_E4M3FNUZ": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
FLOAT_DTYPES = frozenset(d for d in DTYPE_BYTES if d.startswith(("F", "BF", "C")))
HINT = "re-download or re-save the model"

_NOT_SYNTAX = bytes(b for b in range(256) if b not in b'[]{}"')
_STEP = np.zeros(256, np.int32)
_STEP[list(b"[{")], _STEP[list(b"]}")] = 1, -1
_QUOTE = ord('"')
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets in the data section
    end: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def fp32_bytes(self) -> int:
        """Bytes this tensor takes once loaded with dtype=float32 (integers keep their size)."""
        stored = self.end - self.begin
        return max(self.n_elements * 4, stored) if self.dtype in FLOAT_DTYPES else stored


@dataclass(frozen=True)
class SafetensorsHeader:
    header_bytes: int
    data_bytes: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


class _Bad(Exception):
    """A problem with the header; turned into a ModelError naming the file."""


def read_header(path: Path) -> SafetensorsHeader:
    """Read and check the header of the safetensors file ``path``. Raises ModelError."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            n = _header_length(raw, size)
            text = f.read(n)
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror or exc}",
                         "check the file and its permissions") from exc
    except _Bad as exc:
        raise ModelError(f"corrupt safetensors file {path}: {exc}", HINT) from exc
    return _check(text, size, str(path))


def _header_length(raw: bytes, size: int) -> int:
    if len(raw) < 8:
        raise _Bad(f"the file has {size} bytes, fewer than its 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n == 0:
        raise _Bad("the header length is 0")
    if n > size - 8:
        raise _Bad(f"the header length {n} does not fit the file size {size}")
    if n > MAX_HEADER_BYTES:
        raise _Bad(f"the header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
    return n


def _check(text: bytes, size: int, where: str) -> SafetensorsHeader:
    try:
        header = _parse(text)
        return _tensors(header, size - 8 - len(text), len(text))
    except _Bad as exc:
        raise ModelError(f"corrupt safetensors file {where}: {exc}", HINT) from exc


def _parse(text: bytes) -> dict[str, Any]:
    depth = nesting_depth(text, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise _Bad(f"the header's JSON nests {depth}+ levels deep (a safetensors header has 3)")
    try:
        decoded = text.decode("utf-8")
        obj = json.loads(decoded, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise _Bad(f"the header is not UTF-8 text (byte {exc.start})") from exc
    except RecursionError as exc:  # not reached after the depth check; kept as a backstop
        raise _Bad("the header's JSON nests too deep") from exc
    except ValueError as exc:  # JSONDecodeError, a too-long integer, a duplicate key
        raise _Bad(f"the header is not valid JSON: {_clip(str(exc), 120)}") from exc
    if not isinstance(obj, dict):
        raise _Bad(f"the header is a JSON {_kind(obj)}, not an object")
    return obj


def nesting_depth(text: bytes, limit: int | None = None) -> int:
    """How deep brackets nest in JSON text, brackets inside strings not counted: vectorized
    over the text's quotes and brackets, linear time and bounded memory whatever the input.
    (An unbalanced or otherwise invalid text gets some depth; json.loads refuses it next.)
    With ``limit``, the scan may stop at the first megabyte that nests deeper than it."""
    limit = limit if limit is not None else len(text)
    # drop escaped backslashes, then escaped quotes: the quotes left delimit the strings
    syntax = text.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NOT_SYNTAX)
    codes = np.frombuffer(syntax, np.uint8)
    depth = deepest = quotes = 0
    for i in range(0, len(codes), _CHUNK):
        c = codes[i:i + _CHUNK]
        quote = c == _QUOTE
        inside = (np.cumsum(quote, dtype=np.int32) + quotes) & 1
        quotes += int(np.count_nonzero(quote))
        step = _STEP[c]
        step[inside.astype(bool)] = 0
        running = np.cumsum(step, dtype=np.int64) + depth
        deepest = max(deepest, int(running.max()))
        depth = int(running[-1])
        if deepest > limit:
            break
    return deepest


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"the key {_name(k)} appears twice")
            seen.add(k)
    return obj


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _tensors(header: dict[str, Any], data_bytes: int, header_bytes: int) -> SafetensorsHeader:
    metadata = header.get("__metadata__")
    if metadata is None:
        metadata = {}
    elif not isinstance(metadata, dict):
        raise _Bad(f"__metadata__ is a JSON {_kind(metadata)}, not an object of strings")
    else:
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise _Bad(f"__metadata__[{_name(k)}] is a JSON {_kind(v)}, not a string")
    tensors = {name: _entry(name, info, data_bytes)
               for name, info in header.items() if name != "__metadata__"}
    last = max((t.end for t in tensors.values()), default=0)
    if last > data_bytes:
        raise _Bad(f"truncated: the header declares {8 + header_bytes + last} bytes, the file "
                   f"has {8 + header_bytes + data_bytes}")
    end = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < end:
            raise _Bad(f"tensor {_name(t.name)} (data [{t.begin}, {t.end}]) overlaps the "
                       f"tensor before it, which ends at {end}")
        if t.begin > end:
            raise _Bad(f"{t.begin - end} bytes of the data section before tensor "
                       f"{_name(t.name)} belong to no tensor")
        end = t.end
    if end != data_bytes:
        raise _Bad(f"{data_bytes - end} bytes after the last tensor's data belong to no tensor")
    return SafetensorsHeader(header_bytes, data_bytes, tensors, metadata)


def _entry(name: str, info: Any, data_bytes: int) -> TensorEntry:
    what = f"tensor {_name(name)}"
    if not isinstance(info, dict):
        raise _Bad(f"{what} is a JSON {_kind(info)}, not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise _Bad(f"{what} has no {missing[0]}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise _Bad(f"{what} has the dtype {_show(dtype)}, not one that torch loads "
                   f"({', '.join(DTYPE_BYTES)})")
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise _Bad(f"{what} has the shape {_show(shape)}, not a list of integers in "
                   "[0, 2**64)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_size, offsets)):
        raise _Bad(f"{what} has the data_offsets {_show(offsets)}, not two integers in "
                   "[0, 2**64)")
    begin, end = offsets
    if end < begin:
        raise _Bad(f"{what} has the data_offsets {_show(offsets)}, which end before they begin")
    nbytes = _n_bytes(shape, DTYPE_BYTES[dtype])
    if nbytes != end - begin:
        needs = f"{nbytes} bytes" if nbytes is not None else "over 2**64 bytes"
        raise _Bad(f"{what}: shape {_show(shape)} of {dtype} needs {needs}, its data_offsets "
                   f"{_show(offsets)} span {end - begin} (the data section has {data_bytes})")
    return TensorEntry(name, dtype, tuple(shape), begin, end)


def _n_bytes(shape: list[int], item: int) -> int | None:
    """shape x item size, or None past 2**64 (never a huge product)."""
    if 0 in shape:
        return 0
    n = item
    for d in shape:
        n *= d
        if n >= 1 << 64:
            return None
    return n


def _is_size(v: Any) -> bool:
    """An unsigned 64-bit integer (the library's usize); JSON true/false are not numbers."""
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64


def _kind(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    return _clip(json.dumps(v))


def _name(s: str) -> str:
    return _clip(repr(s))


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
