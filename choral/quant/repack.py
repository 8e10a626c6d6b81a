"""GGUF quantized blocks -> the packed rows ``quant_matmul.c`` reads (one layout per bit width).

Every GGUF block type here is, per half block of 16 weights, ``w = scale * q + offset`` with a
small unsigned integer ``q`` (signed for Q8_0). Repacking decodes each type's scales and integers
(super-block scale tables for the K-quants) and writes them as the kernel's blocks of 32 weights:

=========  =========================================  =========  ======================
GGUF type  per 32 weights                             kind       bytes (GGUF -> packed)
=========  =========================================  =========  ======================
Q8_0       d * q, q int8                              Q8         34 -> 36
Q4_0       d * (q - 8), 4-bit q                       U4         18 -> 24
Q4_1       d * q + m                                  U4         20 -> 24
Q4_K       (d sc_j) q - (dmin m_j), 6-bit sc_j, m_j   U4         18 -> 24
Q5_0       d * (q - 16), 5-bit q                      U5         22 -> 28
Q5_1       d * q + m                                  U5         24 -> 28
Q5_K       like Q4_K with 5-bit q                     U5         22 -> 28
Q6_K       (d sc_h) (q - 32) per 16, int8 sc_h         U6         26.25 -> 32
=========  =========================================  =========  ======================

Scales become fp32 (a K-quant's ``d * sc`` is not an fp16 number), which costs 4-6 bytes per 32
weights: the bundled Q4_1 SmolLM2 grows from 98 to ~112 MB resident.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from choral.errors import UnsupportedTensorTypeError

KIND_Q8, KIND_U4, KIND_U5, KIND_U6 = 0, 1, 2, 3
BLOCK_BYTES = {KIND_Q8: 36, KIND_U4: 24, KIND_U5: 28, KIND_U6: 32}
KIND_NAMES = {KIND_Q8: "q8", KIND_U4: "u4", KIND_U5: "u5", KIND_U6: "u6"}

# GGUF type name -> (weights per GGUF block, bytes per GGUF block, kind)
GGUF_TYPES = {
    "Q8_0": (32, 34, KIND_Q8),
    "Q4_0": (32, 18, KIND_U4),
    "Q4_1": (32, 20, KIND_U4),
    "Q5_0": (32, 22, KIND_U5),
    "Q5_1": (32, 24, KIND_U5),
    "Q4_K": (256, 144, KIND_U4),
    "Q5_K": (256, 176, KIND_U5),
    "Q6_K": (256, 210, KIND_U6),
}


@dataclass(frozen=True)
class PackedRows:
    """A quantized [rows, cols] weight in the kernel's layout: ``data`` is [rows, cols / 32 *
    BLOCK_BYTES[kind]] uint8. ``source`` names the GGUF type it came from."""

    kind: int
    data: np.ndarray
    rows: int
    cols: int
    source: str

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def repack(raw: np.ndarray, type_name: str, rows: int, cols: int) -> PackedRows:
    """GGUF tensor bytes (``rows`` rows of ``cols`` weights, GGUF's row-major block order) -> PackedRows."""
    if type_name not in GGUF_TYPES:
        raise UnsupportedTensorTypeError(f"{type_name} weights cannot stay packed; supported: {', '.join(GGUF_TYPES)}")
    per_block, block_bytes, kind = GGUF_TYPES[type_name]
    if cols % per_block:
        raise UnsupportedTensorTypeError(f"{type_name}: a row of {cols} weights is not whole {per_block}-weight blocks")
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1, block_bytes)
    if blocks.shape[0] != rows * cols // per_block:
        raise UnsupportedTensorTypeError(f"{type_name}: {blocks.shape[0]} blocks for a [{rows}, {cols}] tensor")
    q, scale, offset = _DECODERS[type_name](blocks)  # [n32, 32] ints, [n32, 2] fp32, [n32, 2] fp32
    return PackedRows(kind, pack_blocks(kind, q, scale, offset).reshape(rows, -1), rows, cols, type_name)


