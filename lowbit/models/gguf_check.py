"""A GGUF file's structure checked before anything trusts it (`scan_gguf`).

`gguf.GGUFReader` memory-maps the file and believes every count in it: a string length or an array count of
2^63 makes it loop for ever, a tensor whose type was changed loads as garbage. This pass reads the header
once with every count bounded by the bytes left, and checks the layout the writers produce:

    magic "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata: key (u64 length + UTF-8) | value type u32 | value (strings: u64 length + UTF-8; arrays: item
              type u32 | count u64 | items)
    tensor infos: name | n_dims u32 | dims u64[n_dims] (innermost first) | ggml type u32 | offset u64
    padding to general.alignment (default 32) | tensor data, each tensor at an aligned offset

Each tensor's byte size follows from its type and dims; the tensors must tile the data region in offset
order with only alignment padding between them, so a changed type or dim (a size the bytes do not hold)
shows as a gap or an overlap. Every string (token texts included) is decoded here, inside the error boundary.
"""
from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError
from lowbit.files import regular_file

MAX_KV = 1 << 16              # metadata entries (real files: ~40)
MAX_TENSORS = 1 << 20         # tensors (a 405B model: ~1,100; large MoE files: tens of thousands)
MAX_ARRAY_ITEMS = 1 << 22     # items in all metadata arrays together (vocab + merges + types: < 1M); the
                              # tokenizer conversion reads them with gguf.GGUFReader at ~15 us an item
MAX_NESTING = 4               # arrays of arrays
MAX_KEY_BYTES = 1 << 16
MAX_NAME_BYTES = 1 << 10      # llama.cpp's own limit is 64
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 20
DEFAULT_ALIGNMENT = 32

STRING, ARRAY = 8, 9
# scalar value type (GGUFValueType's numbering) -> struct format
SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
TYPE_NAMES = {0: "UINT8", 1: "INT8", 2: "UINT16", 3: "INT16", 4: "UINT32", 5: "INT32", 6: "FLOAT32", 7: "BOOL",
              8: "STRING", 9: "ARRAY", 10: "UINT64", 11: "INT64", 12: "FLOAT64"}


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array as the scan saw it (its items are left to the reader)."""
    item_type: int
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_name: str                # GGMLQuantizationType name, e.g. Q4_1
    dims: tuple[int, ...]         # GGUF order: innermost first
    offset: int                   # relative to the data region
    nbytes: int


@dataclass
class GGUFLayout:
    version: int
    alignment: int
    data_offset: int              # absolute offset of the data region
    meta: dict[str, tuple[int, Any]] = field(default_factory=dict)   # key -> (value type, value | GGUFArray)
    tensors: list[TensorInfo] = field(default_factory=list)


class _Cursor:
    """Little-endian reads from the mapped file, each bounded by the bytes left."""

    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.array_items = 0

    def fail(self, msg: str):
        raise LowbitError(f"{self.path}: truncated or corrupt GGUF file ({msg})")

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            self.fail(f"{what} at byte {self.pos:,} needs {n:,} bytes, {self.size - self.pos:,} remain")
        start, self.pos = self.pos, self.pos + n
        return start

    def read(self, fmt: str, what: str):
        return struct.unpack_from("<" + fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.read("Q", f"length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n:,} bytes long (at most {limit:,})")
        start = self.take(n, what)
        try:
            return self.buf[start:start + n].decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail(f"{what} is not UTF-8 (byte {e.start} of {n})")

    def count(self, n: int, item_bytes: int, what: str, limit: int) -> int:
        """n checked against an absolute limit and against the bytes left (each item needs item_bytes)."""
        if n > limit or n * item_bytes > self.left():
            self.fail(f"{what} is {n:,}, more than {'the file holds' if n <= limit else f'{limit:,}'}")
        return n

    def value(self, vtype: int, what: str, depth: int = 0):
        if vtype in SCALARS:
            return self.read(SCALARS[vtype], what)
        if vtype == STRING:
            return self.string(what)
        if vtype != ARRAY:
            self.fail(f"{what} has value type {vtype}, not a GGUF type (0..12)")
        item = self.read("I", f"item type of {what}")
        if item not in TYPE_NAMES:
            self.fail(f"{what} is an array of value type {item}, not a GGUF type (0..12)")
        if item == ARRAY and depth + 1 >= MAX_NESTING:
            self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        min_bytes = struct.calcsize(SCALARS[item]) if item in SCALARS else (8 if item == STRING else 12)
        n = self.count(self.read("Q", f"length of {what}"), min_bytes, f"the length of {what}",
                       MAX_ARRAY_ITEMS - self.array_items)
        self.array_items += n
        if item in SCALARS:
            self.take(n * min_bytes, what)
        elif item == STRING:
            self._strings(n, what)
        else:
            for i in range(n):
                self.value(ARRAY, f"{what}[{i}]", depth + 1)
        return GGUFArray(item, n)

    def _strings(self, n: int, what: str) -> None:
        """n strings, each decoded (a vocabulary: a tight loop, ~0.1 s for 100k tokens)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.unpack_from
        for i in range(n):
            if size - pos < 8:
                self.pos = pos
                self.take(8, f"length of {what}[{i}]")
            k = unpack("<Q", buf, pos)[0]
            pos += 8
            if k > size - pos:
                self.pos = pos
                self.take(k, f"{what}[{i}]")
            try:
                buf[pos:pos + k].decode("utf-8")
            except UnicodeDecodeError as e:
                self.fail(f"{what}[{i}] is not UTF-8 (byte {e.start} of {k})")
            pos += k
        self.pos = pos


