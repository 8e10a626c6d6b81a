"""GGUF tensor bytes -> float32, whole tensors at a time.

The common llama.cpp block formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the plain types are
unpacked here with a handful of vectorized numpy passes over all blocks at once (the gguf
package's generic path splits every tensor into row groups first: ~5x slower on the bundled
model). Every other block format goes through the gguf package.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from choral.errors import UnsupportedTensorTypeError
from choral.gguf_reader import GGML_TYPES, GGUFTensorInfo

_NIBBLE_SHIFTS = np.arange(32, dtype=np.uint32)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scale at byte ``start`` of every block, as float32 ``[num_blocks, 1]``."""
    return np.ascontiguousarray(blocks[:, start:start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 packed bytes per block -> 32 values: low nibbles are values 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # [num_blocks, 32] uint8


def _high_bits(blocks: np.ndarray, start: int) -> np.ndarray:
    """Q5's fifth bits: one little-endian u32 per block, bit j belongs to value j -> ``[nb, 32]``."""
    qh = np.ascontiguousarray(blocks[:, start:start + 4]).view("<u4")  # [num_blocks, 1]
    return (((qh >> _NIBBLE_SHIFTS) & 1) << 4).astype(np.uint8)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].view(np.int8).astype(np.float32) * _f16(blocks, 0)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 2:18]).astype(np.float32)
    q -= 8.0
    return q * _f16(blocks, 0)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 4:20]).astype(np.float32)
    q *= _f16(blocks, 0)
    q += _f16(blocks, 2)
    return q


def _q5_0(blocks: np.ndarray) -> np.ndarray:
    q = (_nibbles(blocks[:, 6:22]) | _high_bits(blocks, 2)).astype(np.float32)
    q -= 16.0
    return q * _f16(blocks, 0)


def _q5_1(blocks: np.ndarray) -> np.ndarray:
    q = (_nibbles(blocks[:, 8:24]) | _high_bits(blocks, 4)).astype(np.float32)
    q *= _f16(blocks, 0)
    q += _f16(blocks, 2)
    return q


_BLOCK_FORMATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
}
_PLAIN = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


def dequantize(raw: np.ndarray, info: GGUFTensorInfo, path: Path | str = "") -> np.ndarray:
    """``raw`` (the tensor's bytes, as :meth:`GGUFReader.raw` returns them) as float32 of ``info.shape``."""
    name = info.type_name
    flat = raw.reshape(-1)
    if name in _PLAIN:
        values = flat.view(_PLAIN[name]).astype(np.float32)
    elif name == "BF16":
        values = (flat.view("<u2").astype(np.uint32) << 16).view(np.float32)
    elif name in _BLOCK_FORMATS:
        values = _BLOCK_FORMATS[name](flat.reshape(-1, GGML_TYPES[info.ggml_type][2]))
    else:
        values = _with_gguf_package(raw, info, path)
    return values.reshape(info.shape)


def _with_gguf_package(raw: np.ndarray, info: GGUFTensorInfo, path: Path | str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    try:
        return np.asarray(gguf_dequantize(raw, GGMLQuantizationType(info.ggml_type)), dtype=np.float32)
    except (NotImplementedError, ValueError) as e:
        raise UnsupportedTensorTypeError(
            f"{path}: tensor {info.name} has type {info.type_name}, which choral cannot dequantize ({e})"
        ) from e
