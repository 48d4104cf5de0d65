"""Uniform grids: asymmetric and symmetric range searches, percentile ranges, and the paper's reference
grid index :func:`uniform_codes`."""

from __future__ import annotations

import numpy as np

from bq_onnx.qtensor import QuantizedTensor, decode_scales, scale_codes, super_scales
from bq_onnx.quantizers.blocked import (
    _block_percentile,
    _Blocked,
    _check_bits,
    _fp16,
    _mean_result,
    _prepare,
    _row_chunks,
)
from bq_onnx.quantizers.grid import _Grid, _nearest_codes, _weighted_sse
from bq_onnx.quantizers.parallel import run_chunks

UNIFORM_SHRINK = 1.0 - 0.7 * (np.arange(21) / 20.0) ** 1.5
"""Joint shrink factors ``p`` (1.0 down to 0.3, finer near 1) of the uniform range searches."""

UNIFORM_SIDE_SHRINK = np.linspace(0.95, 0.7, 6)
"""Second stage of the asymmetric search: shrink only ``lo`` or only ``hi`` of the best joint candidate."""


def quantize_uniform(
    w: np.ndarray, bits: int, block_size: int = 32, weights: np.ndarray | None = None, *,
    double_scales: bool = False,
) -> QuantizedTensor:
    """Asymmetric uniform: ``w = (code - zp) * scale``, integer ``zp`` and codes in ``[0, 2**bits - 1]``.

    The range starts from the block's ``[lo, hi] = [min(w, 0), max(w, 0)]`` (it holds 0: the zero point is an
    integer code). ``scale = (hi - lo) / (2**bits - 1)`` (fp16) and ``zp = clip(round(-lo / scale))``. Per
    block the candidates ``[lo*p, hi*p]``, ``p`` in :data:`UNIFORM_SHRINK`, are scored by weighted squared
    error; the best is refined by shrinking only ``lo`` or only ``hi`` (:data:`UNIFORM_SIDE_SHRINK`). The
    winner's exact error is then compared with plain min/max (``p = 1``), so the result is never worse than
    min/max round-to-nearest; a non-zero constant block ``c`` also tries ``scale = fp16(|c|)``, which decodes
    it to ``fp16(c)``.

    ``double_scales``: scales are stored as a byte code times one fp16 super scale per column
    (:func:`bq_onnx.qtensor.super_scales`, from the column's largest min/max scale), so every candidate scale is
    rounded to that code grid before it is scored, and codes and zero points are chosen for the decoded scale.
    """
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, "uniform")
    m = 1 << bits
    xmin, xmax = bl.x.min(axis=1), bl.x.max(axis=1)  # read again by the constant-block candidate
    lo0 = np.minimum(xmin, 0).astype(np.float64)
    hi0 = np.maximum(xmax, 0).astype(np.float64)
    sup = _super_rows(bl, lo0, hi0, m) if double_scales else None
    best_lo, best_hi = lo0.copy(), hi0.copy()

    amax = np.maximum(-xmin, xmax)  # each block's largest magnitude, as _Search would compute it

    def search(rows: slice) -> None:
        best_lo[rows], best_hi[rows] = _search_asymmetric(_Search(bl, rows, amax[rows]), lo0[rows], hi0[rows], m,
                                                          None if sup is None else sup[rows])

    run_chunks(search, _row_chunks(bl.nrows, bl.g))
    cands = [_uniform_meta(best_lo, best_hi, m, sup), _uniform_meta(lo0, hi0, m, sup)]
    return _uniform_pick(bl, _add_constant_candidate(bl, cands, m, False, sup, (xmin, xmax)), bits, False, "uniform",
                         sup)


def _super_rows(bl: _Blocked, lo: np.ndarray, hi: np.ndarray, m: int) -> np.ndarray:
    """The super scale of each block row's column (float64 ``(B,)``), from the column's min/max scales."""
    sup = super_scales(bl.per_block(_fp16((hi - lo) / (m - 1))))
    return np.tile(sup.astype(np.float64), bl.nb)


def _snap(s: np.ndarray, sup: np.ndarray | None) -> np.ndarray:
    """Scales ``s`` (float64, last axis the block rows) as stored: fp16, or on the code grid of ``sup``."""
    if sup is None:
        return _fp16(s).astype(np.float64)
    return decode_scales(scale_codes(s, sup), sup).astype(np.float64)


