"""Read TensorFlow checkpoints (the "tensor bundle" format) without TensorFlow.

A checkpoint `PREFIX` is two kinds of file (TensorFlow `core/util/tensor_bundle/`):
- `PREFIX.index`: a LevelDB-style sorted string table. Its footer (the last 48 bytes) points to an
  index block, whose entries point to data blocks; every data-block entry maps a checkpoint key to a
  serialised `BundleEntryProto` (dtype, shape, shard id, byte offset and size). The entry with the
  empty key is the `BundleHeaderProto` (number of shards, endianness).
- `PREFIX.data-SSSSS-of-NNNNN`: the raw little-endian tensor bytes, concatenated.
Blocks may be Snappy-compressed; the few lines of Snappy decoding are included here so that the
reader needs only numpy. Only the numeric dtypes a model holds are decoded; string tensors (the
object graph) and partitioned (sliced) variables are listed but not readable.

The layout knowledge comes from TensorFlow's `tensor_bundle.proto`, `table_format.md` (LevelDB) and
the Snappy format description; the code is our own.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maxdeeplab.platform.errors import DataError

TABLE_MAGIC = 0xDB4775248B80FB57  # LevelDB table magic number (footer's last 8 bytes)
FOOTER_SIZE = 48  # two block handles padded to 40 bytes + the magic
NO_COMPRESSION, SNAPPY_COMPRESSION = 0, 1
# TensorFlow DataType enum -> numpy dtype (types.proto); DT_BFLOAT16 (14) is read as raw uint16.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<i4"),
    4: np.dtype("u1"),
    5: np.dtype("<i2"),
    6: np.dtype("i1"),
    9: np.dtype("<i8"),
    10: np.dtype("?"),
    14: np.dtype("<u2"),
    17: np.dtype("<u2"),
    19: np.dtype("<f2"),
    22: np.dtype("<u4"),
    23: np.dtype("<u8"),
}
DT_STRING = 7


@dataclass(frozen=True)
class BundleEntry:
    """Where one tensor lives. `dtype` is TensorFlow's enum value; `sliced` marks partitions."""

    key: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    sliced: bool = False


# ----------------------------------------------------------------------------------------------
# Wire formats: varints, protobuf fields, Snappy.


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at `pos`; return (value, next position)."""
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _proto_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) of a serialised protobuf message; varints as int, others as bytes."""
    fields: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(data, pos)
            fields.append((number, value))
        elif wire == 1:
            fields.append((number, data[pos : pos + 8]))
            pos += 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            fields.append((number, data[pos : pos + length]))
            pos += length
        elif wire == 5:
            fields.append((number, data[pos : pos + 4]))
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return fields


def _int64(value: int) -> int:
    """A varint-encoded int64 (two's complement on 64 bits) as a Python int."""
    return value - (1 << 64) if value >= 1 << 63 else value


def snappy_decompress(data: bytes) -> bytes:
    """Decode a raw Snappy block (length preamble, literals and back-references)."""
    length, pos = _varint(data, 0)
    out = bytearray()
    while pos < len(data):
        tag = data[pos]
        pos += 1
        kind = tag & 3
        if kind == 0:  # literal
            size = tag >> 2
            if size >= 60:
                extra = size - 59
                size = int.from_bytes(data[pos : pos + extra], "little")
                pos += extra
            size += 1
            out += data[pos : pos + size]
            pos += size
            continue
        if kind == 1:
            size = ((tag >> 2) & 7) + 4
            offset = ((tag >> 5) << 8) | data[pos]
            pos += 1
        elif kind == 2:
            size = (tag >> 2) + 1
            offset = int.from_bytes(data[pos : pos + 2], "little")
            pos += 2
        else:
            size = (tag >> 2) + 1
            offset = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        if offset == 0 or offset > len(out):
            raise ValueError("corrupt snappy block: bad back-reference")
        start = len(out) - offset
        for i in range(size):  # byte by byte: a copy may overlap its own output
            out.append(out[start + i])
    if len(out) != length:
        raise ValueError(f"corrupt snappy block: {len(out)} bytes, expected {length}")
    return bytes(out)


# ----------------------------------------------------------------------------------------------
# The sorted string table.


