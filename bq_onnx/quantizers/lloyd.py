"""Lloyd-Max codebooks fitted to the weights (weighted 1-D k-means, L2 or L1)."""

from __future__ import annotations

import numpy as np

from bq_onnx.qtensor import QuantizedTensor
from bq_onnx.quantizers.blocked import (
    FP16_MAX,
    _check_bits,
    _fp16,
    _mean_result,
    _prepare,
    _segment_sums,
)
from bq_onnx.quantizers.codebook import _codebook_result

LLOYD_FIT_SAMPLE = 1 << 20
"""Tensors with more elements fit the Lloyd codebook on a seeded subsample of this many elements."""

LLOYD_MAX_ITER = 300
"""Iteration cap of :func:`lloyd_codebook` (an iteration costs ``O(m log n)``); it usually stops earlier, at
an exact fixed point."""


def quantize_lloyd(
    w: np.ndarray,
    bits: int,
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    init: str = "companded",
    max_iter: int = LLOYD_MAX_ITER,
) -> QuantizedTensor:
    """One Lloyd-Max (weighted 1-D k-means) codebook per tensor: ``w = codebook[code] * absmax``.

    ``s`` is the block's fp16-rounded absmax (the stored scale). The codebook is :func:`lloyd_codebook` of
    ``u = w / s`` with element weights ``weights * s**2`` (``init`` and ``max_iter`` are passed on), so the
    fitted objective is the weighted squared error in weight space; blocks with ``s == 0`` decode to 0 anyway
    and are left out. With more than :data:`LLOYD_FIT_SAMPLE` elements the fit uses a subsample drawn with
    ``seed``; codes always use all elements. The codebook is fp16-rounded before the codes are chosen.
    """
    return _lloyd(w, bits, block_size, weights, seed=seed, init=init, max_iter=max_iter, l1=False)


def quantize_lloyd_l1(
    w: np.ndarray,
    bits: int,
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    init: str = "companded",
    max_iter: int = LLOYD_MAX_ITER,
) -> QuantizedTensor:
    """:func:`quantize_lloyd` for the L1 objective ``sum(weights * |Q(w) - w|)``.

    The centroid update is the weighted median of each cell (paper 001 appendix C) and the fit weights are
    ``weights * s``. Codes are nearest levels, which in one dimension are the same under L1 and L2.
    """
    return _lloyd(w, bits, block_size, weights, seed=seed, init=init, max_iter=max_iter, l1=True)


def lloyd_codebook(
    values: np.ndarray,
    weights: np.ndarray | None,
    bits: int,
    *,
    l1: bool = False,
    init: str | np.ndarray = "companded",
    max_iter: int = LLOYD_MAX_ITER,
) -> np.ndarray:
    """Weighted 1-D Lloyd-Max codebook (float64, ascending, ``2**bits`` levels) of ``values``.

    Minimizes ``sum(weights * (c(u) - u)**2)`` (``l1``: ``sum(weights * |c(u) - u|)``), ``c(u)`` the nearest
    level. Each iteration cuts the sorted values at the midpoints between levels (a value on a midpoint joins
    the lower cell) and moves each non-empty cell's level to its weighted mean (``l1``: its lower weighted
    median); empty cells keep their level. Stops when the partition repeats (an exact fixed point) or after
    ``max_iter`` iterations.

    ``init``: ``"quantile"`` starts from the weighted quantiles at ``(k + 1/2) / m``; ``"companded"`` (the
    default) from the same quantiles of the weight density raised to the power 1/3 (``l1``: 1/2), estimated
    on a histogram: the asymptotically optimal level density (Panter-Dite), from which Lloyd converges in far
    fewer iterations at high bit widths; an array gives the starting levels. Zero-weight values are ignored;
    if no weight is positive all values count equally; with no values the levels are ``linspace(-1, 1, m)``.
    """
    _check_bits(bits, low=1)
    m = 1 << bits
    u = np.asarray(values, dtype=np.float64).ravel()
    v = np.ones_like(u) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if u.shape != v.shape:
        raise ValueError("values and weights must have the same size")
    if not (np.isfinite(u).all() and np.isfinite(v).all()) or (v < 0).any():
        raise ValueError("values and weights must be finite and weights non-negative")
    keep = v > 0
    if not keep.any():
        v, keep = np.ones_like(u), np.ones(u.shape, dtype=bool)
    u, v = u[keep], v[keep]
    n = u.size
    if n == 0:
        return np.linspace(-1.0, 1.0, m)
    v = v / v.max()
    order = np.argsort(u, kind="stable")
    us, vs = u[order], v[order]
    cw = np.concatenate([[0.0], np.cumsum(vs)])
    cwu = np.concatenate([[0.0], np.cumsum(vs * us)])
    if isinstance(init, str):
        if init not in ("quantile", "companded"):
            raise ValueError(f"init must be 'quantile', 'companded' or an array, got {init!r}")
        c = _lloyd_init(us, vs, cw, m, 1.0 if init == "quantile" else (0.5 if l1 else 1.0 / 3.0))
    else:
        c = np.sort(np.asarray(init, dtype=np.float64).ravel())
        if c.shape != (m,) or not np.isfinite(c).all():
            raise ValueError(f"init must hold {m} finite levels")
    cut = None
    for _ in range(max_iter):
        new_cut = np.searchsorted(us, (c[:-1] + c[1:]) / 2, side="right")
        if cut is not None and np.array_equal(new_cut, cut):
            break
        cut = new_cut
        b0, b1 = np.concatenate([[0], cut]), np.concatenate([cut, [n]])
        c = _lloyd_update(c, us, cw, cwu, b0, b1, l1)
    if cut is not None and not l1:  # final means from per-cell sums, not differences of cumulative sums
        b0, b1 = np.concatenate([[0], cut]), np.concatenate([cut, [n]])
        wsum = _segment_sums(vs, b0, b1)
        filled = wsum > 0
        c = c.copy()
        c[filled] = _segment_sums(vs * us, b0, b1)[filled] / wsum[filled]
        c = np.sort(c)
    return c


