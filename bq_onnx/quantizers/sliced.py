"""The designs of one big weight that are not column-separable, computed slice by slice of output channels with
the bytes of the whole-tensor design (issue 21: a single 8 GiB tensor must stay within 1.5x the model + 1 GiB).

On the whole tensor the Lloyd codebook holds about 5x the weight in temporaries (a blocked copy, the index of
every element to draw its fitting sample from, int16 codes) and outlier isolation about 12x (float64 errors and
their argsort, a float64 importance of ones, a second blocked copy). Here only one slice of columns is
materialized at a time:

* **Lloyd** (``lloyd``, ``lloyd-l1``): the per-block scales come from a first pass over the slices; the fitting
  sample (the same seeded draw of ranks among the real elements) is gathered straight from the weight; the codes
  of each slice are the nearest levels of the one codebook.
* **Outliers** (any per-block scalar design or Lloyd): the worst ``fraction`` of the errors is kept in a bounded
  buffer while the plain design is decoded slice by slice (ties to the lower flat index, as a stable argsort);
  the refit sets them to 0 with weight 0 slice by slice (Lloyd: in its sample); the residuals are decoded at the
  outliers only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from bq_onnx.qtensor import QuantizedTensor, num_blocks, take_columns, to_fp16_exact
from bq_onnx.quantizers import lloyd as lloyd_module
from bq_onnx.quantizers.blocked import FP16_MAX, _fp16, _prepare
from bq_onnx.quantizers.codebook import _codebook_result
from bq_onnx.quantizers.lloyd import LLOYD_MAX_ITER, lloyd_codebook
from bq_onnx.quantizers.registry import quantize
from bq_onnx.quantizers.spec import Spec

#: Scalar methods whose every block depends only on that block's values (and weights).
PER_BLOCK = frozenset({"uniform", "uniform-sym", "percentile", "gaussian", "nf"})
LLOYD = frozenset({"lloyd", "lloyd-l1"})


def supported(spec: Spec, bits: int) -> bool:
    """Designs computed here: a Lloyd codebook (with or without outliers), or outliers over a per-block design."""
    if spec.dim != 1 or not 0 < bits <= 8:
        return False
    return spec.method in LLOYD or (spec.method in PER_BLOCK and spec.outliers > 0)


def quantize_by_columns(view: np.ndarray, bits: int, spec: Spec, block: int, seed: int,
                        step_bytes: int) -> QuantizedTensor:
    """``quantize_spec(view, bits, spec, block, None, seed=seed)`` (no importance), one slice of about
    ``step_bytes`` of columns at a time."""
    from bq_onnx.outliers import outlier_count

    k, n = view.shape
    step = max(1, step_bytes // max(1, 4 * k))
    slices = [(a, min(a + step, n)) for a in range(0, n, step)]

    def design(zeroed: _Zeroed | None) -> QuantizedTensor:
        if spec.method in LLOYD:
            return _lloyd(view, bits, block, seed, spec.method == "lloyd-l1", zeroed, slices)
        double = spec.double_scales and bits > 0

        def part(a: int, b: int) -> QuantizedTensor:
            x, h = _part(view, a, b, zeroed)
            return quantize(x, bits, spec.method, block, h, seed=seed, double_scales=double)

        return _join(((a, b, part(a, b)) for a, b in slices), k, n)

    count = outlier_count(view.size, spec.outliers)
    if count == 0:
        return design(None)
    idx = _worst(view, design(None), count, slices)
    qt = design(_Zeroed(idx, n))
    dense = np.empty(idx.size, dtype=np.float32)
    zeroed = _Zeroed(idx, n)
    for a, b in slices:
        at, rows, cols = zeroed.in_slice(a, b)
        if at.size:
            dense[at] = take_columns(qt, a, b)._dense()[rows, cols]
    flat = view[idx // n, idx % n].astype(np.float64)
    value = to_fp16_exact(np.clip(flat - dense, -FP16_MAX, FP16_MAX))
    return dataclasses.replace(qt, outlier_index=idx, outlier_value=value)


class _Zeroed:
    """Ascending flat indices (row-major ``(K, N)``) set to 0 with weight 0, found by column slice."""

    def __init__(self, idx: np.ndarray, n: int) -> None:
        self.idx = idx
        rows, cols = idx // n, idx % n
        self.order = np.lexsort((rows, cols))  # by column, then row
        self.rows, self.cols = rows[self.order], cols[self.order]

    def in_slice(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions in ``idx``, rows, columns within the slice) of the indices in columns ``[a, b)``."""
        lo, hi = np.searchsorted(self.cols, [a, b])
        return self.order[lo:hi], self.rows[lo:hi], self.cols[lo:hi] - a

    def contains(self, flat: np.ndarray) -> np.ndarray:
        at = np.minimum(np.searchsorted(self.idx, flat), max(self.idx.size - 1, 0))
        return (self.idx[at] == flat) if self.idx.size else np.zeros(flat.shape, dtype=bool)