def _read_block(table: bytes, handle: bytes) -> bytes:
    """The contents of the block a handle (varint offset, varint size) points to."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    block = table[offset : offset + size]
    compression = table[offset + size]
    if compression == SNAPPY_COMPRESSION:
        return snappy_decompress(block)
    if compression != NO_COMPRESSION:
        raise ValueError(f"unsupported block compression type {compression}")
    return block


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """(key, value) pairs of a block: prefix-compressed entries, then restart offsets and count."""
    (num_restarts,) = struct.unpack_from("<I", block, len(block) - 4)
    end = len(block) - 4 - 4 * num_restarts
    entries: list[tuple[bytes, bytes]] = []
    key = b""
    pos = 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        key = key[:shared] + block[pos : pos + unshared]
        pos += unshared
        entries.append((key, block[pos : pos + value_size]))
        pos += value_size
    return entries


def _table_entries(table: bytes) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a LevelDB table, in key order."""
    if len(table) < FOOTER_SIZE:
        raise ValueError("file too short for a table footer")
    footer = table[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
    if magic != TABLE_MAGIC:
        raise ValueError("bad table magic number (not a TensorFlow checkpoint index)")
    _, pos = _varint(footer, 0)  # metaindex handle: offset
    _, pos = _varint(footer, pos)  # metaindex handle: size
    index = _read_block(table, footer[pos:])
    entries: list[tuple[bytes, bytes]] = []
    for _, handle in _block_entries(index):
        entries.extend(_block_entries(_read_block(table, handle)))
    return entries


def _parse_entry(key: str, value: bytes) -> BundleEntry:
    dtype = shard = offset = size = 0
    shape: tuple[int, ...] = ()
    sliced = False
    for number, field in _proto_fields(value):
        if number == 1:
            dtype = int(field)  # type: ignore[arg-type]
        elif number == 2:
            dims = []
            for dim_number, dim in _proto_fields(field):  # type: ignore[arg-type]
                if dim_number == 2:  # TensorShapeProto.dim
                    sizes = [v for n, v in _proto_fields(dim) if n == 1]  # type: ignore[arg-type]
                    dims.append(_int64(int(sizes[0])) if sizes else 0)
            shape = tuple(dims)
        elif number == 3:
            shard = int(field)  # type: ignore[arg-type]
        elif number == 4:
            offset = int(field)  # type: ignore[arg-type]
        elif number == 5:
            size = int(field)  # type: ignore[arg-type]
        elif number == 7:
            sliced = True
    return BundleEntry(key, dtype, shape, shard, offset, size, sliced)


class TensorBundle:
    """A TensorFlow checkpoint opened for reading: `entries` by key, `read(key)` as numpy.

    Args:
        prefix: the checkpoint prefix (`ckpt-1` for `ckpt-1.index` + `ckpt-1.data-*`); a path
            ending in `.index` is accepted too.

    Raises:
        DataError: a missing or malformed index or data file (naming it).
    """

    def __init__(self, prefix: str | Path) -> None:
        prefix = str(prefix)
        if prefix.endswith(".index"):
            prefix = prefix[: -len(".index")]
        self.prefix = prefix
        index_path = Path(prefix + ".index")
        if not index_path.is_file():
            raise DataError(f"{index_path}: no such checkpoint index (give the checkpoint prefix)")
        try:
            records = _table_entries(index_path.read_bytes())
        except (ValueError, IndexError, struct.error) as exc:
            raise DataError(
                f"{index_path}: not a readable TensorFlow checkpoint index: {exc}"
            ) from exc
        self.num_shards = 1
        self.entries: dict[str, BundleEntry] = {}
        for raw_key, value in records:
            if raw_key == b"":  # BundleHeaderProto
                header = dict(_proto_fields(value))
                self.num_shards = int(header.get(1, 1))  # type: ignore[arg-type]
                if int(header.get(2, 0)):  # type: ignore[arg-type]
                    raise DataError(f"{index_path}: big-endian checkpoints are not supported")
                continue
            key = raw_key.decode("utf-8")
            self.entries[key] = _parse_entry(key, value)
        self._data: dict[int, np.memmap] = {}

    def _shard(self, shard: int) -> np.memmap:
        if shard not in self._data:
            path = Path(f"{self.prefix}.data-{shard:05d}-of-{self.num_shards:05d}")
            if not path.is_file():
                raise DataError(f"{path}: checkpoint data file is missing")
            self._data[shard] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._data[shard]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every readable numeric tensor, by checkpoint key."""
        return {
            key: entry.shape
            for key, entry in self.entries.items()
            if entry.dtype in DTYPES and not entry.sliced
        }

    def read(self, key: str) -> np.ndarray:
        """The tensor stored under `key`, as a numpy array (a copy).

        Raises:
            DataError: an unknown key, a string or partitioned tensor, or a truncated data file.
        """
        if key not in self.entries:
            raise DataError(f"{self.prefix}: no tensor {key!r} in the checkpoint")
        entry = self.entries[key]
        if entry.sliced or entry.dtype not in DTYPES:
            raise DataError(
                f"{self.prefix}: tensor {key!r} (dtype enum {entry.dtype}) is a string or "
                "partitioned tensor, which this reader does not decode"
            )
        dtype = DTYPES[entry.dtype]
        count = int(np.prod(entry.shape)) if entry.shape else 1
        if count * dtype.itemsize != entry.size:
            raise DataError(
                f"{self.prefix}: tensor {key!r} has {entry.size} bytes for shape {entry.shape}"
            )
        data = self._shard(entry.shard)
        if entry.offset + entry.size > data.shape[0]:
            raise DataError(f"{self.prefix}: data file is truncated at tensor {key!r}")
        raw = np.asarray(data[entry.offset : entry.offset + entry.size])
        return raw.view(dtype).reshape(entry.shape).copy()
