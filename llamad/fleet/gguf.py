"""A GGUF file's header: metadata and tensor infos, read without decoding its long arrays.

Reading a GGUF touches only its header (metadata and tensor infos, through a
read-only mmap); long arrays such as the vocabulary are skipped, not decoded,
so a 150k-token model reads in a fraction of a second (``gguf.GGUFReader``
decodes every token and takes seconds).  It is still synchronous file I/O:
call :func:`estimate` at config time or from a thread.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Mapping

_MAX_KEPT_ARRAY = 4096  # longer metadata arrays (vocabularies, merges) are skipped, only their length kept
_MAX_DIMS = 4  # GGML_MAX_DIMS
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class MemoryEstimateError(Exception):
    """A model whose memory need cannot be read: missing, not a GGUF, or corrupt (one-line message)."""



@dataclass(frozen=True)
class TensorInfo:
    """One tensor as the GGUF header describes it; ``n_bytes`` is its size in the file."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    """A GGUF's metadata and tensor infos, without its data.

    ``metadata`` holds scalars, strings and numeric arrays of up to 4096
    elements (as tuples); ``array_lengths`` has the length of every array,
    kept or skipped.  ``tensors`` spans every part of a split model.
    """

    path: str
    metadata: Mapping[str, Any]
    array_lengths: Mapping[str, int]
    tensors: tuple[TensorInfo, ...]
    notes: tuple[str, ...] = ()

    @cached_property
    def _by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}

    def tensor(self, name: str) -> TensorInfo | None:
        """The tensor called ``name``, if the model has one."""
        return self._by_name.get(name)


class _Corrupt(Exception):
    pass


_SCALARS: dict[int, str] = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Bounds-checked reads over the mapped header; any overrun is corruption, never a crash."""

    def __init__(self, buf: Any, size: int, endian: str) -> None:
        self.buf = buf
        self.size = size
        self.off = 0
        self.endian = endian
        self.structs = {code: struct.Struct(endian + fmt) for code, fmt in _SCALARS.items()}
        self.u32 = struct.Struct(endian + "I")
        self.u64 = struct.Struct(endian + "Q")

    def take(self, n: int) -> int:
        start = self.off
        if n < 0 or start + n > self.size:
            raise _Corrupt("header runs past the end of the file (truncated?)")
        self.off = start + n
        return start

    def scalar(self, s: struct.Struct) -> Any:
        return s.unpack_from(self.buf, self.take(s.size))[0]

    def string(self, decode: bool = True) -> str:
        n = self.scalar(self.u64)
        start = self.take(n)
        if not decode:
            return ""
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str, lengths: dict[str, int]) -> Any:
        if vtype in self.structs:
            return self.scalar(self.structs[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise _Corrupt(f"metadata {key!r} has unknown value type {vtype}")
        itype = self.scalar(self.u32)
        n = self.scalar(self.u64)
        lengths[key] = n
        if itype in self.structs:
            s = self.structs[itype]
            start = self.take(n * s.size)
            if n > _MAX_KEPT_ARRAY:
                return None
            return struct.unpack_from(f"{self.endian}{n}{_SCALARS[itype]}", self.buf, start)
        if itype == _STRING:
            if n * 8 > self.size - self.off:
                raise _Corrupt(f"metadata {key!r} claims {n} strings, more than the file holds")
            # Vocabularies and merges: hundreds of thousands of strings, walked without decoding.
            off, size, unpack, buf = self.off, self.size, self.u64.unpack_from, self.buf
            for _ in range(n):
                if off + 8 > size:
                    raise _Corrupt("header runs past the end of the file (truncated?)")
                off += 8 + unpack(buf, off)[0]
            if off > size:
                raise _Corrupt("header runs past the end of the file (truncated?)")
            self.off = off
            return None
        if itype == _ARRAY:
            if n * 12 > self.size - self.off:
                raise _Corrupt(f"metadata {key!r} claims {n} arrays, more than the file holds")
            for _ in range(n):
                self.value(_ARRAY, key, {})
            return None
        raise _Corrupt(f"metadata {key!r} has unknown array element type {itype}")


def _parse(path: str) -> GGUFHeader:
    """One GGUF file's header (one part of a split model)."""
    from gguf.constants import GGML_QUANT_SIZES

    quant_sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise _Corrupt("too short to be a GGUF file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise _Corrupt("not a GGUF file (bad magic)")
            endian = "<"
            version = struct.unpack_from("<I", buf, 4)[0]
            if version & 0xFFFF == 0:  # written on a big-endian machine
                endian = ">"
                version = struct.unpack_from(">I", buf, 4)[0]
            if version not in (2, 3):
                raise _Corrupt(f"unsupported GGUF version {version}")
            c = _Cursor(buf, size, endian)
            c.take(8)
            n_tensors = c.scalar(c.u64)
            n_kv = c.scalar(c.u64)
            if n_tensors * 24 > size or n_kv * 12 > size:
                raise _Corrupt("more tensors or metadata than the file can hold (truncated?)")

            metadata: dict[str, Any] = {}
            lengths: dict[str, int] = {}
            for _ in range(n_kv):
                key = c.string()
                vtype = c.scalar(c.u32)
                metadata[key] = c.value(vtype, key, lengths)

            raw: list[tuple[str, tuple[int, ...], int, int]] = []
            for _ in range(n_tensors):
                name = c.string()
                n_dims = c.scalar(c.u32)
                if not 0 < n_dims <= _MAX_DIMS:
                    raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
                dims = tuple(c.scalar(c.u64) for _ in range(n_dims))
                raw.append((name, dims, c.scalar(c.u32), c.scalar(c.u64)))
            end_of_infos = c.off

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"bad general.alignment {alignment!r}")
    data_start = -(-end_of_infos // alignment) * alignment

    notes: list[str] = []
    by_offset = sorted(offset for _, _, _, offset in raw)
    tensors: list[TensorInfo] = []
    for name, dims, ggml_type, offset in raw:
        if ggml_type in quant_sizes:
            block, type_size = quant_sizes[ggml_type]
            n_bytes = math.prod(dims) * type_size // block
        else:
            # A type newer than the installed gguf package: the gap to the next tensor (includes padding).
            i = by_offset.index(offset)
            following = by_offset[i + 1] if i + 1 < len(by_offset) else size - data_start
            n_bytes = following - offset
            if "unknown tensor types sized by file offsets" not in notes:
                notes.append("unknown tensor types sized by file offsets")
        if data_start + offset + n_bytes > size:
            raise _Corrupt(f"tensor {name!r} runs past the end of the file (truncated download?)")
        tensors.append(TensorInfo(name, dims, ggml_type, n_bytes))
    return GGUFHeader(path, metadata, lengths, tuple(tensors), tuple(notes))


def read_gguf(path: str) -> GGUFHeader:
    """The header of the GGUF at ``path``, with the tensors of every part when it is split.

    Raises :class:`MemoryEstimateError` with a one-line message for a missing,
    unreadable, foreign or corrupt file.
    """
    try:
        header = _parse(path)
        count = header.metadata.get("split.count", 0)
        if isinstance(count, int) and count > 1:
            m = _SPLIT_NAME.match(path)
            if m is None:
                raise _Corrupt(f"split into {count} parts, but the name is not PREFIX-NNNNN-of-{count:05d}.gguf")
            tensors = list(header.tensors)
            notes = list(header.notes)
            for no in range(1, count + 1):
                part = f"{m['prefix']}-{no:05d}-of-{count:05d}.gguf"
                if part == path:
                    continue
                if not os.path.exists(part):
                    raise _Corrupt(f"split part {os.path.basename(part)} is missing")
                other = _parse(part)
                tensors.extend(other.tensors)
                notes.extend(n for n in other.notes if n not in notes)
            header = GGUFHeader(path, header.metadata, header.array_lengths, tuple(tensors), tuple(notes))
        return header
    except _Corrupt as e:
        raise MemoryEstimateError(f"{path}: {e}") from None
    except (OSError, ValueError, OverflowError, struct.error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise MemoryEstimateError(f"{path}: cannot read GGUF: {reason}") from None
