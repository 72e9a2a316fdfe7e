"""A fast reader of a GGUF file's header: its metadata and its tensor table.

gguf-py's GGUFReader builds a numpy view of every metadata item and tensor, which takes over a
second on a model with a 49k-token vocabulary; every command that looks at a GGUF (validation,
the per-tensor types after quantization, `targets fit`, `bench`) only needs the header. This
parses it straight from a memory map, following the GGUF specification (versions 2 and 3,
little-endian), and checks that every tensor's data lies inside the file.

Whatever the bytes, ``read_header`` returns a header or raises GGUFFormatError, with bounded
work: a declared count is checked against the bytes left before anything is read, and arrays
nest at most ``MAX_ARRAY_NESTING`` deep. ``check_structure`` (in ``gguf_check``) goes further,
to what llama.cpp and transformers need before they are handed the file.
"""

from __future__ import annotations

import array
import mmap
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgesmith.errors import ModelError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_ARRAY_NESTING = 4  # the spec allows arrays of arrays; llama.cpp reads none, real files nest 0
# GGUF metadata value types: id -> struct format (8: string, 9: array are handled apart)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# array.array type codes of the scalar types (bool as unsigned bytes; 'I' and 'Q' are 4 and 8
# bytes on every platform Python supports here)
_ARRAY_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "B", 10: "Q", 11: "q",
                12: "d"}
# bounds on one metadata array, so its Python form stays small whatever the file (real arrays:
# vocabularies and merge lists under 1M strings, per-token numbers, a tokenizer's charsmap)
MAX_STRINGS = 1 << 22  # a Python string costs ~7 times its 8-byte minimum in the file
MAX_ITEMS = 1 << 23  # numbers: at most 64 MB as an array.array
INTEGER_TYPES = frozenset({0, 1, 2, 3, 4, 5, 10, 11})
UINT32 = 4
_U64 = struct.Struct("<Q")


