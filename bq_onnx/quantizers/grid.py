"""Nearest level in decoded space: codes are the levels that :meth:`QuantizedTensor.dequantize` reconstructs
nearest to each weight, computed in its own float32 operation order (ties to the lower code)."""

from __future__ import annotations

import numpy as np

from bq_onnx.quantizers.blocked import _row_chunks
from bq_onnx.quantizers.parallel import run_chunks


class _Grid:
    """Decoded float32 levels of one tensor's metadata, per block row, in :meth:`dequantize`'s operation order.

    Uniform: ``(code - zp) * scale``; codebook: ``codebook[code] * scale (+ offset)``. Levels never decrease
    with the code (sorted codebook, ``scale >= 0``).
    """

    def __init__(self, scale: np.ndarray, *, zp=None, codebook=None, offset=None) -> None:
        self.s = np.asarray(scale, dtype=np.float32)
        self.zp = None if zp is None else np.asarray(zp, dtype=np.float32)
        self.cb = None if codebook is None else np.asarray(codebook, dtype=np.float32)
        self.off = None if offset is None else np.asarray(offset, dtype=np.float32)

    def rows(self, r: slice) -> _Grid:
        """The grid of block rows ``r``."""
        return _Grid(self.s[r], zp=_pick(self.zp, r), codebook=self.cb, offset=_pick(self.off, r))

    def guess(self, x: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Approximately the first code whose level is ``>= x`` (``(B, G)``); :func:`_nearest` corrects it."""
        inv = np.zeros(self.s.shape, dtype=np.float64)
        np.divide(1.0, self.s, out=inv, where=self.s > 0)
        if self.cb is None:
            z = self.zp if self.zp.ndim == 0 else self.zp[:, None]
            return np.ceil(np.clip(x * inv[:, None] + z, lo - 1, hi + 1))
        with np.errstate(over="ignore", invalid="ignore"):  # inf is a fine guess
            xn = x if self.off is None else x - self.off[:, None]
            return np.searchsorted(self.cb, xn * inv[:, None].astype(np.float32), side="left")

    def dense(self, c: np.ndarray) -> np.ndarray:
        """Levels of the ``(B, G)`` codes ``c``."""
        return self._levels(c, self.s[:, None], _col(self.zp), _col(self.off))

    def at(self, c: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Levels of the codes ``c`` of elements in block rows ``rows`` (1-D)."""
        return self._levels(c, self.s[rows], _pick(self.zp, rows), _pick(self.off, rows))

    def _levels(self, c, s, zp, off) -> np.ndarray:
        if self.cb is None:
            return (c.astype(np.float32) - zp) * s
        v = self.cb[c] * s
        return v if off is None else v + off


def _col(a: np.ndarray | None) -> np.ndarray | None:
    return a if a is None or a.ndim == 0 else a[:, None]


def _pick(a: np.ndarray | None, rows: np.ndarray) -> np.ndarray | None:
    return a if a is None or a.ndim == 0 else a[rows]


def _nearest_codes(x: np.ndarray, grid: _Grid, lo: int, hi: int, may_tie: bool) -> np.ndarray:
    """:func:`_nearest` over cache-sized chunks of block rows."""
    codes = np.empty(x.shape, dtype=np.int16)

    def chunk(r: slice) -> None:
        sub = grid.rows(r)
        codes[r] = _nearest(x[r], sub, sub.guess(x[r], lo, hi), lo, hi, may_tie)

    run_chunks(chunk, _row_chunks(x.shape[0], x.shape[1]))
    return codes


def _nearest(x: np.ndarray, grid: _Grid, j0: np.ndarray, lo: int, hi: int, may_tie: bool) -> np.ndarray:
    """Lowest code in ``[lo, hi]`` whose decoded level is nearest to ``x`` (``(B, G)``), as int16.

    ``j0`` guesses the first code whose level is ``>= x``; it is corrected exactly in decoded space, the
    nearer neighbour wins (ties to the lower code, distances in float64 like a brute-force argmin) and, when
    equal levels are possible (``may_tie``), the code moves down over levels equal to it. Rows with a zero
    scale (all levels equal) get ``lo``.
    """
    g = x.shape[1]
    j = np.clip(j0, lo, hi + 1).astype(np.int16)
    dead = grid.s == 0
    has_b = j > lo
    has_a = j <= hi
    lv_b = grid.dense(np.maximum(j - 1, lo))
    lv_a = grid.dense(np.minimum(j, hi))
    bad = (has_b & (lv_b >= x)) | (has_a & (lv_a < x))
    bad[dead] = False
    fix = np.flatnonzero(bad)
    if fix.size:  # rare: the float64 guess was off by a code or more
        jf, xf, rows = j.ravel()[fix].astype(np.int64), x.ravel()[fix], fix // g
        sub = np.arange(fix.size)
        sub = sub[jf[sub] > lo]
        while sub.size:
            sub = sub[grid.at(jf[sub] - 1, rows[sub]) >= xf[sub]]
            jf[sub] -= 1
            sub = sub[jf[sub] > lo]
        sub = np.arange(fix.size)
        sub = sub[jf[sub] <= hi]
        while sub.size:
            sub = sub[grid.at(jf[sub], rows[sub]) < xf[sub]]
            jf[sub] += 1
            sub = sub[jf[sub] <= hi]
        j.ravel()[fix] = jf
        has_b.ravel()[fix] = jf > lo
        has_a.ravel()[fix] = jf <= hi
        lv_b.ravel()[fix] = grid.at(np.maximum(jf - 1, lo), rows)
        lv_a.ravel()[fix] = grid.at(np.minimum(jf, hi), rows)
    d_b = np.subtract(x, lv_b, dtype=np.float64)
    d_a = np.subtract(lv_a, x, dtype=np.float64)
    d_b[~has_b] = np.inf
    d_a[~has_a] = np.inf
    below = d_b <= d_a
    codes = np.where(below, j - 1, j).astype(np.int16)
    codes[dead] = lo
    if may_tie:  # equal levels: move down to the lowest code of the run
        walk = below & (codes > lo)
        walk &= grid.dense(np.maximum(codes - 1, lo)) == lv_b
        walk = np.flatnonzero(walk)
        if walk.size:
            cw, rows = codes.ravel()[walk].astype(np.int64) - 1, walk // g
            sub = np.arange(walk.size)
            sub = sub[cw[sub] > lo]
            while sub.size:
                sub = sub[grid.at(cw[sub] - 1, rows[sub]) == grid.at(cw[sub], rows[sub])]
                cw[sub] -= 1
                sub = sub[cw[sub] > lo]
            codes.ravel()[walk] = cw
    return codes


def _weighted_sse(x: np.ndarray, wt: np.ndarray | None, levels: np.ndarray) -> np.ndarray:
    """Per-block-row ``sum(wt * (levels - x)**2)`` in float64 (``wt`` None: all ones), by chunks of rows."""
    out = np.empty(x.shape[0])

    def chunk(r: slice) -> None:
        d = np.subtract(levels[r], x[r], dtype=np.float64)
        d *= d
        if wt is not None:
            d *= wt[r]
        out[r] = d.sum(axis=1)

    run_chunks(chunk, _row_chunks(x.shape[0], x.shape[1]))
    return out