def quantize_uniform_sym(
    w: np.ndarray, bits: int, block_size: int = 32, weights: np.ndarray | None = None
) -> QuantizedTensor:
    """Symmetric uniform: ``w = (code - 2**(bits-1)) * scale`` (implicit zero point, ``symmetric=True``).

    ``bits >= 2``: restricted range, codes in ``[1, 2**bits - 1]`` (code 0 unused) so the grid is symmetric
    under negation; ``scale = amax * p / (2**(bits-1) - 1)`` with ``p`` chosen per block from
    :data:`UNIFORM_SHRINK` by weighted squared error (never worse than ``p = 1``; constant blocks as in
    :func:`quantize_uniform`).

    ``bits == 1``: codes ``{0, 1}`` decode to ``{-scale, 0}`` with ``scale = p * max(-min(w), 0)``. This is
    weak (there is no positive level at all) and only provided for completeness.
    """
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, "uniform-sym")
    m = 1 << bits
    if bits == 1:
        base, denom, qmin = np.maximum(-bl.x.min(axis=1), 0).astype(np.float64), 1.0, 0
    else:
        base, denom, qmin = np.abs(bl.x).max(axis=1).astype(np.float64), float((m >> 1) - 1), 1
    zp = np.full(bl.nrows, float(m >> 1))
    best_p = np.ones(bl.nrows)

    def search(rows: slice) -> None:
        found, bp = _Search(bl, rows), best_p[rows]
        scales = _fp16(base[rows][None, :] * UNIFORM_SHRINK[:, None] / denom).astype(np.float64)
        for p, win in zip(UNIFORM_SHRINK, found.consider_all(scales, np.broadcast_to(zp[rows], scales.shape),
                                                              qmin, m - 1)):
            bp[win] = p

    run_chunks(search, _row_chunks(bl.nrows, bl.g))
    cands = [(_fp16(base * best_p / denom).astype(np.float64), zp), (_fp16(base / denom).astype(np.float64), zp)]
    return _uniform_pick(bl, _add_constant_candidate(bl, cands, m, True), bits, True, "uniform-sym")


def quantize_percentile(
    w: np.ndarray,
    bits: int,
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    lower: float = 5.0,
    upper: float = 95.0,
) -> QuantizedTensor:
    """Uniform asymmetric on the block's ``[lower, upper]`` percentiles (paper 001 §3.2: 5th and 95th).

    Percentiles are unweighted (``np.percentile``, linear interpolation) and the range is widened to hold 0
    (the zero point is an integer code); values outside clip to the end levels; constant blocks as in
    :func:`quantize_uniform`. ``weights`` only matter for ``bits == 0``.
    """
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, "percentile")
    m = 1 << bits
    lo = np.minimum(_block_percentile(bl, lower), 0.0)
    hi = np.maximum(_block_percentile(bl, upper), 0.0)
    cands = _add_constant_candidate(bl, [_uniform_meta(lo, hi, m)], m, False)
    return _uniform_pick(bl, cands, bits, False, "percentile")


def uniform_codes(w: np.ndarray, lo: float, hi: float, bits: int, rounding: str = "nearest") -> np.ndarray:
    """Index (uint8) of the grid point ``lo + i * (hi - lo) / (2**bits - 1)`` for each element of ``w``.

    Paper 003, example 1.1: ``z = (w - lo) * (2**bits - 1) / (hi - lo)`` (float64), clipped to
    ``[0, 2**bits - 1]``, then

    * ``"nearest"``: the closest grid point, ties to the lower index (the paper's rule: ``floor(z) + 1`` if
      ``z - floor(z) > 0.5``, else ``floor(z)``), i.e. its definition (1.1);
    * ``"floor"``: ``floor(z)``, which is what the paper's notebook actually computes (its rounding step is
      overwritten) and which reproduces its published vector ``(6, 2, 5, 2, 5, 0, 3, 7, 5, 2)``.

    Such a grid need not contain 0, so it has no integer zero point: a reference helper, not a quantizer.
    """
    _check_bits(bits, low=1)
    if rounding not in ("nearest", "floor"):
        raise ValueError(f"rounding must be 'nearest' or 'floor', got {rounding!r}")
    x = np.asarray(w, dtype=np.float64)
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(x).all() and np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        raise ValueError("need finite values and lo <= hi")
    top = (1 << bits) - 1
    if hi == lo:
        return np.zeros(x.shape, dtype=np.uint8)
    z = np.clip((x - lo) * top / (hi - lo), 0, top)
    f = np.floor(z)
    q = f if rounding == "floor" else np.where(z - f > 0.5, f + 1, f)
    return q.astype(np.uint8)