def _part(view: np.ndarray, a: int, b: int, zeroed: _Zeroed | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Columns ``[a, b)`` as the whole-tensor design sees them: the values (outliers set to 0) and, for a refit,
    the importance (1, 0 at the outliers)."""
    x = np.array(view[:, a:b], dtype=np.float32)
    h = None
    if zeroed is not None:
        _, rows, cols = zeroed.in_slice(a, b)
        h = np.ones(x.shape)
        x[rows, cols] = 0.0
        h[rows, cols] = 0.0
    return x, h


def _join(parts: Iterator[tuple[int, int, QuantizedTensor]], k: int, n: int) -> QuantizedTensor:
    """Slices of one design (columns ``[a, b)`` each) as the whole-tensor result."""
    first, fields = None, {}
    for a, b, part in parts:
        if first is None:
            first = part
            fields = {f: np.empty((getattr(part, f).shape[0], n), dtype=getattr(part, f).dtype)
                      for f in ("codes", "scale", "zero_point", "offset", "scale_code") if getattr(part, f) is not None}
            if part.super_scale is not None:
                fields["super_scale"] = np.empty(n, dtype=np.float32)
        for f, whole in fields.items():
            if whole.ndim == 1:
                whole[a:b] = getattr(part, f)
            else:
                whole[:, a:b] = getattr(part, f)
    assert first is not None
    return dataclasses.replace(first, shape=(k, n), **fields)


def _lloyd(view: np.ndarray, bits: int, block: int, seed: int, l1: bool, zeroed: _Zeroed | None,
           slices: list[tuple[int, int]]) -> QuantizedTensor:
    """:func:`bq_onnx.quantizers.lloyd._lloyd` of the whole view (outliers set to 0 with weight 0), by slices."""
    k, n = view.shape
    g, nb = min(block, k), num_blocks(k, block)
    rem = k - (nb - 1) * g
    method = "lloyd-l1" if l1 else "lloyd"
    s = np.empty((nb, n))
    for a, b in slices:  # each block's fp16 absmax: the scales, and which blocks hold real elements
        x, _ = _part(view, a, b, zeroed)
        s[:, a:b] = _fp16(np.abs(_prepare(x, bits, block, None).x).max(axis=1)).astype(np.float64).reshape(nb, b - a)
    s = s.reshape(-1)  # block rows in the blocked order: block_row * n + column
    per = np.where(s > 0, g, 0)
    per[(nb - 1) * n:] = np.where(s[(nb - 1) * n:] > 0, rem, 0)  # the last block row holds rem real elements
    ends = np.cumsum(per)
    total = int(ends[-1]) if ends.size else 0
    sample = lloyd_module.LLOYD_FIT_SAMPLE
    if total > sample:  # the same draw as choosing from the real elements' positions, in their order
        ranks = np.sort(np.random.default_rng(seed).choice(total, sample, replace=False))
    else:
        ranks = np.arange(total)
    rows = np.searchsorted(ends, ranks, side="right")
    j = ranks - (ends[rows] - per[rows])
    kk, cols = (rows // n) * g + j, rows % n
    values = view[kk, cols].astype(np.float32)
    fw = s[rows] if l1 else s[rows] ** 2
    if zeroed is not None:
        out = zeroed.contains(kk * n + cols)
        values[out] = 0.0
        h = np.where(out, 0.0, 1.0)
        if (h > 0).any():
            fw = fw * h
    u = np.clip(values / s[rows], -FP16_MAX, FP16_MAX)
    cb = _fp16(lloyd_codebook(u, fw, bits, l1=l1, init="companded", max_iter=LLOYD_MAX_ITER))
    sb = s.reshape(nb, n)

    def coded(a: int, b: int) -> QuantizedTensor:
        x, _ = _part(view, a, b, zeroed)
        return _codebook_result(_prepare(x, bits, block, None), cb, sb[:, a:b].reshape(-1), None, bits, method)

    return _join(((a, b, coded(a, b)) for a, b in slices), k, n)


def _worst(view: np.ndarray, base: QuantizedTensor, count: int, slices: list[tuple[int, int]]) -> np.ndarray:
    """:func:`bq_onnx.outliers.select_outliers` of ``base`` without weights: the ascending flat indices of the
    ``count`` largest squared errors (ties: the lower index), holding at most about ``2 count`` candidates."""
    n = view.shape[1]
    errs, idxs = np.empty(0), np.empty(0, dtype=np.int64)
    floor = -np.inf  # the count-th largest error so far: nothing below it can enter

    def reduce(e: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        keep = np.lexsort((i, -e))[:count]
        return e[keep], i[keep]

    for a, b in slices:
        dec = take_columns(base, a, b)._dense()
        err = np.square(dec.astype(np.float64) - np.asarray(view[:, a:b], dtype=np.float64)).reshape(-1)
        pick = np.flatnonzero(err >= floor)
        errs = np.concatenate([errs, err[pick]])
        idxs = np.concatenate([idxs, (pick // (b - a)) * n + a + pick % (b - a)])
        if errs.size > 2 * count:
            errs, idxs = reduce(errs, idxs)
            floor = errs[-1]
    errs, idxs = reduce(errs, idxs)
    return np.sort(idxs).astype(np.int64)

