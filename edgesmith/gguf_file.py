"""A fast reader of a GGUF file's header: its metadata and its tensor table.

gguf-py's GGUFReader builds a numpy view of every metadata item and tensor, which takes over a
second on a model with a 49k-token vocabulary; every command that looks at a GGUF (validation,
the per-tensor types after quantization, `targets fit`, `bench`) only needs the header. This
parses it straight from a memory map, following the GGUF specification (versions 2 and 3,
little-endian), and checks that every tensor's data lies inside the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: id -> struct format (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a GGUF, or its header is corrupt or truncated."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type: str  # ggml type name: F32, F16, Q4_K, ...
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    n_elements: int
    n_bytes: int
    offset: int  # absolute position of the data in the file


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


class _Cursor:
    def __init__(self, buf: Any) -> None:
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        if self.pos + n > self.size:
            raise GGUFFormatError(f"header truncated at byte {self.pos}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self) -> str:
        n = self.take("<Q")
        if self.pos + n > self.size:
            raise GGUFFormatError(f"string of {n} bytes at byte {self.pos} runs past the end")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in _SCALARS:  # numbers: one unpack for the whole array
                fmt = _SCALARS[etype]
                n = struct.calcsize(fmt) * count
                if self.pos + n > self.size:
                    raise GGUFFormatError(f"array at byte {self.pos} runs past the end")
                out = list(struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos))
                self.pos += n
                return out
            return [self.value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata type {vtype} at byte {self.pos}")


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of the GGUF at ``path``; GGUFFormatError if it is not a
    complete GGUF (bad magic, a truncated header, tensor data past the end of the file)."""
    try:
        return _read_header(Path(path))
    except GGUFFormatError:
        raise
    except (struct.error, KeyError, ValueError, OverflowError, MemoryError) as exc:
        raise GGUFFormatError(f"corrupt header: {type(exc).__name__}: {exc}") from exc


def _read_header(path: Path) -> GGUFHeader:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = path.stat().st_size
    if size < 24:
        raise GGUFFormatError(f"{size} bytes is too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        c = _Cursor(buf)
        if bytes(buf[:4]) != MAGIC:
            raise GGUFFormatError("no GGUF magic at the start")
        c.pos = 4
        version = c.take("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"GGUF version {version} (only 2 and 3, little-endian)")
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            fields[key] = c.value(c.take("<I"))
        raw = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.take("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {name} has {n_dims} dimensions")
            shape = tuple(c.take("<Q") for _ in range(n_dims))
            raw.append((name, shape, c.take("<I"), c.take("<Q")))
    align = int(fields.get("general.alignment", DEFAULT_ALIGNMENT))
    data_offset = -(-c.pos // align) * align
    tensors = []
    for name, shape, tid, rel in raw:
        try:
            qtype = GGMLQuantizationType(tid)
        except ValueError as exc:
            raise GGUFFormatError(f"tensor {name} has unknown type {tid}") from exc
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        info = TensorInfo(name, qtype.name, shape, n, n // block * type_size, data_offset + rel)
        if info.offset + info.n_bytes > size:
            raise GGUFFormatError(f"tensor {name} runs past the end of the file")
        tensors.append(info)
    return GGUFHeader(version, fields, tensors, data_offset, size)