def _uniform_meta(lo: np.ndarray, hi: np.ndarray, m: int, sup: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Stored scale (fp16, or on the code grid of ``sup``) and integer zero point (both float64 arrays) for the
    range ``[lo, hi]``, ``lo <= 0 <= hi``."""
    s = _snap((hi - lo) / (m - 1), sup)
    pos = s > 0
    zp = np.zeros_like(s)
    zp[pos] = np.clip(np.rint(-lo[pos] / s[pos]), 0, m - 1)
    return s, zp


class _Search:
    """Per-block argmin of the approximate weighted squared error of round-to-nearest over candidate grids.

    Works in float32 on each block divided by its absmax (a per-block factor does not change the per-block
    argmin), so any magnitude is safe; earlier candidates win ties. Covers the block rows ``rows``.
    """

    def __init__(self, bl: _Blocked, rows: slice, amax: np.ndarray | None = None) -> None:
        """``amax``: the blocks' largest magnitudes where the caller has them (``max(-min, max)``, the same
        values)."""
        x = bl.x[rows]
        amax = (np.abs(x).max(axis=1) if amax is None else amax).astype(np.float64)
        self.norm = np.where(amax > 0, amax, 1.0)
        self.u = x / self.norm[:, None].astype(np.float32)
        wt = bl.eff_wt
        self.wt = None if wt is None else wt[rows].astype(np.float32)
        self.best_err = np.full(x.shape[0], np.inf)
        self.t = np.empty_like(self.u)

    def consider(self, s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
        """Score the grids ``(code - zp) * s`` (codes in ``[qmin, qmax]``); returns the blocks they improve."""
        return next(self.consider_all(s[None, :], zp[None, :], qmin, qmax))

    def consider_all(self, s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int):
        """:meth:`consider` for each row of the ``(C, B)`` candidates ``s``, ``zp`` in turn (yields the blocks each
        improves); the per-candidate metadata is computed for all of them at once (the same elementwise values)."""
        sn_all = (s / self.norm[None, :]).astype(np.float32)
        inv_all = np.zeros_like(sn_all)
        np.divide(np.float32(1), sn_all, out=inv_all, where=sn_all > 0)
        low_all = (qmin - zp).astype(np.float32)
        high_all = (qmax - zp).astype(np.float32)
        for sn, inv, low, high in zip(sn_all, inv_all, low_all, high_all):
            yield self._score(sn, inv, low, high)

    def _score(self, sn: np.ndarray, inv: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        t = np.multiply(self.u, inv[:, None], out=self.t)
        np.rint(t, out=t)
        np.maximum(t, low[:, None], out=t)  # np.clip is slower
        np.minimum(t, high[:, None], out=t)
        t *= sn[:, None]
        t -= self.u
        if self.wt is None:
            err = np.einsum("ij,ij->i", t, t)
        else:
            t *= t
            err = np.einsum("ij,ij->i", t, self.wt)
        win = err < self.best_err
        self.best_err[win] = err[win]
        return win


def _search_asymmetric(
    search: _Search, lo0: np.ndarray, hi0: np.ndarray, m: int, sup: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The asymmetric range search of :func:`quantize_uniform` for one chunk of blocks: best ``(lo, hi)``."""
    best_lo, best_hi = lo0.copy(), hi0.copy()

    def consider(lo: np.ndarray, hi: np.ndarray) -> None:  # (C, B) candidates, in the order they are tried
        for c, win in enumerate(search.consider_all(*_uniform_meta(lo, hi, m, sup), 0, m - 1)):
            best_lo[win] = lo[c][win]
            best_hi[win] = hi[c][win]

    shrink = UNIFORM_SHRINK[:, None]
    consider(lo0[None, :] * shrink, hi0[None, :] * shrink)
    lo1, hi1 = best_lo.copy(), best_hi.copy()
    side = UNIFORM_SIDE_SHRINK[:, None]
    lo_side, hi_side = lo1[None, :] * side, hi1[None, :] * side
    lo_fixed, hi_fixed = np.broadcast_to(lo1, lo_side.shape), np.broadcast_to(hi1, hi_side.shape)
    # per factor q: shrink lo alone, then hi alone
    consider(np.stack([lo_side, lo_fixed], axis=1).reshape(-1, lo1.size),
             np.stack([hi_fixed, hi_side], axis=1).reshape(-1, hi1.size))
    return best_lo, best_hi