def pack_blocks(kind: int, q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """[n, 32] integers with per-half [n, 2] scales and offsets -> [n, BLOCK_BYTES[kind]] uint8."""
    n = q.shape[0]
    f32 = np.float32
    if kind == KIND_Q8:
        return np.concatenate([scale[:, :1].astype(f32).view(np.uint8), q.astype(np.int8).view(np.uint8)], axis=1)
    u = q.astype(np.uint8)
    nibbles = (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)
    planes = [np.packbits((u >> bit) & 1, axis=-1, bitorder="little").reshape(n, 4)
              for bit in range(4, {KIND_U4: 4, KIND_U5: 5, KIND_U6: 6}[kind])]
    if kind == KIND_U6:
        head = scale.astype(f32)  # d0, d1; the offsets are -32 d_h by construction
    else:
        head = np.stack([scale[:, 0], offset[:, 0]], axis=1).astype(f32)
    return np.concatenate([np.ascontiguousarray(head).view(np.uint8), nibbles, *planes], axis=1)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def _halves(v: np.ndarray) -> np.ndarray:
    """[n] or [n, 1] per-32 values -> [n, 2] per-half values."""
    v = v.reshape(-1, 1)
    return np.concatenate([v, v], axis=1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes (byte j: q[j] low, q[j + 16] high) -> [n, 32] uint8."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes of a little-endian 32-bit mask -> [n, 32] uint8 in {0, 1}."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, :2])
    return b[:, 2:].view(np.int8), _halves(d), np.zeros((b.shape[0], 2), np.float32)


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, :2])
    return _nibbles(b[:, 2:]), _halves(d), _halves(-8 * d)


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _nibbles(b[:, 4:]), _halves(_f16(b[:, :2])), _halves(_f16(b[:, 2:4]))


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << 4)
    return q, _halves(d), _halves(-16 * d)


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << 4)
    return q, _halves(_f16(b[:, :2])), _halves(_f16(b[:, 2:4]))


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-block -> per-32 (scale, offset) [n, 8] each: 8 six-bit scales and mins in
    12 bytes (bytes 0-3: scales 0-3 low 6 bits, their top 2 bits are scales 4-7's high bits;
    bytes 4-7 the same for mins; bytes 8-11: low nibbles of scales 4-7, high nibbles of mins 4-7)."""
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    s = b[:, 4:16]
    a, m, hi = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate([a & 0x3F, (hi & 0x0F) | ((a >> 2) & 0x30)], axis=1).astype(np.float32)
    mn = np.concatenate([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], axis=1).astype(np.float32)
    return d * sc, -(dmin * mn)


def _k_low(qs: np.ndarray) -> np.ndarray:
    """[n, 128] bytes: chunk c of 32 bytes holds sub-block 2c (low nibbles) and 2c + 1 (high) -> [n, 8, 32]."""
    chunks = qs.reshape(-1, 4, 1, 32)
    return ((chunks >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(-1, 8, 32)


def _per_sub(q: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[n, 8, 32] q with [n, 8] per-32 values -> the per-32-block rows."""
    return q.reshape(-1, 32), _halves(scale.reshape(-1)), _halves(offset.reshape(-1))


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale, offset = _k_scales(b)
    return _per_sub(_k_low(b[:, 16:144]), scale, offset)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scale, offset = _k_scales(b)
    qh = b[:, 16:48].reshape(-1, 1, 32)  # bit j of byte i: bit 4 of sub-block j's weight i
    high = (qh >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return _per_sub(_k_low(b[:, 48:176]) | (high << 4), scale, offset)


def _q6_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # 256 weights in two halves of 128: low nibbles in 64 bytes per half (weights 0-63 low
    # nibble, 64-127 high nibble), top two bits in 32 bytes per half (2 bits per 32-weight group).
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 1, 64)
    low = ((ql >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F).reshape(n, 2, 128)
    qh = b[:, 128:192].reshape(n, 2, 1, 32)
    high = ((qh >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03).reshape(n, 2, 128)
    q = (low | (high << 4)).reshape(-1, 32)
    scale = (_f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)).reshape(-1, 2)
    return q, scale, -32 * scale


_DECODERS = {
    "Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0,
    "Q5_1": _q5_1, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}
