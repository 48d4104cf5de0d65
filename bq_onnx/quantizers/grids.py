"""A design's grid without its codes, and the codes again from it.

Why: designing a uniform or codebook quantizer is a search (the range search scores about 30 candidate grids per
block, Lloyd iterates); its codes are then just the nearest level of the stored grid, ties to the lower code (the
convention every scalar quantizer follows, :mod:`bq_onnx.quantizers`). The expected-loss tables design every weight
at every width they score; keeping each chosen design's grid (scales, zero points, codebook, offsets, outliers: a
few percent of the weight's bytes) lets the quantize stage get the same design back with one nearest-level pass
instead of the search, also where the tables ran in another process (``--workers``/``--ray``: the workers send the
grids back with the tables). :func:`encode` gives the same arrays, byte for byte, as the design it was taken from
(``tests/test_design_grids.py``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from bq_onnx.qtensor import QuantizedTensor, decode_scales, num_blocks
from bq_onnx.quantizers.blocked import _prepare
from bq_onnx.quantizers.grid import _Grid, _nearest_codes

#: Columns of a large weight encoded at once: about this many bytes of its float32 view (the blocked copy and the
#: nearest-level temporaries are a few times that).
ENCODE_CHUNK_BYTES = 16 << 20


@dataclasses.dataclass(frozen=True, eq=False)
class DesignGrid:
    """Everything a scalar design stores but its codes. ``spec`` and ``block_size``: the design it is (the
    :class:`~bq_onnx.quantizers.spec.Spec` as the tables chose it, before the format adds double scales), so a
    caller uses it only for that design. Scales are kept as fp16 where they are fp16 values (all but double-quantized
    ones, which keep their byte codes and super scales instead). Compared by identity (it holds arrays)."""

    spec: object
    kind: str
    bits: int
    shape: tuple[int, int]
    block_size: int
    method: str
    symmetric: bool
    scale: np.ndarray | None  # fp16 or float32 (nb, N); None: decode_scales(scale_code, super_scale)
    zero_point: np.ndarray | None = None
    codebook: np.ndarray | None = None
    offset: np.ndarray | None = None
    scale_code: np.ndarray | None = None
    super_scale: np.ndarray | None = None
    outlier_index: np.ndarray | None = None
    outlier_value: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return sum(int(a.nbytes) for a in (self.scale, self.zero_point, self.codebook, self.offset, self.scale_code,
                                           self.super_scale, self.outlier_index, self.outlier_value) if a is not None)

    def scales(self) -> np.ndarray:
        """The float32 scales the design decodes with."""
        if self.scale is None:
            return decode_scales(self.scale_code, self.super_scale)
        return self.scale.astype(np.float32)


def grid_of(qt: QuantizedTensor, spec: object) -> DesignGrid | None:
    """``qt``'s grid (None for what :func:`encode` cannot rebuild: vector codebooks, the 0-bit mean, fp16)."""
    if qt.kind not in ("uniform", "codebook") or not 1 <= qt.bits <= 8:
        return None
    scale = None
    if qt.scale_code is None:
        half = qt.scale.astype(np.float16)
        scale = half if np.array_equal(half.astype(np.float32), qt.scale) else qt.scale
    return DesignGrid(spec, qt.kind, qt.bits, tuple(qt.shape), qt.block_size, qt.method, qt.symmetric, scale,
                      qt.zero_point, qt.codebook, qt.offset, qt.scale_code, qt.super_scale, qt.outlier_index,
                      qt.outlier_value)


