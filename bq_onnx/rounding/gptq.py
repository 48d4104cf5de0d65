"""Error-compensating rounding (GPTQ) on a fixed grid, weighted by the posterior. Plain numpy; no ONNX.

A quantizer (:mod:`bq_onnx.quantizers`, :mod:`bq_onnx.vector`) designs a grid (scales, zero points, codebooks,
outliers) and rounds every weight to its nearest level. Rounding to nearest ignores that a layer's output error is
``tr((W - Q)^T A (W - Q))`` in the ``(K, N)`` view, with ``A = E[x x^T]`` the second moment of the layer's inputs
along the reduction axis (im2col patches for a convolution): correlated inputs let the error of one row be cancelled
by the rows after it. GPTQ (Frantar et al. 2023) rounds the rows ``k = 0..K-1`` in order and, after each, moves the
not-yet-rounded rows by the least-squares correction of that row's rounding error, through the upper Cholesky factor
``U`` of ``H^-1`` (``H^-1 = U^T U``): ``W[k+1:] -= U[k, k+1:]^T (w_k - q_k) / U[k, k]``. Vector codebooks round
``d`` rows at once (``U[S, S]^-T`` in place of ``1 / U[k, k]``); the grid itself never changes, so the result
decodes exactly as the design does.

The Bayesian twist: output channel ``n`` is scored by ``H_n = D_n^1/2 C D_n^1/2`` where ``C`` is the correlation
matrix of ``A`` (unit diagonal) and ``D_n = diag(h[:, n])`` the posterior precision of that channel's weights. Where
the precision is ``diag(A) g_n`` (the K-FAC posterior) this is plain GPTQ on ``A`` up to a per-channel factor; where
the data pin a weight down less (small ``h``), its error costs less, so the compensation of its neighbours' errors
is pushed onto it (the update of ``w_kn`` is divided by ``sqrt(h_kn)``). In whitened coordinates ``x' = sqrt(h) x``
every channel shares ``C``, so one Cholesky serves the tensor. Without a precision ``h = diag(A)``: plain GPTQ.

Damping: ``A + 0.01 * mean(diag(A)) * I`` before the correlation is taken (GPTQ's ``percdamp``), so a singular
``A`` (dead inputs, few calibration rows) still has a Cholesky factor. Precisions are floored at 1 % of their
column's mean (a weight with no precision at all would otherwise absorb unbounded corrections).

Never worse than nearest: per output channel (channels are independent once the grid is fixed) the codes with the
smaller ``e^T H_n e`` on the *undamped* metric are kept, so rounding to nearest's codes stay where compensation
does not pay.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bq_onnx import disk_rows
from bq_onnx.disk_rows import DiskRows
from bq_onnx.pages import is_mapped
from bq_onnx.qtensor import QuantizedTensor, expand_blocks, take_columns, to_fp16_exact
from bq_onnx.quantizers.grid import _Grid, _nearest

DAMPING = 0.01
"""Damping of ``A``: this fraction of the mean of its diagonal is added to the diagonal (GPTQ's ``percdamp``)."""

NO_GRID = ("mean", "float16")
"""Kinds with no levels to re-choose: a block's mean (0 bits), values stored as fp16 (16 bits); kept as they are."""
PRECISION_FLOOR = 0.01
"""Posterior precisions are floored at this fraction of their output channel's mean precision."""

LAZY_ROWS = 128
"""Rows rounded between two updates of the rows below them (GPTQ's lazy batch; changes nothing but speed)."""

BAND_BYTES = 16 << 20
"""With ``A`` on disk (:class:`DiskMetric`), output channels are rounded in bands of columns of about this many
float64 bytes of the ``(K, N)`` view each (the rounder holds about ten such arrays)."""

_FP16_MAX = 65504.0


def gptq_round(
    w: np.ndarray,
    qt: QuantizedTensor,
    a: np.ndarray,
    precision: np.ndarray | None = None,
    *,
    damping: float = DAMPING,
    metric: Metric | None = None,
) -> QuantizedTensor:
    """``qt`` (a design of ``w``, ``(K, N)``) with its codes (and outlier residuals) re-chosen GPTQ-style.

    ``a``: the input second moment ``(K, K)``, or ``(G, K, K)`` for a grouped convolution (output channels
    ``[g N/G, (g+1) N/G)`` read group ``g``). ``precision``: per-weight posterior precision ``(K, N)`` (None: plain
    GPTQ). Scales, zero points, codebooks and outlier positions are ``qt``'s; a 0-bit (mean) or fp16 tensor
    (:data:`NO_GRID`) is returned as it is. ``metric``: ``Metric(a, precision, N, damping)`` when already built
    (it serves every width).
    """
    return gptq_round_errors(w, qt, a, precision, damping=damping, metric=metric)[0]


def gptq_round_errors(
    w: np.ndarray,
    qt: QuantizedTensor,
    a: np.ndarray,
    precision: np.ndarray | None = None,
    *,
    damping: float = DAMPING,
    metric: Metric | None = None,
) -> tuple[QuantizedTensor, np.ndarray | None, np.ndarray | None]:
    """:func:`gptq_round`, and the per-output-channel errors ``e^T H_n e`` on the undamped metric of ``qt``'s codes
    and of the result (None for a kind without a grid), which it computes anyway to choose between them: the
    tables price the compensation by their ratio."""
    k, n = w.shape
    if tuple(qt.shape) != (k, n):
        raise ValueError(f"w has shape {w.shape}, the design {tuple(qt.shape)}")
    groups = grouped_moments(a, k, n)
    if qt.kind in NO_GRID:
        return qt, None, None
    if isinstance(groups, DiskRows):
        metric = DiskMetric(groups, precision, n, damping) if metric is None else metric
        return _banded(w, qt, precision, metric)
    w64 = np.asarray(w, dtype=np.float64)
    metric = Metric(groups, precision, n, damping) if metric is None else metric
    rounded = _Rounder(qt, w64, precision).run(metric)
    # per output channel, keep nearest's codes where compensation did not lower the undamped error
    err_gptq = metric.column_error(w64 - rounded.dequantize())
    err_near = metric.column_error(w64 - qt.dequantize())
    keep = err_near <= err_gptq
    final = np.where(keep, err_near, err_gptq)  # per column, the same values column_error gives the mix
    return (_mix_columns(rounded, qt, keep) if keep.any() else rounded), err_near, final


def gptq_bytes(k: int, n: int, groups: int = 1, on_disk: bool = False) -> int:
    """What one weight's GPTQ rounding allocates at most. In memory (:class:`Metric`): the
    damped correlation, LAPACK's factor and inverse, the factor kept and the judged correlation (five ``(G, K, K)``
    float64 arrays, counted together though not all are alive at once) and the two ``(K, N)`` whitenings. With
    ``A`` on disk (:class:`DiskMetric`): one group's float32 factor while it is built and
    the rounder's band arrays (sixteen bands of :data:`BAND_BYTES`, counted high)."""
    if on_disk:
        return 4 * k * k + 16 * BAND_BYTES + 16 * groups * k
    return 8 * (5 * groups * k * k + 2 * k * n)


def output_error(
    w: np.ndarray, decoded: np.ndarray, a: np.ndarray, precision: np.ndarray | None = None
) -> float:
    """``sum_n e_n^T H_n e_n`` with ``e = decoded - w`` on the undamped metric (``tr(E^T A E)`` without a precision)."""
    w64 = np.asarray(w, dtype=np.float64)
    k, n = w64.shape
    groups = grouped_moments(a, k, n)
    metric = (DiskMetric if isinstance(groups, DiskRows) else Metric)(groups, precision, n, DAMPING)
    return float(metric.column_error(np.asarray(decoded, dtype=np.float64) - w64).sum())


def _upper_inverse_factor(corr: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor ``U`` of ``corr^-1`` (``corr^-1 = U^T U``) from one Cholesky: with ``P`` the
    reversal, ``P corr P = L L^T`` gives ``corr^-1 = (P L^-1 P)^T (P L^-1 P)``, and ``P L^-1 P`` is upper triangular
    with a positive diagonal (so it is the unique factor). ``L^-1`` by forward substitution, exact zeros above
    its diagonal.

    Memory: LAPACK works in place on Fortran-ordered copies (the reversed ``corr`` becomes ``L``, the identity
    becomes ``L^-1``), so three ``(K, K)`` arrays are alive at most, not six (at K = 8192 each is 512 MiB); the
    values are those of the copying calls (LAPACK is handed the same column-major data)."""
    from scipy.linalg import cholesky, solve_triangular

    lower = cholesky(np.asfortranarray(corr[::-1, ::-1]), lower=True, check_finite=False, overwrite_a=True)
    inv = solve_triangular(lower, np.eye(len(corr), order="F"), lower=True, check_finite=False, overwrite_b=True)
    del lower
    return np.ascontiguousarray(np.triu(inv[::-1, ::-1]))


def group_count(a: np.ndarray | DiskRows) -> int:
    """How many groups an ``A`` (``(K, K)`` or ``(G, K, K)``) has."""
    return a.shape[0] if len(a.shape) == 3 else 1


def grouped_moments(a: np.ndarray | DiskRows, k: int, n: int) -> np.ndarray | DiskRows:
    """``A`` as ``(G, K, K)`` float64, checked; one on disk is checked for its shape (its values were, when it was
    summed: :func:`bq_onnx.stages.moments.input_moments`)."""
    if isinstance(a, DiskRows):
        if len(a.shape) not in (2, 3) or a.shape[-2:] != (k, k) or n % group_count(a) or a.dtype != np.float64:
            raise ValueError(f"A must be (K, K) or (G, K, K) float64 with G dividing N = {n}, K = {k}; got {a.shape}")
        return a
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[1:] != (k, k) or n % a.shape[0]:
        raise ValueError(f"A must be (K, K) or (G, K, K) with G dividing N = {n}, K = {k}; got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("A contains NaN or Inf")
    return a


class _Columns:
    """Output channels in ``groups`` groups of ``cols`` (a grouped convolution's groups read their own inputs)."""

    groups: int
    cols: int

    def grouped(self, x: np.ndarray) -> np.ndarray:
        """``(R, N)`` -> ``(G, R, N/G)``."""
        return x.reshape(x.shape[0], self.groups, self.cols).transpose(1, 0, 2)

    def ungrouped(self, x: np.ndarray) -> np.ndarray:
        """``(G, R, N/G)`` -> ``(R, N)``."""
        return x.transpose(1, 0, 2).reshape(x.shape[1], self.groups * self.cols)


class Metric(_Columns):
    """The whitening of every output channel: ``s = sqrt(h)`` (``(K, N)``), the correlation ``C`` per group and the
    upper Cholesky factor ``U`` of the damped ``C^-1``."""

    def __init__(self, a: np.ndarray, precision: np.ndarray | None, n: int, damping: float) -> None:
        g, k, _ = a.shape
        self.groups, self.cols = g, n // g
        diag = np.einsum("gkk->gk", a)
        mean = diag.mean(axis=1)
        level = np.where(mean > 0, mean, 1.0)
        # the damped correlation, built in one (G, K, K) array: ``A + damping I`` scaled by its diagonal on both
        # sides (the same products in the same order as with temporaries; at K = 8192 each is 512 MiB)
        corr = a.copy()
        at = np.arange(k)
        corr[:, at, at] += (damping * level)[:, None]
        dd = np.einsum("gkk->gk", corr).copy()
        inv_sqrt = 1.0 / np.sqrt(dd)
        corr *= inv_sqrt[:, :, None]
        corr *= inv_sqrt[:, None, :]
        self.u = _upper_inverse_factor(corr[0])[None] if g == 1 else np.stack([_upper_inverse_factor(c)
                                                                                for c in corr])
        del corr
        # undamped correlation on the same scale (the metric the result is judged by)
        d0 = np.where(diag > 0, diag, 1.0)
        self.exact = d0[:, :, None] * d0[:, None, :]
        np.sqrt(self.exact, out=self.exact)
        np.divide(a, self.exact, out=self.exact)
        if precision is None:  # H = the damped A itself: whiten by its diagonal; judge by A's
            s = np.sqrt(np.repeat(dd, self.cols, axis=0).T)  # (K, N): each column's group
            self.judge = np.sqrt(np.repeat(d0, self.cols, axis=0).T)
        else:
            h = np.asarray(precision, dtype=np.float64)
            if h.shape != (k, n) or not np.isfinite(h).all() or (h < 0).any():
                raise ValueError(f"precision must be finite, non-negative, shape {(k, n)}")
            floor = PRECISION_FLOOR * h.mean(axis=0)
            s = np.sqrt(np.maximum(h, floor[None, :]))
            s[:, floor <= 0] = 1.0
            self.judge = s
        self.s = s

    def factor_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of every group's factor, ``(G, r1 - r0, K)`` (a view)."""
        return self.u[:, r0:r1]

    @property
    def nbytes(self) -> int:
        """Memory the metric holds."""
        return sum(getattr(self, f).nbytes for f in ("u", "exact", "s", "judge"))

    def column_error(self, e: np.ndarray) -> np.ndarray:
        """Per output channel ``e^T H_n e`` on the undamped correlation (``e^T A e`` without a precision), ``(N,)``."""
        z = self.grouped(self.judge * e)  # (G, K, c)
        return self.ungrouped((self.exact @ z) * z).sum(axis=0)


class DiskMetric(_Columns):
    """:class:`Metric` for an ``A`` on disk (``(G, K, K)``, :class:`DiskRows`), holding at most one ``K x K`` array.

    Why (issue 21): the in-memory metric keeps ``U`` and the judged correlation (two ``K x K`` float64 arrays, 1 GiB
    at K = 8192) and rounds all output channels at once (several ``(K, N)`` float64 arrays), over the streaming
    bound on small models with wide layers. Here each group's ``U`` is built once in one float32 array (the reversed
    damped correlation factored and inverted in place by LAPACK) and kept on disk, where the rounder reads the rows
    of each lazy block as it reaches them; the judged correlation is read from ``A`` a band of rows at a time; the
    channels are rounded a band of columns at a time (:func:`_banded`; they are independent once the grid is
    fixed). The codes equal :class:`Metric`'s but where the float32 factor tips a near tie
    (``tests/test_disk_rows.py``)."""

    def __init__(self, a: DiskRows, precision: np.ndarray | None, n: int, damping: float) -> None:
        self.a = a
        self.groups = group_count(a)
        self.cols, self.k = n // self.groups, a.shape[-1]
        k = self.k
        diag = np.empty((self.groups, k))
        for r0, r1 in a.bands():
            idx = np.arange(r0, r1)
            diag.reshape(-1)[r0:r1] = a.read(r0, r1)[idx - r0, idx % k]
        mean = diag.mean(axis=1)
        level = np.where(mean > 0, mean, 1.0)
        self.dd = diag + (damping * level)[:, None]  # the damped diagonal
        self.d0 = np.where(diag > 0, diag, 1.0)
        if precision is not None:
            h = np.asarray(precision)
            if h.shape != (k, n) or not np.isfinite(h).all() or (h < 0).any():
                raise ValueError(f"precision must be finite, non-negative, shape {(k, n)}")
        self.precision = precision
        self._u: list[DiskRows | None] = [None] * self.groups

    @property
    def nbytes(self) -> int:
        """Memory the metric holds (its factors are on disk unless the disk was full; the importance it reads counts
        unless it is a mapped file's: held by a kept metric, an importance computed for it stayed in memory as long,
        issue 21: 0.6 GiB of the 1 GiB scale model's with ``--calib``)."""
        held = 0 if self.precision is None or is_mapped(self.precision) else self.precision.nbytes
        return self.dd.nbytes + self.d0.nbytes + held + sum(u.nbytes for u in self._u
                                                            if u is not None and not u.on_disk)

    def factor(self, g: int) -> DiskRows:
        """Group ``g``'s ``U`` (``(K, K)`` float32, upper) on disk, built at the first call."""
        if self._u[g] is None:
            u = _disk_factor(self.a, g, self.dd[g])
            self._u[g] = DiskRows.of(u)
        return self._u[g]

    def band(self, g: int, c0: int, c1: int, u: DiskRows | None) -> _Band:
        """Output channels ``[c0, c1)`` of group ``g`` as a one-group metric over ``u`` (its factor)."""
        k = self.k
        if self.precision is None:  # H = the damped A itself: whiten by its diagonal; judge by A's
            s = np.sqrt(np.broadcast_to(self.dd[g][:, None], (k, c1 - c0)))
            judge = np.sqrt(np.broadcast_to(self.d0[g][:, None], (k, c1 - c0)))
        else:
            h = np.asarray(self.precision[:, c0:c1], dtype=np.float64)
            floor = PRECISION_FLOOR * h.mean(axis=0)
            s = np.sqrt(np.maximum(h, floor[None, :]))
            s[:, floor <= 0] = 1.0
            judge = s
        return _Band(self, g, u, s, judge)

    def bands(self) -> list[tuple[int, int, int]]:
        """``(group, c0, c1)``: the columns in bands of about :data:`BAND_BYTES` of float64 ``(K, c)``."""
        step = max(1, BAND_BYTES // (8 * self.k))
        return [(g, c0, min((g + 1) * self.cols, c0 + step))
                for g in range(self.groups) for c0 in range(g * self.cols, (g + 1) * self.cols, step)]

    def column_error(self, e: np.ndarray) -> np.ndarray:
        """:meth:`Metric.column_error`, band by band."""
        out = np.empty(e.shape[1])
        for g, c0, c1 in self.bands():
            out[c0:c1] = self.band(g, c0, c1, None).column_errors(e[:, c0:c1])[0]
        return out

    def judged(self, g: int, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of group ``g``'s undamped correlation (:attr:`Metric.exact`, the same arithmetic)."""
        d0 = self.d0[g]
        return self.a.read(g * self.k + r0, g * self.k + r1) / np.sqrt(d0[r0:r1, None] * d0[None, :])


class _Band(_Columns):
    """One group's band of output channels, as the rounder sees a metric (one group)."""

    def __init__(self, parent: DiskMetric, g: int, u: DiskRows | None, s: np.ndarray, judge: np.ndarray) -> None:
        self.parent, self.g, self.u = parent, g, u
        self.groups, self.cols = 1, s.shape[1]
        self.s, self.judge = s, judge

    def factor_rows(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` of the group's factor, ``(1, r1 - r0, K)`` float64, read from disk."""
        return self.u.read(r0, r1).astype(np.float64)[None]

    def column_errors(self, *errors: np.ndarray) -> list[np.ndarray]:
        """Per output channel ``e^T H_n e`` of each ``(K, c)`` error, one read of ``A`` for all of them."""
        z = np.concatenate([self.judge * e for e in errors], axis=1)
        total = np.zeros(z.shape[1])
        k = self.parent.k
        for r0, r1 in self.parent.a.bands(self.g * k, (self.g + 1) * k, BAND_BYTES):
            i0, i1 = r0 - self.g * k, r1 - self.g * k
            total += ((self.parent.judged(self.g, i0, i1) @ z) * z[i0:i1]).sum(axis=0)
        return np.split(total, len(errors))


def _banded(w: np.ndarray, qt: QuantizedTensor, precision: np.ndarray | None, metric: DiskMetric
            ) -> tuple[QuantizedTensor, np.ndarray, np.ndarray]:
    """:func:`gptq_round_errors` band of output channels by band: each band rounded by :class:`_Rounder` on its
    group's factor and columns, judged against nearest's codes, and its codes put back in place."""
    k, n = qt.shape
    codes = np.array(qt.codes, copy=True)
    values = None if qt.outlier_value is None else np.array(qt.outlier_value, copy=True)
    col = None if qt.outlier_index is None else qt.outlier_index % n
    near, final = np.empty(n), np.empty(n)
    for g, c0, c1 in metric.bands():
        u = metric.factor(g)
        sub = take_columns(qt, c0, c1)
        wb = np.asarray(w[:, c0:c1], dtype=np.float64)
        hb = None if precision is None else precision[:, c0:c1]
        band = metric.band(g, c0, c1, u)
        rounded = _Rounder(sub, wb, hb).run(band)
        err_gptq, err_near = band.column_errors(wb - rounded.dequantize(), wb - sub.dequantize())
        keep = err_near <= err_gptq
        near[c0:c1], final[c0:c1] = err_near, np.where(keep, err_near, err_gptq)
        mixed = _mix_columns(rounded, sub, keep) if keep.any() else rounded
        codes[:, c0:c1] = mixed.codes
        if col is not None and mixed.outlier_value is not None:
            values[(col >= c0) & (col < c1)] = mixed.outlier_value
    return dataclasses.replace(qt, codes=codes, outlier_value=values), near, final


def _disk_factor(a: DiskRows, g: int, dd: np.ndarray) -> np.ndarray:
    """Group ``g``'s ``U`` (:func:`_upper_inverse_factor` of its damped correlation) in one ``K x K`` float32 array:
    the reversed correlation ``P C P`` is written band by band from ``A`` (computed in float64); its C-ordered
    memory read in Fortran order is its transpose (the same matrix), so LAPACK's upper Cholesky ``P C P = R^T R``
    and the inverse ``R^-1`` run in place; that memory read in C order is ``R^-T = L^-1``, and ``U = P L^-1 P`` is
    its memory reversed. float32, as GPTQ's own implementation factors: at K = 8192 the one array is 256 MiB (the
    rows it corrects stay float64)."""
    from scipy.linalg import lapack

    k = a.shape[-1]
    inv_sqrt = 1.0 / np.sqrt(dd)
    m = np.empty((k, k), dtype=np.float32)
    for r0, r1 in a.bands(g * k, (g + 1) * k):
        part = a.read(r0, r1)
        i0, i1 = r0 - g * k, r1 - g * k
        part[np.arange(i1 - i0), np.arange(i0, i1)] = dd[i0:i1]  # A + damping I on the diagonal
        part *= inv_sqrt[i0:i1, None]
        part *= inv_sqrt[None, :]
        m[k - i1 : k - i0] = part[::-1, ::-1]
        del part
    r, info = lapack.spotrf(m.T, lower=0, clean=1, overwrite_a=1)
    if info:
        raise np.linalg.LinAlgError(f"the damped input correlation is not positive definite (LAPACK info {info})")
    r, info = lapack.strtri(r, lower=0, overwrite_c=1)
    if info:
        raise np.linalg.LinAlgError(f"the Cholesky factor is singular (LAPACK info {info})")
    out = np.ascontiguousarray(r.T)  # the same memory where LAPACK worked in place (a copy otherwise)
    del r, m
    _reverse(out.reshape(-1))
    return out


def _reverse(flat: np.ndarray) -> None:
    """``flat[:] = flat[::-1]`` in place, a band of rows' bytes (:data:`bq_onnx.disk_rows.BAND_BYTES`) from each end
    at a time (numpy would copy it whole)."""
    step = max(1, disk_rows.BAND_BYTES // flat.itemsize)
    n = flat.size
    half = n // 2
    for i0 in range(0, half, step):
        i1 = min(half, i0 + step)
        low = flat[i0:i1].copy()
        flat[i0:i1] = flat[n - i1 : n - i0][::-1]
        flat[n - i1 : n - i0] = low[::-1]


class _Rounder:
    """The row loop: nearest level of the current (compensated) target, then the correction of the rows below."""

    def __init__(self, qt: QuantizedTensor, w: np.ndarray, precision: np.ndarray | None) -> None:
        self.qt, self.w = qt, w
        k, n = qt.shape
        self.out_mask = np.zeros((k, n), dtype=bool)
        if qt.outlier_index is not None:
            self.out_mask.reshape(-1)[qt.outlier_index] = True
        self.codes = np.array(qt.codes, copy=True)
        self.decoded = np.zeros((k, n), dtype=np.float32)  # dense levels (outliers not yet added)
        self.outlier_target = np.zeros((k, n), dtype=np.float64)
        if qt.kind == "vector":  # the weights the vector design's nearest codeword uses (zero on outliers)
            hv = np.ones((k, n)) if precision is None else np.array(precision, dtype=np.float64)
            hv[self.out_mask] = 0.0
            top = hv.max()
            self.hv = hv / top if top > 0 else hv
            self.scale_rows = expand_blocks(qt.scale, k, qt.block_size)
        else:
            self.lo = 1 if qt.kind == "uniform" and qt.symmetric and qt.bits >= 2 else 0
            self.hi = (1 << qt.bits) - 1
            cb = qt.codebook
            self.may_tie = qt.kind == "codebook" and (qt.offset is not None or bool((np.diff(cb) == 0).any()))
            self._grids: tuple[int, _Grid | None] = (-1, None)

    def run(self, metric: Metric) -> QuantizedTensor:
        qt = self.qt
        k, n = qt.shape
        d = qt.vector_dim if qt.kind == "vector" else 1
        step_rows = max(d, LAZY_ROWS // d * d)
        s = metric.s
        x = self.w.copy()  # targets, corrected as rows are rounded (kept unwhitened: no update, no change)
        one = d == 1 and metric.groups == 1
        inv_s = 1.0 / s
        for b0 in range(0, k, step_rows):
            b1 = min(k, b0 + step_rows)
            err = np.zeros((b1 - b0, n))
            u = metric.factor_rows(b0, b1)  # (G, b1 - b0, K): the factor's rows of this block
            for v0 in range(b0, b1, d):
                v1 = min(v0 + d, b1)
                q = self._round(v0, v1, x[v0:v1])
                if one:  # one group, scalar rows: plain row arithmetic, no grouping reshapes
                    es = s[v0] * (x[v0] - q[0]) / u[0, v0 - b0, v0]
                    err[v0 - b0] = es
                    if v1 < b1:
                        x[v1:b1] -= np.outer(u[0, v0 - b0, v1:b1], es) * inv_s[v1:b1]
                    continue
                e = metric.grouped(s[v0:v1] * (x[v0:v1] - q))  # whitened error (G, |S|, c)
                if d == 1:
                    es = e / u[:, v0 - b0 : v0 - b0 + 1, v0 : v0 + 1]
                else:
                    es = np.swapaxes(np.linalg.inv(u[:, v0 - b0 : v1 - b0, v0:v1]), 1, 2) @ e  # U_SS^-T e
                err[v0 - b0 : v1 - b0] = metric.ungrouped(es)
                if v1 < b1:
                    x[v1:b1] -= metric.ungrouped(np.swapaxes(u[:, v0 - b0 : v1 - b0, v1:b1], 1, 2) @ es) / s[v1:b1]
            if b1 < k:
                x[b1:] -= metric.ungrouped(np.swapaxes(u[:, :, b1:], 1, 2) @ metric.grouped(err)) * inv_s[b1:]
        return self._result()

    def _round(self, v0: int, v1: int, target: np.ndarray) -> np.ndarray:
        """Codes of rows ``[v0, v1)`` for ``target``; returns their decoded values (outliers exact)."""
        qt = self.qt
        mask = self.out_mask[v0:v1]
        if qt.kind == "vector":
            cb = qt.codebook
            scale = self.scale_rows[v0]
            dlen = qt.vector_dim
            t = np.zeros((dlen, target.shape[1]))
            t[: v1 - v0] = target
            h = np.zeros((dlen, target.shape[1]))
            h[: v1 - v0] = self.hv[v0:v1]
            from bq_onnx.vector import _nearest_vectors

            codes = _nearest_vectors(t.T, h.T, scale.astype(np.float64), cb)
            self.codes[v0 // dlen] = codes.astype(self.codes.dtype)
            dense = (cb[codes] * scale[:, None]).astype(np.float32).T[: v1 - v0]
        else:
            grid = self._grid(v0 // qt.block_size)
            x32 = target.astype(np.float32).T
            codes = _nearest(x32, grid, grid.guess(x32, self.lo, self.hi), self.lo, self.hi, self.may_tie)
            codes = np.where(mask.T, self.codes[v0:v1].T, codes)  # outliers keep the design's dense code
            self.codes[v0:v1] = codes.T.astype(np.uint8)
            dense = grid.dense(codes.astype(np.int64)).T
        self.decoded[v0:v1] = dense
        q = dense.astype(np.float64)
        if mask.any():  # an outlier stores target - dense in fp16: nearly exact
            self.outlier_target[v0:v1][mask] = target[mask]
            value = to_fp16_exact(np.clip(target[mask] - dense[mask], -_FP16_MAX, _FP16_MAX))
            q[mask] = (dense[mask] + value).astype(np.float32)
        return q

    def _grid(self, kb: int) -> _Grid:
        """The levels of block row ``kb`` (built once; every row of the block shares them)."""
        if self._grids[0] != kb:
            qt = self.qt
            zp = None
            if qt.kind == "uniform":
                zp = np.float32(qt.implicit_zero_point) if qt.symmetric else qt.zero_point[kb].astype(np.float32)
            self._grids = (kb, _Grid(qt.scale[kb], zp=zp, codebook=qt.codebook,
                                     offset=None if qt.offset is None else qt.offset[kb]))
        return self._grids[1]

    def _result(self) -> QuantizedTensor:
        qt = self.qt
        out = dataclasses.replace(qt, codes=self.codes)
        if qt.outlier_index is None:
            return out
        idx = qt.outlier_index
        dense = self.decoded.reshape(-1)[idx]
        value = to_fp16_exact(np.clip(self.outlier_target.reshape(-1)[idx] - dense, -_FP16_MAX, _FP16_MAX))
        return dataclasses.replace(out, outlier_value=value)


def _mix_columns(a: QuantizedTensor, b: QuantizedTensor, take_b: np.ndarray) -> QuantizedTensor:
    """``a`` with the codes (and outlier values) of ``b`` in the output channels ``take_b``."""
    codes = np.where(take_b[None, :], b.codes, a.codes)
    if a.outlier_index is None:
        return dataclasses.replace(a, codes=codes)
    col = a.outlier_index % a.shape[1]
    value = np.where(take_b[col], b.outlier_value, a.outlier_value)
    return dataclasses.replace(a, codes=codes, outlier_value=value)