class GGUFFormatError(ModelError, ValueError):
    """The file is not a GGUF, or its header is corrupt or truncated (its message does not
    name the file: callers add it)."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(shown(message, 500), hint)


def shown(text: str, limit: int = 80) -> str:
    """Text from a file as it may appear in a one-line message: control characters escaped
    (no newline, no terminal escape sequence), at most ``limit`` characters."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    # GGUF value type of each field: (type,) for a scalar or string, (9, element type) for
    # an array (9 again for an array of arrays)
    types: dict[str, tuple[int, ...]] = field(default_factory=dict)
    alignment: int = DEFAULT_ALIGNMENT

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
        if self.pos + 8 > self.size:
            raise GGUFFormatError(f"header truncated at byte {self.pos}")
        (n,) = _U64.unpack_from(self.buf, self.pos)
        end = self.pos + 8 + n
        if end > self.size:
            raise GGUFFormatError(f"string of {n} bytes at byte {self.pos} runs past the end")
        s = self.buf[self.pos + 8 : end].decode("utf-8", errors="replace")
        self.pos = end
        return s

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row (a vocabulary: the loop of ``string``, inlined)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for _ in range(count):
            if pos + 8 > size:
                raise GGUFFormatError(f"header truncated at byte {pos}")
            end = pos + 8 + unpack(buf, pos)[0]
            if end > size:
                raise GGUFFormatError(f"string of {end - pos - 8} bytes at byte {pos} runs past "
                                      "the end")
            append(buf[pos + 8 : end].decode("utf-8", errors="replace"))
            pos = end
        self.pos = pos
        return out

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            return self.array(depth)
        raise GGUFFormatError(f"unknown metadata type {vtype} at byte {self.pos}")

    def array(self, depth: int) -> list[Any] | array.array[Any]:
        at = self.pos
        etype, count = self.take("<I"), self.take("<Q")
        if etype in _SCALARS:  # numbers: as compact as in the file (a token_type array...)
            code = _ARRAY_CODES[etype]
            n = array.array(code).itemsize * count
            if self.pos + n > self.size:
                raise GGUFFormatError(f"array of {count} items at byte {at} runs past the end")
            if count > MAX_ITEMS:
                raise GGUFFormatError(f"array of {count} numbers at byte {at}: over {MAX_ITEMS} "
                                      "(metadata holds no such arrays)")
            out = array.array(code, self.buf[self.pos : self.pos + n])
            if sys.byteorder == "big":
                out.byteswap()
            self.pos += n
            return out
        if etype == _STRING:
            if self.pos + 8 * count > self.size:  # each string takes 8 bytes at least
                raise GGUFFormatError(f"array of {count} strings at byte {at} runs past the end")
            if count > MAX_STRINGS:
                raise GGUFFormatError(f"array of {count} strings at byte {at}: over "
                                      f"{MAX_STRINGS} (no tokenizer has as many)")
            return self.strings(count)
        if etype == _ARRAY:
            if depth + 1 >= MAX_ARRAY_NESTING:
                raise GGUFFormatError(
                    f"arrays nested over {MAX_ARRAY_NESTING} deep at byte {at}")
            if self.pos + 12 * count > self.size:  # each array takes 12 bytes at least
                raise GGUFFormatError(f"array of {count} arrays at byte {at} runs past the end")
            return [self.array(depth + 1) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata type {etype} in the array at byte {at}")


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor table of the GGUF at ``path``; GGUFFormatError if it is not a
    complete GGUF (bad magic, a truncated header, tensor data past the end of the file); OSError
    if it cannot be read."""
    try:
        return _read_header(Path(path))
    except GGUFFormatError:
        raise
    except OSError:
        raise
    except (struct.error, KeyError, ValueError, TypeError, IndexError, OverflowError,
            ZeroDivisionError, MemoryError, RecursionError) as exc:  # a safety net: none known
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
        # a key-value pair takes 12 bytes at least, a tensor entry 24 (with no dimensions)
        if 24 + 12 * n_kv + 24 * n_tensors > size:
            raise GGUFFormatError(f"{n_kv} metadata items and {n_tensors} tensors cannot fit "
                                  f"in {size} bytes")
        fields: dict[str, Any] = {}
        types: dict[str, tuple[int, ...]] = {}
        for _ in range(n_kv):
            at = c.pos
            key = c.string()
            if key in fields:
                raise GGUFFormatError(f"duplicate metadata key {shown(key)!r} at byte {at}")
            vtype = c.take("<I")
            if vtype == _ARRAY and c.pos + 4 <= size:
                (etype,) = struct.unpack_from("<I", buf, c.pos)
                types[key] = (vtype, etype)
            else:
                types[key] = (vtype,)
            fields[key] = c.value(vtype)
        raw = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = c.string()
            if name in names:
                raise GGUFFormatError(f"duplicate tensor name {shown(name)!r}")
            names.add(name)
            n_dims = c.take("<I")
            if n_dims > 8:
                raise GGUFFormatError(f"tensor {shown(name)} has {n_dims} dimensions")
            shape = tuple(c.take("<Q") for _ in range(n_dims))
            raw.append((name, shape, c.take("<I"), c.take("<Q")))
    align = _alignment(fields, types)
    data_offset = -(-c.pos // align) * align
    tensors = []
    for name, shape, tid, rel in raw:
        try:
            qtype = GGMLQuantizationType(tid)
        except ValueError as exc:
            raise GGUFFormatError(f"tensor {shown(name)} has unknown type {tid}") from exc
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = 1
        for d in shape:
            n *= d
        info = TensorInfo(name, qtype.name, shape, n, n // block * type_size, data_offset + rel)
        if info.offset + info.n_bytes > size:
            raise GGUFFormatError(f"tensor {shown(name)} runs past the end of the file (its data "
                                  f"ends at byte {info.offset + info.n_bytes}, the file has "
                                  f"{size})")
        tensors.append(info)
    return GGUFHeader(version, fields, tensors, data_offset, size, types, align)


def _alignment(fields: dict[str, Any], types: dict[str, tuple[int, ...]]) -> int:
    """general.alignment: an unsigned 32-bit power of two (the spec's and llama.cpp's rule)."""
    if "general.alignment" not in fields:
        return DEFAULT_ALIGNMENT
    value = fields["general.alignment"]
    if types["general.alignment"] != (UINT32,):
        raise GGUFFormatError(f"general.alignment is {_describe(value)}, not an unsigned "
                              "32-bit integer")
    if value <= 0 or value & (value - 1):
        raise GGUFFormatError(f"general.alignment is {value}, not a power of two")
    return int(value)


def _describe(value: Any) -> str:
    if isinstance(value, (list, array.array)):
        return f"an array of {len(value)} items"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_structure(path: Path) -> None:
    """Refuse a GGUF that llama.cpp or transformers would crash on, loop on or misread.

    Header only (tens of milliseconds on a 100 MB model): the format (what ``read_header``
    checks), the tensor table as llama.cpp lays it out (known types, rows a whole number of
    blocks, each tensor at the aligned end of the one before, none past the end of the file,
    no bytes left over), and the hyperparameters against llama.cpp's limits and the tensors
    actually present (edgesmith/gguf_check.py). Raises ModelError with a one-line message
    naming the file and the problem.
    """
    validated_header(path)


def validated_header(path: Path) -> GGUFHeader:
    """``read_header`` after ``check_structure``'s checks; ModelError naming the file."""
    from edgesmith.gguf_check import structure_problem

    hint = "re-download the file, or convert the model again (edgesmith export, or llama.cpp's " \
           "convert_hf_to_gguf.py)"
    try:
        header = read_header(path)
    except GGUFFormatError as exc:
        raise ModelError(f"corrupt or truncated GGUF file {path}: {exc}", hint) from exc
    except OSError as exc:
        raise ModelError(f"cannot read the GGUF file {path}: {exc.strerror or exc}",
                         "check the path and its permissions") from exc
    problem = structure_problem(header)
    if problem:
        problem = shown(problem, 500)
        raise ModelError(f"invalid GGUF file {path}: {problem}", hint)
    return header