def _add_constant_candidate(
    bl: _Blocked, cands: list[tuple[np.ndarray, np.ndarray]], m: int, symmetric: bool,
    sup: np.ndarray | None = None, extremes: tuple[np.ndarray, np.ndarray] | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Append, if some block is a non-zero constant ``c``, the first candidate with those blocks changed to
    ``scale = fp16(|c|)`` and a zero point one step from ``c``, so they can decode to ``fp16(c)`` exactly
    (the exact comparison keeps whichever is better; other blocks tie and keep the first candidate).

    With double-quantized scales (``sup``) ``|c|`` is rarely on the code grid: ``c`` is taken ``j`` steps from the
    zero point instead, the ``j`` in ``1..m-1`` whose snapped scale ``|c| / j`` lands closest to ``c``.
    ``extremes``: each block's minimum and maximum where the caller has them (two passes over the blocks less)."""
    c = bl.x[:, 0].astype(np.float64)
    xmin, xmax = extremes if extremes is not None else (bl.x.min(axis=1), bl.x.max(axis=1))
    const = (xmin == xmax) & (c != 0)
    if not const.any():
        return cands
    s, zp = cands[0][0].copy(), np.array(cands[0][1], dtype=np.float64)
    a = np.abs(c[const])
    if sup is None:
        s[const] = _fp16(a)
    else:
        j = np.arange(1, m, dtype=np.float64)[:, None]
        grid = _snap(a[None, :] / j, sup[const][None, :])
        pick = np.argmin(np.abs(j * grid - a[None, :]), axis=0)
        s[const] = grid[pick, np.arange(a.size)]
    if not symmetric:
        zp[const] = np.where(c[const] > 0, 0, m - 1)
    return [*cands, (s, zp)]


def _uniform_pick(
    bl: _Blocked, cands: list[tuple[np.ndarray, np.ndarray]], bits: int, symmetric: bool, method: str,
    sup: np.ndarray | None = None,
) -> QuantizedTensor:
    """Exact nearest codes for each candidate ``(scale, zp)``; per block the smallest exact weighted error wins
    (earlier candidates win ties). ``sup``: the candidates' scales are on this code grid, stored as codes."""
    m = 1 << bits
    qmin = 1 if symmetric and bits >= 2 else 0
    zp_implicit = np.float32(m >> 1)
    s, zp = cands[0]
    s = np.asarray(s, dtype=np.float32).copy()
    zp = np.asarray(zp, dtype=np.float64).copy()
    grid = _Grid(s, zp=zp_implicit if symmetric else zp)
    codes = _nearest_codes(bl.x, grid, qmin, m - 1, may_tie=False)
    if len(cands) > 1:
        err = _weighted_sse(bl.x, bl.eff_wt, grid.dense(codes))
    for s_c, zp_c in cands[1:]:
        s_c = np.asarray(s_c, dtype=np.float32)
        rows = np.flatnonzero((s_c != s) | (zp_c != zp))  # only blocks where this candidate differs
        if rows.size == 0:
            continue
        x = bl.x[rows]
        sub = _Grid(s_c[rows], zp=zp_implicit if symmetric else zp_c[rows])
        c = _nearest_codes(x, sub, qmin, m - 1, may_tie=False)
        wt = bl.eff_wt
        e = _weighted_sse(x, None if wt is None else wt[rows], sub.dense(c))
        win = e < err[rows]
        rows, c, e = rows[win], c[win], e[win]
        s[rows], zp[rows], codes[rows], err[rows] = s_c[rows], zp_c[rows], c, e
    double = {}
    if sup is not None:
        column_sup = np.ascontiguousarray(sup[: bl.shape[1]], dtype=np.float32)
        code = scale_codes(bl.per_block(s), column_sup)
        double = {"scale_code": code, "super_scale": column_sup}
    return QuantizedTensor(
        kind="uniform", bits=bits, shape=bl.shape, block_size=bl.block_size,
        codes=bl.unblock(codes.astype(np.uint8)), scale=bl.per_block(s),
        zero_point=None if symmetric else bl.per_block(zp).astype(np.uint8),
        symmetric=symmetric, method=method, **double,
    )
