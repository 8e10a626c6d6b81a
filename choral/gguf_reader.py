"""A fast GGUF reader: the header and key/value section parsed in one pass, tensor data memory-mapped.

The gguf package builds a numpy view per field *part* (a 49k-token vocabulary is ~250k views,
seconds of Python); this reader walks the key/value bytes with ``struct`` and keeps arrays of
strings as one lazily decoded :class:`StringArray`, so opening a file costs milliseconds.

Tensor data is never copied here: :meth:`GGUFReader.raw` returns the tensor's bytes as a read-only
uint8 memmap ``[rows, row_bytes]`` with its GGML type, for loaders that keep tensors packed;
``choral.loader.dequant`` turns them into float32 when a loader wants that.

File layout (little-endian): magic ``GGUF``, version u32, tensor count u64, key/value count u64;
key/value pairs (key string, value type u32, value); tensor infos (name, n_dims u32, dims u64
fastest-first, type u32, offset u64); padding to ``general.alignment``; tensor data.
"""

from __future__ import annotations

import hashlib
import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from choral.errors import ModelLoadError

# GGML type id -> (name, values per block, bytes per block). Ids follow ggml.h.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
    11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
    15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
    23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
    28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
    35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}

# Key/value type id -> numpy dtype of one element (8 = string, 9 = array are handled apart).
_KV_DTYPES: dict[int, np.dtype[Any]] = {
    0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"), 4: np.dtype("<u4"),
    5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"), 10: np.dtype("<u8"), 11: np.dtype("<i8"),
    12: np.dtype("<f8"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
DEFAULT_ALIGNMENT = 32


class StringArray(Sequence[str]):
    """A GGUF array of strings, kept as its raw bytes (u64 length + UTF-8 bytes per item) and
    decoded on first access: a warm start with a cached tokenizer never decodes the vocabulary."""

    def __init__(self, region: bytes, count: int):
        self._region = region
        self._count = count
        self._decoded: list[str] | None = None

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        return self.tolist()[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            return self._region == other._region
        return isinstance(other, list) and self.tolist() == other

    __hash__ = None  # type: ignore[assignment]  # compares by content, like a list: not hashable

    def tolist(self) -> list[str]:
        if self._decoded is None:
            region, pos, items = self._region, 0, []
            unpack = _U64.unpack_from
            for _ in range(self._count):
                (n,) = unpack(region, pos)
                items.append(region[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            self._decoded = items
        return self._decoded

    def __repr__(self) -> str:
        return f"StringArray(len={len(self)})"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's place in the file. ``shape`` is in numpy order (slowest dimension first),
    i.e. GGML's dims reversed: a ``[vocab, hidden]`` embedding has GGML dims ``(hidden, vocab)``."""

    name: str
    shape: tuple[int, ...]
    ggml_type: int
    offset: int  # absolute byte offset of the first byte in the file

    @property
    def type_name(self) -> str:
        return GGML_TYPES[self.ggml_type][0]

    @property
    def num_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_bytes(self) -> int:
        """Bytes of one row (the fastest dimension), a whole number of blocks."""
        _, block, size = GGML_TYPES[self.ggml_type]
        return (self.shape[-1] if self.shape else 1) // block * size

    @property
    def num_bytes(self) -> int:
        rows = self.num_elements // (self.shape[-1] if self.shape else 1)
        return rows * self.row_bytes


class GGUFReader:
    """An opened GGUF file: ``metadata`` (key -> value), ``tensors`` (name -> info), ``raw(name)``.

    Values: ints, floats, bools and strs as Python scalars; numeric arrays as read-only numpy
    arrays; string arrays as :class:`StringArray`. ``kv_digest`` hashes the whole key/value section
    (every tokenizer and architecture field), for caches derived from metadata.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as e:  # ValueError: an empty file cannot be mapped
            raise ModelLoadError(f"{self.path}: cannot read ({e})") from e
        self._buf = memoryview(self._map)
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError, ValueError) as e:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file ({e})") from e

    # ---- parsing ------------------------------------------------------------------------------
    def _parse(self) -> None:
        buf = self._buf
        if bytes(buf[:4]) != b"GGUF":
            raise ModelLoadError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        self.version = _U32.unpack_from(buf, 4)[0]
        if self.version not in (2, 3):
            swapped = int.from_bytes(bytes(buf[4:8]), "big")
            hint = " (a big-endian file: only little-endian GGUF is supported)" if swapped in (2, 3) else ""
            raise ModelLoadError(f"{self.path}: GGUF version {self.version} is not supported{hint}")
        n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
        self._pos = 24
        kv_start = self._pos
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            (kind,) = _U32.unpack_from(buf, self._pos)
            self._pos += 4
            self.metadata[key] = self._value(kind)
        self.kv_digest = hashlib.sha256(buf[kv_start:self._pos]).hexdigest()
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for _ in range(n_tensors):
            name = self._string()
            (n_dims,) = _U32.unpack_from(buf, self._pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos + 4)
            self._pos += 4 + 8 * n_dims
            ggml_type, offset = struct.unpack_from("<IQ", buf, self._pos)
            self._pos += 12
            infos.append((name, tuple(reversed(dims)), ggml_type, offset))
        alignment = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{self.path}: general.alignment {alignment} is not a power of two")
        self.data_offset = -(-self._pos // alignment) * alignment
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            info = GGUFTensorInfo(name, shape, ggml_type, self.data_offset + offset)
            if ggml_type in GGML_TYPES:
                _, block, _ = GGML_TYPES[ggml_type]
                if shape and shape[-1] % block:
                    raise ModelLoadError(f"{self.path}: tensor {name} has rows of {shape[-1]} values, "
                                         f"not a multiple of {info.type_name}'s block of {block}")
                if info.offset + info.num_bytes > len(buf):
                    raise ModelLoadError(f"{self.path}: tensor {name} runs past the end of the file "
                                         "(truncated download?)")
            self.tensors[name] = info

    def _string(self) -> str:
        return self._bytes().decode("utf-8")

    def _bytes(self) -> bytes:
        (n,) = _U64.unpack_from(self._buf, self._pos)
        start = self._pos + 8
        self._pos = start + n
        if self._pos > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        return bytes(self._buf[start:self._pos])

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item_kind, count = struct.unpack_from("<IQ", self._buf, self._pos)
            self._pos += 12
            if item_kind == _STRING:
                # The vocabulary: one tight loop over the lengths to find the end; the bytes are
                # kept as one region and split only if someone reads the strings.
                buf, start = self._buf, self._pos
                pos, unpack = start, _U64.unpack_from
                for _ in range(count):
                    pos += 8 + unpack(buf, pos)[0]
                if pos > len(buf):
                    raise ValueError("a string array runs past the end of the file")
                self._pos = pos
                return StringArray(bytes(buf[start:pos]), count)
            if item_kind in _KV_DTYPES:
                dtype = _KV_DTYPES[item_kind]
                # A copy: small, and the file's mapping can then be closed while it lives.
                array = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos).copy()
                self._pos += dtype.itemsize * count
                return array
            if item_kind == _ARRAY:  # arrays of arrays: rare; read element by element
                return [self._value(_ARRAY) for _ in range(count)]
            raise ValueError(f"unknown array element type {item_kind}")
        if kind in _KV_DTYPES:
            dtype = _KV_DTYPES[kind]
            value = np.frombuffer(self._buf, dtype=dtype, count=1, offset=self._pos)[0]
            self._pos += dtype.itemsize
            return bool(value) if kind == _BOOL else value.item()
        raise ValueError(f"unknown value type {kind}")

    # ---- tensor data --------------------------------------------------------------------------
    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, read-only and not copied: uint8 ``[rows, row_bytes]`` (rows = every
        dimension but the fastest, flattened)."""
        info = self.tensors[name]
        if info.ggml_type not in GGML_TYPES:
            from choral.errors import UnsupportedTensorTypeError

            raise UnsupportedTensorTypeError(f"{self.path}: tensor {name} has unknown GGML type {info.ggml_type}")
        data = np.frombuffer(self._buf, dtype=np.uint8, count=info.num_bytes, offset=info.offset)
        return data.reshape(-1, info.row_bytes) if info.row_bytes else data

    def close(self) -> None:
        """Release the mapping (arrays returned by :meth:`raw` must be dropped first)."""
        self._buf.release()
        self._map.close()
