"""Exact b-bit packing: 8 values in b bytes, least significant bit first.

The compact format stores codes of any width 1..8 with no container waste. Value ``i`` occupies bits
``[i*b, (i+1)*b)`` of a little-endian bit stream; the stream is padded with zeros to a multiple of 8 values,
so every group of 8 values is exactly ``b`` bytes and the ONNX decoder can work on ``(groups, b)`` rows.
"""

from __future__ import annotations

import numpy as np


def packed_size(count: int, bits: int) -> int:
    """Bytes needed for ``count`` values of ``bits`` bits (padded to a whole group of 8 values)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return -(-count // 8) * bits


def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer codes (< 2**bits) into a flat uint8 array."""
    flat = np.asarray(codes).reshape(-1)
    if flat.size and (flat.min() < 0 or flat.max() >= (1 << bits)):
        raise ValueError(f"codes do not fit in {bits} bits")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    out = np.empty(packed_size(flat.size, bits), dtype=np.uint8)
    for start in range(0, flat.size, PACK_CHUNK):  # every 8 values are ``bits`` whole bytes: slices pack apart
        part = flat[start:start + PACK_CHUNK]
        padded = np.zeros(-(-part.size // 8) * 8, dtype=np.uint8)
        padded[: part.size] = part
        # (values, bits) little-endian bit matrix -> one stream -> bytes, LSB first.
        stream = np.unpackbits(padded[:, None], axis=1, bitorder="little")[:, :bits]
        out[start // 8 * bits:start // 8 * bits + padded.size // 8 * bits] = np.packbits(stream.reshape(-1),
                                                                                         bitorder="little")
    return out


PACK_CHUNK = 1 << 22
"""Values packed at once (a multiple of 8): the bit matrix holds 8 bytes per value, so a whole 2^28-element
weight's codes would take 2 GiB of temporaries (issue 21's streaming bound)."""


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as uint8."""
    need = packed_size(count, bits)
    packed = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if packed.size != need:
        raise ValueError(f"expected {need} packed bytes for {count} values of {bits} bits, got {packed.size}")
    stream = np.unpackbits(packed, bitorder="little").reshape(-1, bits)
    weights = (1 << np.arange(bits)).astype(np.uint16)
    return (stream.astype(np.uint16) @ weights).astype(np.uint8)[:count]
