"""A fast GGUF header reader: metadata scalars and tensor extents, without loading arrays.

gguf's own `GGUFReader` materialises every field (a 262k-entry vocabulary
takes seconds); a pre-flight check needs only the scalars and where the
tensor data ends, so arrays are skipped rather than decoded. Value types and
block sizes come from the `gguf` package.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_LENGTH = struct.Struct("<Q")
DEFAULT_ALIGNMENT = 32
MAX_STRING = 1 << 28  # a sane bound: anything larger is a damaged file, not a string


class HeaderError(ValueError):
    pass


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings; arrays as their length
    n_tensors: int = 0
    n_elements: int = 0
    data_end: int = 0  # offset of the end of the last tensor's data
    type_elements: dict[str, int] = field(default_factory=dict)


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise HeaderError("unexpected end of file in the header")
    return data


def _string(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(fh, 8))
    if n > MAX_STRING:
        raise HeaderError(f"implausible string length {n}")
    return _read(fh, n).decode("utf-8", errors="replace")


def _skip_strings(fh: BinaryIO, count: int) -> None:
    """Step over `count` strings (a vocabulary: 262k of them) reading only their lengths, a chunk at a time."""
    chunk = b""
    pos = 0  # in `chunk`
    start = fh.tell()
    consumed = 0  # bytes of the file before `chunk`
    for _ in range(count):
        if pos + 8 > len(chunk):
            consumed += pos
            fh.seek(start + consumed)
            chunk = fh.read(1 << 20)
            pos = 0
            if len(chunk) < 8:
                raise HeaderError("unexpected end of file in the header")
        (n,) = _LENGTH.unpack_from(chunk, pos)
        if n > MAX_STRING:
            raise HeaderError(f"implausible string length {n}")
        pos += 8 + n
    fh.seek(start + consumed + pos)  # past the end for a cut file: the next read says so


def _value(fh: BinaryIO, vtype: int) -> Any:
    t = GGUFValueType(vtype)
    if t in _SCALARS:
        fmt = _SCALARS[t]
        return struct.unpack(fmt, _read(fh, struct.calcsize(fmt)))[0]
    if t == GGUFValueType.STRING:
        return _string(fh)
    if t == GGUFValueType.ARRAY:
        (etype,) = struct.unpack("<I", _read(fh, 4))
        (count,) = struct.unpack("<Q", _read(fh, 8))
        et = GGUFValueType(etype)
        if et in _SCALARS:
            fh.seek(struct.calcsize(_SCALARS[et]) * count, 1)
        elif et == GGUFValueType.STRING:
            _skip_strings(fh, count)
        else:
            for _ in range(count):
                _value(fh, etype)
        return count
    raise HeaderError(f"unknown value type {vtype}")


def read_header(path: str) -> GGUFHeader:
    with open(path, "rb") as fh:
        if _read(fh, 4) != b"GGUF":
            raise HeaderError("bad magic")
        version, n_tensors, n_kv = struct.unpack("<IQQ", _read(fh, 20))
        header = GGUFHeader(version=version, n_tensors=n_tensors)
        try:
            for _ in range(n_kv):
                key = _string(fh)
                (vtype,) = struct.unpack("<I", _read(fh, 4))
                header.metadata[key] = _value(fh, vtype)
            extents = []
            for _ in range(n_tensors):
                _string(fh)
                (n_dims,) = struct.unpack("<I", _read(fh, 4))
                dims = struct.unpack(f"<{n_dims}Q", _read(fh, 8 * n_dims))
                ttype, offset = struct.unpack("<IQ", _read(fh, 12))
                qtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[qtype]
                elements = 1
                for d in dims:
                    elements *= d
                header.n_elements += elements
                header.type_elements[qtype.name] = header.type_elements.get(qtype.name, 0) + elements
                extents.append(offset + elements // block * type_size)
        except ValueError as exc:  # unknown enum values: a damaged or foreign file
            raise HeaderError(str(exc)) from None
        alignment = int(header.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-fh.tell() // alignment) * alignment
        header.data_end = data_start + (max(extents) if extents else 0)
    return header
