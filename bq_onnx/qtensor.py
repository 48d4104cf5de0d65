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
import math
from collections.abc import Iterator
from typing import Literal

import numpy as np

Kind = Literal["uniform", "codebook", "vector", "mean", "float16"]

FLOAT16_BITS = 16
"""The float16 width: the weight stored as fp16 values (``--allowed-bits ...,16``), no codes, no metadata."""

OUTLIER_VALUE_BITS = 16
"""Outlier values are stored in fp16."""


def outlier_index_bits(numel: int) -> int:
    """Bits of one stored outlier index: uint16 when every flat index fits, else int32."""
    return 16 if numel <= (1 << 16) else 32


def num_blocks(k: int, block_size: int) -> int:
    """Blocks along the reduction axis; the last one may be ragged."""
    return -(-k // block_size)


def expand_blocks(per_block: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """Repeat a ``(nb, N)`` per-block array to ``(K, N)`` rows (what Expand/Reshape/Slice do in the graph)."""
    nb, n = per_block.shape
    g = min(block_size, k)  # a block size past K means one block per column
    full = np.broadcast_to(per_block[:, None, :], (nb, g, n)).reshape(nb * g, n)
    return full[:k]


SCALE_CODE_MAX = 255
"""Largest scale code of double-quantized scales: a block's scale is ``code * super_scale``, code an unsigned byte."""


def super_scales(scale: np.ndarray) -> np.ndarray:
    """Per column ``(N,)``: the smallest fp16 value ``s`` with ``255 * s`` at least the column's largest scale, so
    every scale of the column lies on the code grid ``{0, s, ..., 255 s}`` (0 for an all-zero column).

    Why rounded up: the largest (usually min/max) scale keeps its whole range; rounding down would clip it."""
    largest = np.asarray(scale, dtype=np.float64).max(axis=0, initial=0.0)
    sup = to_fp16_exact(np.minimum(largest / SCALE_CODE_MAX, 65504.0))
    low = sup.astype(np.float64) * SCALE_CODE_MAX < largest
    if low.any():  # round up to the next fp16 value (nextafter in fp16)
        sup[low] = np.nextafter(sup[low].astype(np.float16), np.float16(np.inf)).astype(np.float32)
    return np.where(np.isfinite(sup), sup, np.float32(65504.0)).astype(np.float32)


def scale_codes(scale: np.ndarray, sup: np.ndarray) -> np.ndarray:
    """Nearest code of each scale on its column's grid ``code * sup`` (uint8; ``sup`` broadcasts against ``scale``).

    Code 0 (scale 0: the block decodes to 0) only for a zero scale or a zero column: a non-zero scale gets at least
    code 1, whose grid still holds 0 (the zero point is a code), so it is never worse than decoding the block to 0."""
    s = np.asarray(scale, dtype=np.float64)
    d = np.broadcast_to(np.asarray(sup, dtype=np.float64), s.shape)
    q = np.zeros(s.shape)
    np.divide(s, d, out=q, where=d > 0)
    low = np.where((s > 0) & (d > 0), 1, 0)
    return np.clip(np.rint(q), low, SCALE_CODE_MAX).astype(np.uint8)


def decode_scales(code: np.ndarray, sup: np.ndarray) -> np.ndarray:
    """``code * sup`` in float32, what the decode graphs compute (exact: 8-bit code times an fp16 mantissa)."""
    return (np.asarray(code).astype(np.float32) * np.asarray(sup, dtype=np.float32)).astype(np.float32)


def to_fp16_exact(x: np.ndarray) -> np.ndarray:
    """Round to the nearest fp16 value, returned as float32 (so fp16 storage loses nothing further)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


#: Above this many bytes of float32 output, :meth:`QuantizedTensor.dequantize` decodes by slices of columns.
DEQUANTIZE_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """One weight in canonical ``(K, N)`` view, quantized per block of ``block_size`` rows.

    * ``uniform``: ``w = (code - zero_point) * scale``. ``symmetric`` means the zero point is the implicit
      ``2**(bits-1)`` (stored as a signed container in the native format) and ``zero_point`` is None.
    * ``codebook``: ``w = codebook[code] * scale (+ offset)``; one codebook per tensor, per-block scales.
    * ``vector``: ``vector_dim`` (``d``) consecutive rows of a column form one vector; ``codes`` ``(Kv, N)``
      with ``Kv = ceil(K / d)`` index the rows of ``codebook`` ``(2**(bits*d), d)`` (one per tensor), and
      ``w = codebook[code]`` laid back along the rows, cut to ``K`` (a ragged last vector), ``* scale``.
      ``bits`` stays the cost per weight; an index takes ``bits * d`` bits (:attr:`index_bits`).
    * ``mean`` (0 bits): ``w = offset``, the block mean.
    * ``float16`` (16 bits): ``w = offset``, the ``(K, N)`` weights rounded to fp16 (one block; for tensors so
      small that 8-bit codes plus their scales cost more, or so sensitive that 8 bits lose too much).

    Any kind may carry sparse outliers: ``outlier_index`` (ascending flat indices into the row-major ``(K, N)``
    view, int64) and ``outlier_value`` (float32, fp16-representable) are added back after the dense decode:
    ``flat[idx] = flat[idx] + value`` (a Gather, an Add and a ScatterElements in the graph).

    Scales, offsets and codebook entries are float32 holding fp16-representable values, so fp16 and fp32
    storage decode to the same numbers; except *double-quantized* scales (uniform kinds, compact format): then
    ``scale_code`` (uint8 ``(nb, N)``) and ``super_scale`` (fp16-representable float32 ``(N,)``, one per column)
    are what is stored and ``scale`` is their float32 product :func:`decode_scales` (exact, so every decode agrees).
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
    vector_dim: int = 1
    outlier_index: np.ndarray | None = None
    outlier_value: np.ndarray | None = None
    scale_code: np.ndarray | None = None
    super_scale: np.ndarray | None = None

    def __post_init__(self) -> None:
        k, n = self.shape
        nb = num_blocks(k, self.block_size)
        if self.kind == "float16" or self.bits == FLOAT16_BITS:
            if self.kind != "float16" or self.bits != FLOAT16_BITS:
                raise ValueError(f"16 bits are the float16 kind, got {self.kind} at {self.bits} bits")
        elif not 0 <= self.bits <= 8:
            raise ValueError(f"bits must be in 0..8, got {self.bits}")
        for name in ("scale", "offset", "codebook", "outlier_value"):
            value = getattr(self, name)
            if value is not None and not np.isfinite(value).all():
                raise ValueError(f"{name} must be finite (fp16 range)")
        self._check_outliers(k * n)
        if self.kind == "mean":
            _check(self.offset, (nb, n), np.float32, "offset")
            return
        if self.kind == "float16":
            _check(self.offset, (k, n), np.float32, "offset")
            return
        if self.kind == "vector":
            self._check_vector(k, n, nb)
            return
        _check(self.codes, (k, n), np.uint8, "codes")
        _check(self.scale, (nb, n), np.float32, "scale")
        if self.codes.size and int(self.codes.max()) >= (1 << self.bits):
            raise ValueError(f"codes exceed {self.bits} bits")
        self._check_double_scales(nb, n)
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

    def _check_double_scales(self, nb: int, n: int) -> None:
        if self.scale_code is None and self.super_scale is None:
            return
        if self.scale_code is None or self.super_scale is None:
            raise ValueError("scale_code and super_scale go together")
        if self.kind != "uniform":
            raise ValueError(f"double-quantized scales are for uniform tensors, got {self.kind}")
        _check(self.scale_code, (nb, n), np.uint8, "scale_code")
        _check(self.super_scale, (n,), np.float32, "super_scale")
        sup = self.super_scale
        if not np.isfinite(sup).all() or (sup < 0).any() or not np.array_equal(sup, to_fp16_exact(sup)):
            raise ValueError("super_scale must be finite, non-negative and fp16-representable")
        if not np.array_equal(self.scale, decode_scales(self.scale_code, sup)):
            raise ValueError("scale must equal scale_code * super_scale (float32)")

    def _check_outliers(self, numel: int) -> None:
        if self.outlier_index is None and self.outlier_value is None:
            return
        if self.outlier_index is None or self.outlier_value is None:
            raise ValueError("outlier_index and outlier_value go together")
        m = self.outlier_index.shape
        _check(self.outlier_index, m, np.int64, "outlier_index")
        _check(self.outlier_value, m, np.float32, "outlier_value")
        idx = self.outlier_index
        if idx.ndim != 1 or (idx.size and (idx[0] < 0 or idx[-1] >= numel or (np.diff(idx) <= 0).any())):
            raise ValueError("outlier_index must be ascending, unique flat indices into the (K, N) view")

    def _check_vector(self, k: int, n: int, nb: int) -> None:
        d = self.vector_dim
        if not 1 <= d <= 8 or self.bits < 1 or self.index_bits > 16:
            raise ValueError(f"vector tensors need 1 <= d <= 8, bits >= 1 and bits * d <= 16, got d={d}, "
                             f"bits={self.bits}")
        if self.block_size < k and self.block_size % d:
            raise ValueError(f"block_size {self.block_size} must be a multiple of the vector length {d}")
        dtype = np.uint8 if self.index_bits <= 8 else np.uint16
        _check(self.codes, (-(-k // d), n), dtype, "codes")
        if self.codes.size and int(self.codes.max()) >= (1 << self.index_bits):
            raise ValueError(f"codes exceed {self.index_bits} index bits")
        _check(self.scale, (nb, n), np.float32, "scale")
        _check(self.codebook, (1 << self.index_bits, d), np.float32, "codebook")
        if self.offset is not None:
            raise ValueError("vector tensors have no offset")

    @property
    def index_bits(self) -> int:
        """Bits of one code: ``bits`` per weight, ``bits * d`` per vector index."""
        return self.bits * (self.vector_dim if self.kind == "vector" else 1)

    @property
    def num_outliers(self) -> int:
        return 0 if self.outlier_index is None else int(self.outlier_index.size)

    @property
    def outlier_bits(self) -> int:
        """Stored bits of the sparse outliers: an index (uint16 or int32) and an fp16 value each."""
        k, n = self.shape
        return self.num_outliers * (outlier_index_bits(k * n) + OUTLIER_VALUE_BITS)

    @property
    def payload_bits(self) -> int:
        """Per-weight data: ``bits`` per weight plus the outliers (indices and values)."""
        return self.shape[0] * self.shape[1] * self.bits + self.outlier_bits

    @property
    def num_blocks(self) -> int:
        return num_blocks(self.shape[0], self.block_size)

    @property
    def implicit_zero_point(self) -> int:
        return 1 << (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        """float32 ``(K, N)`` reconstruction, in the graph's operation order (outliers added last).

        A big tensor is decoded slice by slice of columns into the result (the same elementwise arithmetic): the
        whole-tensor decode holds about five float32 temporaries of the tensor's size (issue 21)."""
        k, n = self.shape
        if k * n * 4 <= DEQUANTIZE_CHUNK_BYTES or self.kind == "float16":
            w = self._dense()
        else:
            w = np.empty((k, n), dtype=np.float32)
            step = max(1, DEQUANTIZE_CHUNK_BYTES // (4 * k))
            for a in range(0, n, step):
                w[:, a:a + step] = take_columns(self, a, min(a + step, n))._dense()
        if self.outlier_index is not None:
            flat = w.reshape(-1)
            flat[self.outlier_index] = flat[self.outlier_index] + self.outlier_value
        return w

    def _dense(self) -> np.ndarray:
        k, n = self.shape
        g = self.block_size
        if self.kind == "mean":
            return expand_blocks(self.offset, k, g).copy()
        if self.kind == "float16":
            return self.offset.copy()
        scale = expand_blocks(self.scale, k, g)
        if self.kind == "vector":
            kv, d = self.codes.shape[0], self.vector_dim
            rows = self.codebook[self.codes].transpose(0, 2, 1).reshape(kv * d, n)[:k]
            return np.ascontiguousarray((rows * scale).astype(np.float32))
        codes = self.codes.astype(np.float32)
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

    @property
    def double_scales(self) -> bool:
        """Whether the scales are stored as byte codes times a per-column fp16 super scale."""
        return self.scale_code is not None

    def with_scale(self, scale: np.ndarray) -> QuantizedTensor:
        """A copy with new scales (distillation's tuned ones), put on what this tensor stores: fp16 values, or for
        double-quantized scales the nearest code of each column's super scale (kept)."""
        if self.scale_code is None:
            return dataclasses.replace(self, scale=to_fp16_exact(scale))
        code = scale_codes(scale, self.super_scale)
        return dataclasses.replace(self, scale=decode_scales(code, self.super_scale), scale_code=code)

    def without_outliers(self) -> QuantizedTensor:
        """The dense part alone."""
        return dataclasses.replace(self, outlier_index=None, outlier_value=None)


def _check(arr: np.ndarray | None, shape: tuple[int, ...], dtype: type, name: str) -> None:
    if arr is None:
        raise ValueError(f"{name} is required")
    if arr.shape != shape or arr.dtype != dtype:
        raise ValueError(f"{name} must be {np.dtype(dtype).name}{list(shape)}, got {arr.dtype}{list(arr.shape)}")


def take_columns(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Output channels ``[start, stop)`` of a quantized tensor (blocks run down columns, so they split cleanly)."""

    def cols(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else np.ascontiguousarray(a[:, start:stop])

    index, value = qt.outlier_index, qt.outlier_value
    if index is not None:
        n = qt.shape[1]
        row, col = index // n, index % n
        keep = (col >= start) & (col < stop)
        index = row[keep] * (stop - start) + (col[keep] - start)
        value = value[keep]
        if index.size == 0:
            index = value = None
    return dataclasses.replace(
        qt,
        shape=(qt.shape[0], stop - start),
        codes=cols(qt.codes),
        scale=cols(qt.scale),
        zero_point=cols(qt.zero_point),
        offset=cols(qt.offset),
        super_scale=None if qt.super_scale is None else np.ascontiguousarray(qt.super_scale[start:stop]),
        scale_code=cols(qt.scale_code),
        outlier_index=index,
        outlier_value=value,
    )


def row_step(qt: QuantizedTensor | QuantizedPieces, rows: int) -> int | None:
    """Rows per band of about ``rows`` (at least one block: a multiple of every piece's block size) in which
    :func:`dequantize_rows` decodes ``qt``; None where it cannot (vector codes span rows, one block per column)."""
    parts = [p for _, _, p in qt.pieces] if isinstance(qt, QuantizedPieces) else [qt]
    k = qt.shape[0]
    step = 1
    for p in parts:
        if p.kind not in ("uniform", "codebook", "mean") or p.block_size >= k:
            return None
        step = step * p.block_size // math.gcd(step, p.block_size)
    return max(step, rows // step * step)


def row_bands(qt: QuantizedTensor | QuantizedPieces, nbytes: int) -> Iterator[tuple[int, np.ndarray]] | None:
    """``(first row, rows decoded)`` of ``qt`` band by band of about ``max(BAND_BYTES, nbytes / BANDS)`` float32
    bytes (``nbytes``: the whole decode's), or None where it cannot be cut by rows (:func:`row_step`). Fewer, bigger
    bands of a weight cut into thousands of pieces take less time: each band decodes every piece."""
    k, n = qt.shape
    step = row_step(qt, max(BAND_BYTES, nbytes // BANDS) // max(4 * n, 1))
    if step is None:
        return None
    return ((a, dequantize_rows(qt, a, min(a + step, k))) for a in range(0, k, step))


BAND_BYTES = 16 << 20
BANDS = 32


def dequantize_rows(qt: QuantizedTensor | QuantizedPieces, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of ``qt.dequantize()``, the same values (the same elementwise arithmetic on the rows'
    codes and their blocks' scales), without decoding the rest: a big weight written band by band (issue 21).
    ``start`` is a multiple of :func:`row_step`'s step, ``stop`` one too or the last row."""
    if isinstance(qt, QuantizedPieces):
        out = np.empty((stop - start, qt.shape[1]), dtype=np.float32)
        for a, b, part in qt.pieces:
            out[:, a:b] = dequantize_rows(part, start, stop)
        return out
    return take_rows(qt, start, stop).dequantize()


def take_rows(qt: QuantizedTensor, start: int, stop: int) -> QuantizedTensor:
    """Rows ``[start, stop)`` of a quantized tensor whose blocks they cut whole (``start`` a multiple of the block
    size): views of its codes and of its blocks' scales, offsets and zero points, its outliers in those rows."""
    k, n = qt.shape
    g = qt.block_size
    if qt.kind not in ("uniform", "codebook", "mean") or start % g or (stop % g and stop != k) or g >= k:
        raise ValueError(f"rows {start}..{stop} do not cut whole blocks of {g} rows of a {qt.kind} tensor")
    lo, hi = start // g, -(-stop // g)

    def blocks(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[lo:hi]

    index, value = qt.outlier_index, qt.outlier_value
    if index is not None:
        keep = (index >= start * n) & (index < stop * n)
        index, value = index[keep] - start * n, value[keep]
        if index.size == 0:
            index = value = None
    return dataclasses.replace(
        qt, shape=(stop - start, n), codes=None if qt.codes is None else qt.codes[start:stop],
        scale=blocks(qt.scale), zero_point=blocks(qt.zero_point), offset=blocks(qt.offset),
        scale_code=blocks(qt.scale_code), outlier_index=index, outlier_value=value)


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
        """float32 ``(K, N)``: each piece decoded straight into its columns (a list of decoded pieces joined
        afterwards held the weight twice)."""
        out = np.empty(self.shape, dtype=np.float32)
        for start, stop, qt in self.pieces:
            out[:, start:stop] = qt.dequantize()
        return out

    @property
    def payload_bits(self) -> int:
        return sum(qt.payload_bits for _, _, qt in self.pieces)


def float16_tensor(w: np.ndarray) -> QuantizedTensor:
    """``w`` (K, N) stored as fp16 values (clamped to the finite fp16 range), decoded by a Cast to float."""
    w = np.asarray(w, dtype=np.float64)
    fp16_max = float(np.finfo(np.float16).max)
    values = to_fp16_exact(np.clip(w, -fp16_max, fp16_max))
    return QuantizedTensor("float16", FLOAT16_BITS, (w.shape[0], w.shape[1]), max(w.shape[0], 1), offset=values,
                           method="float16")