def _header(c: _Cursor) -> tuple[int, int, int]:
    magic = c.buf[:4]
    if magic != b"GGUF":
        raise LowbitError(f"{c.path}: not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    c.pos = 4
    version = c.read("I", "version")
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version & 0xFFFF == 0 and swapped in (1, 2, 3):
        raise LowbitError(f"{c.path}: big-endian GGUF file (version {swapped} byte-swapped); "
                          f"only little-endian files are supported")
    if version not in (2, 3):
        raise LowbitError(f"{c.path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = c.count(c.read("Q", "tensor count"), 33, "the tensor count", MAX_TENSORS)
    n_kv = c.count(c.read("Q", "metadata count"), 13, "the metadata count", MAX_KV)
    return version, n_tensors, n_kv


def _tensor_info(c: _Cursor, i: int) -> tuple:
    import gguf

    name = c.string(f"the name of tensor #{i}", MAX_NAME_BYTES)
    n_dims = c.read("I", f"tensor {name}'s dimension count")
    if not 1 <= n_dims <= MAX_DIMS:
        c.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
    dims = tuple(c.read("Q", f"tensor {name}'s dims") for _ in range(n_dims))
    if min(dims) < 1 or math.prod(dims) > 1 << 48:
        c.fail(f"tensor {name} has dims {list(dims)}")
    raw = c.read("I", f"tensor {name}'s type")
    try:
        qtype = gguf.GGMLQuantizationType(raw)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        c.fail(f"tensor {name} has type {raw}, not a ggml tensor type")
    if dims[0] % block:
        c.fail(f"tensor {name}: {qtype.name} packs rows of a multiple of {block} values, its rows have {dims[0]}")
    offset = c.read("Q", f"tensor {name}'s offset")
    return name, qtype.name, dims, offset, math.prod(dims) // block * type_size


def _alignment(c: _Cursor, meta: dict) -> int:
    if "general.alignment" not in meta:
        return DEFAULT_ALIGNMENT
    vtype, a = meta["general.alignment"]
    if vtype != 4 or not 0 < a <= MAX_ALIGNMENT or a & (a - 1):
        c.fail(f"general.alignment must be a UINT32 power of two up to {MAX_ALIGNMENT}, got "
               f"{TYPE_NAMES.get(vtype)} {a!r}")
    return a


def _check_tiling(c: _Cursor, tensors: list[TensorInfo], data_size: int, alignment: int) -> None:
    """Tensors in offset order tile the data region: aligned, in bounds, no overlap, only padding between."""
    for t in tensors:
        if t.offset % alignment:
            c.fail(f"tensor {t.name}'s offset {t.offset:,} is not a multiple of the alignment {alignment}")
    for t in tensors:
        if t.offset + t.nbytes > data_size:
            c.fail(f"tensor {t.name} ({t.type_name} {list(t.dims)}: {t.nbytes:,} bytes at data offset "
                   f"{t.offset:,}) ends past the end of the file ({data_size:,} bytes of data)")
    end, prev = 0, "the start of the data region"
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset < end:
            c.fail(f"tensor {t.name} at data offset {t.offset:,} overlaps {prev}, which ends at {end:,}")
        if t.offset - end >= alignment:
            c.fail(f"{t.offset - end:,} unused bytes between {prev} and tensor {t.name}: a tensor's type or "
                   f"shape disagrees with the data layout")
        end, prev = t.offset + t.nbytes, f"tensor {t.name}"
    if tensors and data_size - end >= alignment:
        c.fail(f"{data_size - end:,} bytes after the last tensor ({prev}): a tensor's type or shape disagrees "
               f"with the data layout")


def scan_gguf(path: str | Path) -> GGUFLayout:
    """The header of a GGUF file, checked (see the module docstring); a one-line LowbitError naming the file
    and the first problem otherwise."""
    path = regular_file(path, "GGUF file")
    try:
        f = open(path, "rb")
    except OSError as e:
        raise LowbitError(f"{path}: cannot open the GGUF file ({e.strerror or type(e).__name__})") from None
    with f:
        head, size = f.read(4), f.seek(0, 2)
        if size == 0:
            raise LowbitError(f"{path}: not a GGUF file (the file is empty)")
        if not b"GGUF".startswith(head):
            raise LowbitError(f"{path}: not a GGUF file (magic bytes {head!r}, expected b'GGUF')")
        if size < 24:
            raise LowbitError(f"{path}: truncated or corrupt GGUF file ({size} bytes, a header needs 24)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _scan(_Cursor(buf, path))


def _scan(c: _Cursor) -> GGUFLayout:
    version, n_tensors, n_kv = _header(c)
    meta: dict[str, tuple[int, Any]] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}", MAX_KEY_BYTES)
        if key in meta:
            c.fail(f"metadata key {key!r} appears twice")
        vtype = c.read("I", f"value type of {key}")
        meta[key] = (vtype, c.value(vtype, f"metadata {key}"))
    c.count(n_tensors, 33, "the tensor count", MAX_TENSORS)
    infos, names = [], set()
    for i in range(n_tensors):
        info = TensorInfo(*_tensor_info(c, i))
        if info.name in names:
            c.fail(f"tensor {info.name} appears twice")
        names.add(info.name)
        infos.append(info)
    alignment = _alignment(c, meta)
    data_offset = -(-c.pos // alignment) * alignment
    if infos and data_offset > c.size:
        c.fail(f"the data region would start at byte {data_offset:,}, past the end of the file ({c.size:,})")
    _check_tiling(c, infos, c.size - data_offset, alignment)
    return GGUFLayout(version, alignment, data_offset, meta, infos)
