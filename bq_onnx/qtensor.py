"""The quantized form of one weight, as plain numpy.

Every quantizer returns a :class:`QuantizedTensor`; every storage format writes one and every runtime decodes
it. Its :meth:`QuantizedTensor.dequantize` is *the* reference: it performs exactly the float32 operations, in
the same order, that the ONNX decode graphs perform, so runtime outputs can be compared bit for bit.

Canonical view: a weight is quantized as a 2-D matrix ``(K, N)`` where ``K`` runs along the reduction axis
(the axis that blocks are cut along) and ``N`` along output channels. Rows ``[j*G, (j+1)*G)`` of a column form
block ``j``; the last block may be shorter (ragged). Passes map real tensors to and from this view.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

Kind = Literal["uniform", "codebook", "mean"]


def num_blocks(k: int, block_size: int) -> int:
    """Blocks along the reduction axis; the last one may be ragged."""
    return -(-k // block_size)


def expand_blocks(per_block: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Repeat a ``(nb, N)`` per-block array to ``(K, N)`` rows (what Expand/Reshape/Slice do in the graph)."""
    nb, n = per_block.shape
    g = min(block_size, k)  # a block size past K means one block per column
    full = np.broadcast_to(per_block[:, None, :], (nb, g, n)).reshape(nb * g, n)
    return full[:k]


def to_fp16_exact(x: np.ndarray) -> np.ndarray:
    """Round to the nearest fp16 value, returned as float32 (so fp16 storage loses nothing further)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """One weight in canonical ``(K, N)`` view, quantized per block of ``block_size`` rows.

    * ``uniform``: ``w = (code - zero_point) * scale``. ``symmetric`` means the zero point is the implicit
      ``2**(bits-1)`` (stored as a signed container in the native format) and ``zero_point`` is None.
    * ``codebook``: ``w = codebook[code] * scale (+ offset)``; one codebook per tensor, per-block scales.
    * ``mean`` (0 bits): ``w = offset``, the block mean.

    Scales, offsets and codebook entries are float32 holding fp16-representable values, so fp16 and fp32
    storage decode to the same numbers.
    """

    kind: Kind
    bits: int
    shape: tuple[int, int]
    block_size: int
    codes: np.ndarray | None = None
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    symmetric: bool = False
    codebook: np.ndarray | None = None
    offset: np.ndarray | None = None
    method: str = ""

    def __post_init__(self) -> None:
        k, n = self.shape
        nb = num_blocks(k, self.block_size)
        if not 0 <= self.bits <= 8:
            raise ValueError(f"bits must be in 0..8, got {self.bits}")
        for name in ("scale", "offset", "codebook"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                raise ValueError(f"{name} must be finite (fp16 range)")
        if self.kind == "mean":
            _check(self.offset, (nb, n), np.float32, "offset")
            return
        _check(self.codes, (k, n), np.uint8, "codes")
        _check(self.scale, (nb, n), np.float32, "scale")
        if self.codes.size and int(self.codes.max()) >= (1 << self.bits):
            raise ValueError(f"codes exceed {self.bits} bits")
        if self.kind == "uniform":
            if self.symmetric:
                if self.zero_point is not None:
                    raise ValueError("symmetric uniform tensors have an implicit zero point")
            else:
                _check(self.zero_point, (nb, n), np.uint8, "zero_point")
                if self.zero_point.size and int(self.zero_point.max()) >= (1 << self.bits):
                    raise ValueError(f"zero points exceed {self.bits} bits")
        elif self.kind == "codebook":
            _check(self.codebook, (1 << self.bits,), np.float32, "codebook")
            if self.offset is not None:
                _check(self.offset, (nb, n), np.float32, "offset")
        else:
            raise ValueError(f"unknown kind {self.kind!r}")

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.shape[0], self.block_size)

    @property
    def implicit_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        """float32 ``(K, N)`` reconstruction, in the graph's operation order."""
        k, _ = self.shape
        g = self.block_size
        if self.kind == "mean":
            return expand_blocks(self.offset, k, g).copy()
        codes = self.codes.astype(np.float32)
        scale = expand_blocks(self.scale, k, g)
        if self.kind == "uniform":
            if self.symmetric:
                zp = np.float32(self.implicit_zero_point)
            else:
                zp = expand_blocks(self.zero_point.astype(np.float32), k, g)
            return ((codes - zp) * scale).astype(np.float32)
        w = self.codebook[self.codes] * scale
        if self.offset is not None:
            w = w + expand_blocks(self.offset, k, g)
        return w.astype(np.float32)


def _check(arr: np.ndarray | None, shape: tuple[int, ...], dtype: type, name: str) -> None:
    if arr is None:
        raise ValueError(f"{name} is required")
    if arr.shape != shape or arr.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}{list(shape)}, got {arr.dtype}{list(arr.shape)}")


def take_columns(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Output channels ``[start, stop)`` of a quantized tensor (blocks run down columns, so they split cleanly)."""

    def cols(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[:, start:stop])

    return dataclasses.replace(
        qt,
        shape=(qt.shape[0], stop - start),
        codes=cols(qt.codes),
        scale=cols(qt.scale),
        zero_point=cols(qt.zero_point),
        offset=cols(qt.offset),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedPieces:
    """A weight whose output-channel slices were allocated different bit widths.

    ``pieces`` are ``(start, stop, QuantizedTensor)`` covering columns ``0..N`` in order.
    """

    shape: tuple[int, int]
    pieces: tuple[tuple[int, int, QuantizedTensor], ...]

    def __post_init__(self) -> None:
        expected = 0
        for start, stop, qt in self.pieces:
            if start != expected or qt.shape != (self.shape[0], stop - start):
                raise ValueError("pieces must tile the columns in order")
            expected = stop
        if expected != self.shape[1]:
            raise ValueError("pieces must cover every column")

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def dequantize(self) -> np.ndarray:
        return np.concatenate([qt.dequantize() for _, _, qt in self.pieces], axis=1)

    @property
    def payload_bits(self) -> int:
        return sum(qt.shape[0] * qt.shape[1] * qt.bits for _, _, qt in self.pieces)