def encode(w: np.ndarray, grid: DesignGrid) -> QuantizedTensor:
    """The design ``grid`` was taken from, on the same ``w``: its codes chosen again as the nearest levels (the
    elements that are outliers coded as 0, as :func:`bq_onnx.outliers.isolate_outliers` designs the rest), in
    slices of columns (every block lies in one column)."""
    x = np.asarray(w, dtype=np.float32)
    k, n = x.shape
    if (k, n) != grid.shape:
        raise ValueError(f"w has shape {(k, n)}, the grid {grid.shape}")
    if grid.outlier_index is not None:
        x = x.copy()
        x.reshape(-1)[grid.outlier_index] = 0.0
    scale = _scales(grid)
    codes = np.empty((k, n), dtype=np.uint8)
    step = max(1, ENCODE_CHUNK_BYTES // max(1, 4 * k))
    for a in range(0, n, step):
        b = min(a + step, n)
        codes[:, a:b] = _codes(x[:, a:b], grid, scale[:, a:b], a, b)
    return _encoded(grid, codes, scale)


def encode_rows(rows: Callable[[int, int], np.ndarray], grid: DesignGrid) -> QuantizedTensor:
    """:func:`encode` of the ``(K, N)`` weight whose rows ``a:b`` ``rows(a, b)`` returns (float32), read band by
    band of about :data:`ENCODE_CHUNK_BYTES`: the same codes, byte for byte (an element's code depends on its value
    and its block's grid alone, and every band holds whole blocks), without the whole float weight in memory
    (issue 21: a weight read whole to be encoded was the quantize step's peak). A band that is not finite raises
    ``ValueError`` as :func:`encode` does."""
    k, n = grid.shape
    scale = _scales(grid)
    g = min(grid.block_size, k)
    band = g * max(1, ENCODE_CHUNK_BYTES // max(1, 4 * n * g))
    codes = np.empty((k, n), dtype=np.uint8)
    index = grid.outlier_index
    a = 0
    while a < k:
        b = k if k - (a + band) < g else a + band  # the last band takes the rest: never a part of a block alone
        x = np.asarray(rows(a, b), dtype=np.float32)
        if x.shape != (b - a, n):
            raise ValueError(f"rows {a}:{b} have shape {x.shape}, not {(b - a, n)}")
        if index is not None:
            inside = index[(index >= a * n) & (index < b * n)] - a * n
            if inside.size:
                x = x.copy() if not x.flags.writeable else x
                x.reshape(-1)[inside] = 0.0
        blocks = slice(a // g, -(-b // g))
        codes[a:b] = _codes_of(x, grid, scale[blocks], _part(grid.zero_point, blocks), _part(grid.offset, blocks))
        a = b
    return _encoded(grid, codes, scale)


def _scales(grid: DesignGrid) -> np.ndarray:
    """The grid's ``(blocks, N)`` scales, checked against its shape."""
    k, n = grid.shape
    scale = grid.scales()
    nb = num_blocks(k, grid.block_size)
    if scale.shape != (nb, n):
        raise ValueError(f"the grid's scales have shape {scale.shape}, not {(nb, n)}")
    return scale


def _encoded(grid: DesignGrid, codes: np.ndarray, scale: np.ndarray) -> QuantizedTensor:
    """The design ``grid`` was taken from, with ``codes`` chosen on it."""
    return QuantizedTensor(
        kind=grid.kind, bits=grid.bits, shape=grid.shape, block_size=grid.block_size, codes=codes, scale=scale,
        zero_point=grid.zero_point, symmetric=grid.symmetric, codebook=grid.codebook, offset=grid.offset,
        method=grid.method, outlier_index=grid.outlier_index, outlier_value=grid.outlier_value,
        scale_code=grid.scale_code, super_scale=grid.super_scale)


def _part(a: np.ndarray | None, rows: slice) -> np.ndarray | None:
    return None if a is None else a[rows]


def _codes(x: np.ndarray, grid: DesignGrid, scale: np.ndarray, a: int, b: int) -> np.ndarray:
    """Nearest codes of columns ``a:b`` (``x``, ``(K, b - a)``) on their grid (``scale``: their ``(nb, b - a)``
    scales), as the quantizers choose them (:func:`bq_onnx.quantizers.uniform._uniform_pick`,
    :func:`bq_onnx.quantizers.codebook._codebook_result`)."""
    columns = slice(a, b)
    zero_point = None if grid.zero_point is None else grid.zero_point[:, columns]
    offset = None if grid.offset is None else grid.offset[:, columns]
    return _codes_of(x, grid, scale, zero_point, offset)


def _codes_of(x: np.ndarray, grid: DesignGrid, scale: np.ndarray, zero_point: np.ndarray | None,
              offset: np.ndarray | None) -> np.ndarray:
    """Nearest codes of ``x`` (a part of the view holding whole blocks) on the grid of its blocks (``scale``,
    ``zero_point``, ``offset``: their ``(blocks, columns)`` parts)."""
    bl = _prepare(x, grid.bits, grid.block_size, None)
    s = scale.reshape(-1)
    if grid.kind == "uniform":
        m = 1 << grid.bits
        qmin = 1 if grid.symmetric and grid.bits >= 2 else 0
        zp = np.float32(m >> 1) if grid.symmetric else zero_point.reshape(-1).astype(np.float32)
        codes = _nearest_codes(bl.x, _Grid(s, zp=zp), qmin, m - 1, may_tie=False)
    else:
        cb = grid.codebook
        off = None if offset is None else np.ascontiguousarray(offset).reshape(-1)
        may_tie = off is not None or bool((np.diff(cb) == 0).any())
        codes = _nearest_codes(bl.x, _Grid(s, codebook=cb, offset=off), 0, cb.size - 1, may_tie=may_tie)
    return bl.unblock(codes.astype(np.uint8))