def _lloyd_init(us: np.ndarray, vs: np.ndarray, cw: np.ndarray, m: int, power: float) -> np.ndarray:
    """Levels at the ``(k + 1/2) / m`` quantiles of the (sorted, weighted) values; with ``power < 1``, of the
    weight density raised to ``power``, from a histogram of about ``sqrt(n)`` bins (16 to 4096), linearly
    interpolated within bins."""
    n = us.size
    targets = (np.arange(m) + 0.5) / m
    if power == 1.0 or us[-1] == us[0]:
        return us[np.minimum(np.searchsorted(cw[1:], targets * cw[-1], side="left"), n - 1)]
    nbins = int(np.clip(np.sqrt(n), 16, 4096))
    edges = np.linspace(us[0], us[-1], nbins + 1)
    idx = np.searchsorted(us, edges[1:-1], side="left")
    mass = np.diff(cw[np.concatenate([[0], idx, [n]])])
    comp = np.concatenate([[0.0], np.cumsum(mass**power)])
    t = targets * comp[-1]
    b = np.clip(np.searchsorted(comp, t, side="left") - 1, 0, nbins - 1)
    frac = (t - comp[b]) / np.where(comp[b + 1] > comp[b], comp[b + 1] - comp[b], 1.0)
    return np.sort(edges[b] + np.clip(frac, 0.0, 1.0) * (edges[b + 1] - edges[b]))


def _lloyd_update(
    c: np.ndarray, us: np.ndarray, cw: np.ndarray, cwu: np.ndarray, b0: np.ndarray, b1: np.ndarray, l1: bool
) -> np.ndarray:
    """One centroid step for the cells ``[b0, b1)`` of the sorted values, from the cumulative sums of the
    weights (``cw``) and of ``weights * values`` (``cwu``)."""
    wsum = cw[b1] - cw[b0]
    filled = (b1 > b0) & (wsum > 0)
    new = c.copy()
    if l1:
        half = (cw[b0] + cw[b1]) / 2
        med = np.clip(np.searchsorted(cw[1:], half, side="left"), b0, np.maximum(b1 - 1, b0))
        new[filled] = us[np.minimum(med, us.size - 1)][filled]
    else:
        new[filled] = (cwu[b1] - cwu[b0])[filled] / wsum[filled]
    return np.sort(new)


def _lloyd(
    w: np.ndarray,
    bits: int,
    block_size: int,
    weights: np.ndarray | None,
    *,
    seed: int,
    init: str,
    max_iter: int,
    l1: bool,
) -> QuantizedTensor:
    method = "lloyd-l1" if l1 else "lloyd"
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, method)
    s = _fp16(np.abs(bl.x).max(axis=1)).astype(np.float64)
    real = (s > 0)[:, None] if bl.valid is None else (s > 0)[:, None] & (bl.valid > 0)
    sel = np.flatnonzero(np.broadcast_to(real, bl.x.shape))
    if sel.size > LLOYD_FIT_SAMPLE:
        sel = np.sort(np.random.default_rng(seed).choice(sel, LLOYD_FIT_SAMPLE, replace=False))
    rows = sel // bl.g
    u = np.clip(bl.x.ravel()[sel] / s[rows], -FP16_MAX, FP16_MAX)
    fw = s[rows] if l1 else s[rows] ** 2
    if bl.wt is not None and (bl.wt.ravel()[sel] > 0).any():
        fw = fw * bl.wt.ravel()[sel]
    cb = lloyd_codebook(u, fw, bits, l1=l1, init=init, max_iter=max_iter)
    return _codebook_result(bl, _fp16(cb), s, None, bits, method)
