"""Quantizer numerics: a float weight in canonical ``(K, N)`` view becomes a :class:`QuantizedTensor`.

Plain numpy/scipy; nothing here knows about ONNX. Conventions shared by every quantizer:

* ``w`` is a 2-D real array ``(K, N)``, ``K`` the reduction axis, taken as float32 (other dtypes are cast
  first). Blocks are ``block_size`` consecutive rows of one column; the last block is ragged when
  ``K % block_size != 0``; ``block_size >= K`` gives one block per column (per output channel).
  ``block_size`` is stored unchanged in the result.
* ``weights`` (``(K, N)``, finite, non-negative, default ones) is the per-element importance. Methods that
  optimize minimize ``sum(weights * (Q(w) - w) ** 2)`` (``lloyd-l1``: ``sum(weights * |Q(w) - w|)``); only
  relative weights matter.
* Scales, offsets and codebooks are chosen first and rounded to fp16-representable float32 (clamped to the
  finite fp16 range, so huge weights saturate instead of overflowing). Codes are then the *nearest level of
  the stored metadata in decoded float32 space*, exactly as :meth:`QuantizedTensor.dequantize` reconstructs
  them, ties to the lower code.
* A zero scale never divides: every element of such a block gets the lowest allowed code, and the block
  decodes to ``0`` (uniform, codebook without offset) or to its offset.
* ``bits == 0`` gives kind ``"mean"`` (per-block weighted mean) whatever the method.
* Deterministic; the only randomness (the fitting subsample of very large tensors in the Lloyd methods) comes
  from ``np.random.default_rng(seed)``.

Non-finite inputs, bad shapes and out-of-range arguments raise :class:`ValueError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm

from bq_onnx.qtensor import QuantizedTensor, num_blocks, to_fp16_exact

METHODS: tuple[str, ...] = ("uniform", "uniform-sym", "percentile", "gaussian", "nf", "lloyd", "lloyd-l1")
"""Scalar quantizers (one code per weight)."""

VECTOR_FAMILIES: tuple[str, ...] = ("vq", "vq2", "vq4", "vq8")
"""Vector codebooks: ``vq`` offers every allowed length (:func:`bq_onnx.vector.vector_dims`), ``vqD`` one."""

QUANTIZERS: tuple[str, ...] = (*METHODS, *VECTOR_FAMILIES, "auto")
"""What ``--quantizer`` accepts: a scalar method, a vector family, or ``auto`` (scalar uniform, scalar Lloyd
codebook and every allowed vector codebook, the allocation tables choosing per tensor and width)."""

FP16_MAX = 65504.0
"""Largest finite fp16 value; metadata is clamped to ``[-FP16_MAX, FP16_MAX]`` before fp16 rounding."""

UNIFORM_SHRINK = 1.0 - 0.7 * (np.arange(21) / 20.0) ** 1.5
"""Joint shrink factors ``p`` (1.0 down to 0.3, finer near 1) of the uniform range searches."""

UNIFORM_SIDE_SHRINK = np.linspace(0.95, 0.7, 6)
"""Second stage of the asymmetric search: shrink only ``lo`` or only ``hi`` of the best joint candidate."""

LLOYD_FIT_SAMPLE = 1 << 20
"""Tensors with more elements fit the Lloyd codebook on a seeded subsample of this many elements."""

LLOYD_MAX_ITER = 300
"""Iteration cap of :func:`lloyd_codebook` (an iteration costs ``O(m log n)``); it usually stops earlier, at
an exact fixed point."""


# ------------------------------------------------------------------------------------------------------------
# Entry points


def quantize(
    w: np.ndarray,
    bits: int,
    method: str = "uniform",
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
) -> QuantizedTensor:
    """Quantize ``w`` (``(K, N)``) to ``bits`` (0..8) bits per element with ``method`` from :data:`METHODS`."""
    if method == "uniform":
        return quantize_uniform(w, bits, block_size, weights)
    if method == "uniform-sym":
        return quantize_uniform_sym(w, bits, block_size, weights)
    if method == "percentile":
        return quantize_percentile(w, bits, block_size, weights)
    if method == "gaussian":
        return quantize_gaussian(w, bits, block_size, weights)
    if method == "nf":
        return quantize_nf(w, bits, block_size, weights)
    if method == "lloyd":
        return quantize_lloyd(w, bits, block_size, weights, seed=seed)
    if method == "lloyd-l1":
        return quantize_lloyd_l1(w, bits, block_size, weights, seed=seed)
    raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")


@dataclasses.dataclass(frozen=True)
class Spec:
    """One quantizer design: a scalar ``method`` (``dim == 1``) or a vector codebook (``method == "vq"``, ``dim``
    in 2/4/8), with ``outliers`` = the fraction of weights isolated as sparse fp16 values and ``block`` = the rows
    per block (0: the run's group size)."""

    method: str
    dim: int = 1
    outliers: float = 0.0
    block: int = 0

    @property
    def label(self) -> str:
        name = f"vq{self.dim}" if self.method == "vq" else self.method
        return (name + (f"+outliers{100 * self.outliers:g}%" if self.outliers else "")
                + (f"/g{self.block}" if self.block else ""))


def candidates(
    quantizer: str, outliers: float | str, bits: int, numel: int, blocks: Sequence[int] = ()
) -> list[Spec]:
    """The designs offered for a tensor of ``numel`` weights at ``bits``; the first is the plain reference.

    ``quantizer`` is one of :data:`QUANTIZERS`. Vector families offer the lengths :func:`vector_dims` allows
    at that width; where none is (e.g. 8 bits, or a codebook too large for the tensor) the scalar Lloyd codebook
    stands in. ``outliers``: a fraction (every design carries it) or ``"auto"`` (each design without and with
    each of :data:`bq_onnx.outliers.FRACTIONS`). ``blocks``: block sizes to offer each design at (the first is
    the reference; empty: the run's group size only). 0 bits is always the mean (with the outliers asked for).
    """
    from bq_onnx.outliers import FRACTIONS
    from bq_onnx.vector import vector_dims

    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; expected one of {QUANTIZERS}")
    dims = vector_dims(bits, numel)
    if bits == 0:
        base = [Spec("uniform" if quantizer in VECTOR_FAMILIES or quantizer == "auto" else quantizer)]
    elif quantizer == "auto":
        base = [Spec("uniform"), Spec("lloyd"), *(Spec("vq", d) for d in dims)]
    elif quantizer == "vq":
        base = [Spec("vq", d) for d in dims] or [Spec("lloyd")]
    elif quantizer in VECTOR_FAMILIES:  # forced length: allowed up to a codebook as large as the codes
        d = int(quantizer[2:])
        base = [Spec("vq", d)] if d in vector_dims(bits, numel, share=1.0) else [Spec("lloyd")]
    else:
        base = [Spec(quantizer)]
    fractions = (0.0, *FRACTIONS) if outliers == "auto" else (float(outliers),)
    sizes = tuple(blocks) if blocks and bits > 0 else (0,)
    return [dataclasses.replace(b, outliers=f, block=g) for g in sizes for b in base for f in fractions]


def quantize_spec(
    w: np.ndarray,
    bits: int,
    spec: Spec,
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    base: QuantizedTensor | None = None,
) -> QuantizedTensor:
    """Quantize with one :class:`Spec`; ``base`` is the same spec without outliers when already computed.

    Vector codebooks need blocks in whole vectors: ``block_size`` is rounded up to a multiple of ``dim``.
    """
    from bq_onnx.outliers import isolate_outliers
    from bq_onnx.vector import quantize_vector

    if spec.method == "vq" and bits > 0:
        block = -(-block_size // spec.dim) * spec.dim
        fitted: list[QuantizedTensor] = [] if base is None else [base]

        def design(x: np.ndarray, h: np.ndarray | None) -> QuantizedTensor:
            init = fitted[0].codebook if fitted else None  # the refit without outliers starts from the plain fit
            qt = quantize_vector(x, bits, spec.dim, block, h, seed=seed, init=init)
            fitted.append(qt)
            return qt
    else:
        method = "uniform" if spec.method == "vq" else spec.method

        def design(x: np.ndarray, h: np.ndarray | None) -> QuantizedTensor:
            return quantize(x, bits, method, block_size, h, seed=seed)

    return isolate_outliers(w, weights, spec.outliers, design, base)


def quantization_error(w: np.ndarray, qt: QuantizedTensor, weights: np.ndarray | None = None) -> float:
    """Weighted squared error ``sum(weights * (qt.dequantize() - w) ** 2)``, in float64."""
    w64 = np.asarray(w, dtype=np.float64)
    if w64.shape != tuple(qt.shape):
        raise ValueError(f"w has shape {w64.shape}, the quantized tensor {tuple(qt.shape)}")
    d = qt.dequantize().astype(np.float64) - w64
    d *= d
    if weights is not None:
        d *= np.asarray(weights, dtype=np.float64)
    return float(d.sum())


# ------------------------------------------------------------------------------------------------------------
# Methods


def quantize_mean(
    w: np.ndarray, block_size: int = 32, weights: np.ndarray | None = None, *, method: str = "mean"
) -> QuantizedTensor:
    """0 bits: each block decodes to its weighted mean (fp16); a block with all weights 0 to its plain mean.

    ``method`` is only recorded in the result (every method's 0-bit case lands here).
    """
    return _mean_result(_prepare(w, 0, block_size, weights), method)


def quantize_uniform(
    w: np.ndarray, bits: int, block_size: int = 32, weights: np.ndarray | None = None
) -> QuantizedTensor:
    """Asymmetric uniform: ``w = (code - zp) * scale``, integer ``zp`` and codes in ``[0, 2**bits - 1]``.

    The range starts from the block's ``[lo, hi] = [min(w, 0), max(w, 0)]`` (it holds 0: the zero point is an
    integer code). ``scale = (hi - lo) / (2**bits - 1)`` (fp16) and ``zp = clip(round(-lo / scale))``. Per
    block the candidates ``[lo*p, hi*p]``, ``p`` in :data:`UNIFORM_SHRINK`, are scored by weighted squared
    error; the best is refined by shrinking only ``lo`` or only ``hi`` (:data:`UNIFORM_SIDE_SHRINK`). The
    winner's exact error is then compared with plain min/max (``p = 1``), so the result is never worse than
    min/max round-to-nearest; a non-zero constant block ``c`` also tries ``scale = fp16(|c|)``, which decodes
    it to ``fp16(c)``.
    """
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, "uniform")
    m = 1 << bits
    lo0 = np.minimum(bl.x.min(axis=1), 0).astype(np.float64)
    hi0 = np.maximum(bl.x.max(axis=1), 0).astype(np.float64)
    best_lo, best_hi = lo0.copy(), hi0.copy()
    for rows in _row_chunks(bl.nrows, bl.g):
        best_lo[rows], best_hi[rows] = _search_asymmetric(_Search(bl, rows), lo0[rows], hi0[rows], m)
    cands = [_uniform_meta(best_lo, best_hi, m), _uniform_meta(lo0, hi0, m)]
    return _uniform_pick(bl, _add_constant_candidate(bl, cands, m, False), bits, False, "uniform")


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
    for rows in _row_chunks(bl.nrows, bl.g):
        search, bp, b = _Search(bl, rows), best_p[rows], base[rows]
        for p in UNIFORM_SHRINK:
            bp[search.consider(_fp16(b * p / denom).astype(np.float64), zp[rows], qmin, m - 1)] = p
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


def quantize_gaussian(
    w: np.ndarray, bits: int, block_size: int = 32, weights: np.ndarray | None = None
) -> QuantizedTensor:
    """Gaussian-quantile codebook (paper 001 §3.3): ``w = gaussian_grid(bits)[code] * std + mean``.

    ``mean`` and ``std`` are the block's plain (unweighted, ``ddof=0``) statistics, fp16-rounded, stored as
    offset and scale; the codebook is :func:`gaussian_grid` fp16-rounded. ``weights`` only matter for
    ``bits == 0``.
    """
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, "gaussian")
    mean = _block_mean(bl, weighted=False)
    d = bl.x - mean[:, None]
    d *= d
    if bl.valid is not None:
        d *= bl.valid
    std = np.sqrt(d.sum(axis=1) / bl.count)
    return _codebook_result(bl, _fp16(gaussian_grid(bits)), _fp16(std), _fp16(mean), bits, "gaussian")


def quantize_nf(
    w: np.ndarray, bits: int, block_size: int = 32, weights: np.ndarray | None = None
) -> QuantizedTensor:
    """NormalFloat codebook (QLoRA): ``w = nf_grid(bits)[code] * absmax``, absmax per block (fp16).

    ``weights`` only matter for ``bits == 0``.
    """
    bl = _prepare(w, bits, block_size, weights)
    if bits == 0:
        return _mean_result(bl, "nf")
    return _codebook_result(bl, _fp16(nf_grid(bits)), _fp16(np.abs(bl.x).max(axis=1)), None, bits, "nf")


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


# ------------------------------------------------------------------------------------------------------------
# Grids and codebooks


def gaussian_grid(bits: int) -> np.ndarray:
    """Normalized Gaussian-quantile levels (float64, ascending) for ``m = 2**bits`` equal-mass cells.

    Boundaries ``a_k = Phi^-1(k/m)``; a finite cell is represented by its midpoint, the two infinite ones by
    their medians ``Phi^-1(1/(2m))`` and ``Phi^-1((2m-1)/(2m))``.
    """
    _check_bits(bits, low=1)
    m = 1 << bits
    a = norm.ppf(np.arange(1, m) / m)
    reps = np.empty(m)
    reps[0] = norm.ppf(1.0 / (2 * m))
    reps[-1] = norm.ppf((2.0 * m - 1.0) / (2 * m))
    reps[1:-1] = (a[:-1] + a[1:]) / 2
    return reps


def nf_grid(bits: int) -> np.ndarray:
    """NormalFloat levels (float64, ascending, ``-1`` to ``1``): QLoRA's NF4 construction for any width.

    ``2**(bits-1)`` positive and ``2**(bits-1) - 1`` negative normal quantiles plus an exact 0, the quantile
    range ending at ``delta = 1 - (1/(2m) + 1/(2(m-1))) / 2`` (``m = 2**bits``; 0.9677083 for NF4), scaled by
    the absolute maximum. ``bits == 1`` gives ``[-1, 1]``.
    """
    _check_bits(bits, low=1)
    if bits == 1:
        return np.array([-1.0, 1.0])
    m = 1 << bits
    delta = 1.0 - 0.5 * (1.0 / (2 * m) + 1.0 / (2 * (m - 1)))
    pos = norm.ppf(np.linspace(delta, 0.5, m // 2 + 1)[:-1])
    neg = -norm.ppf(np.linspace(delta, 0.5, m // 2)[:-1])
    vals = np.sort(np.concatenate([neg, [0.0], pos]))
    return vals / np.abs(vals).max()


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


# ------------------------------------------------------------------------------------------------------------
# Blocked view


@dataclasses.dataclass
class _Blocked:
    """``w`` as one row per block: row ``b = block_row * N + column``, the ``(nb, N)`` metadata order.

    Padding slots of the ragged last block row hold a copy of a real element of the same block (so min and
    max are unaffected) and weight 0.
    """

    x: np.ndarray  # (B, G) float32
    wt: np.ndarray | None  # (B, G) float64 scaled to max 1, 0 on padding; None: 1 on real elements
    valid: np.ndarray | None  # (B, G) float32 1/0; None when nothing is padded
    count: np.ndarray  # (B,) real elements per block
    shape: tuple[int, int]
    g: int
    nb: int
    block_size: int

    @property
    def nrows(self) -> int:
        return self.x.shape[0]

    @property
    def eff_wt(self) -> np.ndarray | None:
        """Element weights including the padding mask; None means all ones."""
        return self.wt if self.wt is not None else self.valid

    def per_block(self, v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(self.nb, self.shape[1]))

    def unblock(self, a: np.ndarray) -> np.ndarray:
        k, n = self.shape
        a = a.reshape(self.nb, n, self.g).transpose(0, 2, 1).reshape(self.nb * self.g, n)
        return np.ascontiguousarray(a[:k])


def _to_rows(a: np.ndarray, g: int, nb: int, fill: bool) -> np.ndarray:
    k, n = a.shape
    pad = nb * g - k
    if pad:
        tail = np.broadcast_to(a[(nb - 1) * g], (pad, n)) if fill else np.zeros((pad, n), a.dtype)
        a = np.concatenate([a, tail])
    return np.ascontiguousarray(a.reshape(nb, g, n).transpose(0, 2, 1).reshape(nb * n, g))


def _check_bits(bits: int, low: int = 0) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= 8:
        raise ValueError(f"bits must be an integer in {low}..8, got {bits!r}")


def _prepare(w: np.ndarray, bits: int, block_size: int, weights: np.ndarray | None) -> _Blocked:
    _check_bits(bits)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    arr = np.asarray(w)
    if arr.ndim != 2:
        raise ValueError(f"w must be 2-D (K, N), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"w must be real numeric, got {arr.dtype}")
    k, n = arr.shape
    if k == 0 or n == 0:
        raise ValueError(f"w must not be empty, got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        w32 = arr.astype(np.float32, copy=False)
    if not np.isfinite(w32).all():
        raise ValueError("w contains NaN or Inf (or values beyond the float32 range)")
    g = min(int(block_size), k)
    nb = num_blocks(k, int(block_size))
    wt = None
    if weights is not None:
        wa = np.asarray(weights, dtype=np.float64)
        if wa.shape != (k, n):
            raise ValueError(f"weights must have shape {(k, n)}, got {wa.shape}")
        if not np.isfinite(wa).all() or (wa < 0).any():
            raise ValueError("weights must be finite and non-negative")
        top = wa.max()
        wt = _to_rows(wa / top if top > 0 else wa, g, nb, fill=False)
    x = _to_rows(w32, g, nb, fill=True)
    count = np.full(nb * n, g, dtype=np.int64)
    valid = None
    rem = k - (nb - 1) * g
    if rem != g:
        valid = np.ones(x.shape, dtype=np.float32)
        valid[(nb - 1) * n :, rem:] = 0.0
        count[(nb - 1) * n :] = rem
    return _Blocked(x=x, wt=wt, valid=valid, count=count, shape=(k, n), g=g, nb=nb, block_size=int(block_size))


def _fp16(x: np.ndarray) -> np.ndarray:
    """Nearest fp16 value as float32, after clamping to the finite fp16 range."""
    return to_fp16_exact(np.clip(np.asarray(x, dtype=np.float64), -FP16_MAX, FP16_MAX))


def _block_mean(bl: _Blocked, weighted: bool) -> np.ndarray:
    x = bl.x.astype(np.float64)
    plain = (x.sum(axis=1) if bl.valid is None else (x * bl.valid).sum(axis=1)) / bl.count
    if not weighted or bl.wt is None:
        return plain
    ws = bl.wt.sum(axis=1)
    wx = (x * bl.wt).sum(axis=1)
    return np.where(ws > 0, wx / np.where(ws > 0, ws, 1.0), plain)


def _block_percentile(bl: _Blocked, q: float) -> np.ndarray:
    if bl.valid is None:
        return np.percentile(bl.x, q, axis=1).astype(np.float64)
    split = (bl.nb - 1) * bl.shape[1]
    out = np.empty(bl.nrows)
    if split:
        out[:split] = np.percentile(bl.x[:split], q, axis=1)
    out[split:] = np.percentile(bl.x[split:, : int(bl.count[-1])], q, axis=1)
    return out


def _segment_sums(a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Sums of ``a[b0[i]:b1[i]]`` for ordered, contiguous segments that cover ``a``."""
    out = np.zeros(b0.size)
    nonempty = b1 > b0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(a, b0[nonempty])
    return out


def _mean_result(bl: _Blocked, method: str) -> QuantizedTensor:
    return QuantizedTensor(
        kind="mean", bits=0, shape=bl.shape, block_size=bl.block_size,
        offset=bl.per_block(_fp16(_block_mean(bl, weighted=True))), method=method,
    )


_CHUNK = 1 << 16
"""Elements per chunk of block rows in the search and code passes (keeps the temporaries in cache)."""


def _row_chunks(nrows: int, g: int):
    """Slices of block rows holding about :data:`_CHUNK` elements."""
    step = max(1, _CHUNK // g)
    for a in range(0, nrows, step):
        yield slice(a, min(a + step, nrows))


# ------------------------------------------------------------------------------------------------------------
# Nearest level in decoded space


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
    for r in _row_chunks(x.shape[0], x.shape[1]):
        sub = grid.rows(r)
        codes[r] = _nearest(x[r], sub, sub.guess(x[r], lo, hi), lo, hi, may_tie)
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
    """Per-block-row ``sum(wt * (levels - x)**2)`` in float64 (``wt`` None: all ones)."""
    d = np.subtract(levels, x, dtype=np.float64)
    d *= d
    if wt is not None:
        d *= wt
    return d.sum(axis=1)


# ------------------------------------------------------------------------------------------------------------
# Uniform helpers


def _uniform_meta(lo: np.ndarray, hi: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """fp16 scale and integer zero point (both float64 arrays) for the range ``[lo, hi]``, ``lo <= 0 <= hi``."""
    s = _fp16((hi - lo) / (m - 1)).astype(np.float64)
    pos = s > 0
    zp = np.zeros_like(s)
    zp[pos] = np.clip(np.rint(-lo[pos] / s[pos]), 0, m - 1)
    return s, zp


class _Search:
    """Per-block argmin of the approximate weighted squared error of round-to-nearest over candidate grids.

    Works in float32 on each block divided by its absmax (a per-block factor does not change the per-block
    argmin), so any magnitude is safe; earlier candidates win ties. Covers the block rows ``rows``.
    """

    def __init__(self, bl: _Blocked, rows: slice) -> None:
        x = bl.x[rows]
        amax = np.abs(x).max(axis=1).astype(np.float64)
        self.norm = np.where(amax > 0, amax, 1.0)
        self.u = x / self.norm[:, None].astype(np.float32)
        wt = bl.eff_wt
        self.wt = None if wt is None else wt[rows].astype(np.float32)
        self.best_err = np.full(x.shape[0], np.inf)
        self.t = np.empty_like(self.u)

    def consider(self, s: np.ndarray, zp: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
        """Score the grids ``(code - zp) * s`` (codes in ``[qmin, qmax]``); returns the blocks they improve."""
        sn = (s / self.norm).astype(np.float32)
        inv = np.zeros_like(sn)
        np.divide(np.float32(1), sn, out=inv, where=sn > 0)
        t = np.multiply(self.u, inv[:, None], out=self.t)
        np.rint(t, out=t)
        np.maximum(t, (qmin - zp).astype(np.float32)[:, None], out=t)  # np.clip is slower
        np.minimum(t, (qmax - zp).astype(np.float32)[:, None], out=t)
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
    search: _Search, lo0: np.ndarray, hi0: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """The asymmetric range search of :func:`quantize_uniform` for one chunk of blocks: best ``(lo, hi)``."""
    best_lo, best_hi = lo0.copy(), hi0.copy()

    def consider(lo: np.ndarray, hi: np.ndarray) -> None:
        win = search.consider(*_uniform_meta(lo, hi, m), 0, m - 1)
        best_lo[win] = lo[win]
        best_hi[win] = hi[win]

    for p in UNIFORM_SHRINK:
        consider(lo0 * p, hi0 * p)
    lo1, hi1 = best_lo.copy(), best_hi.copy()
    for q in UNIFORM_SIDE_SHRINK:
        consider(lo1 * q, hi1)
        consider(lo1, hi1 * q)
    return best_lo, best_hi


def _add_constant_candidate(
    bl: _Blocked, cands: list[tuple[np.ndarray, np.ndarray]], m: int, symmetric: bool
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Append, if some block is a non-zero constant ``c``, the first candidate with those blocks changed to
    ``scale = fp16(|c|)`` and a zero point one step from ``c``, so they can decode to ``fp16(c)`` exactly
    (the exact comparison keeps whichever is better; other blocks tie and keep the first candidate)."""
    c = bl.x[:, 0].astype(np.float64)
    const = (bl.x.min(axis=1) == bl.x.max(axis=1)) & (c != 0)
    if not const.any():
        return cands
    s, zp = cands[0][0].copy(), np.array(cands[0][1], dtype=np.float64)
    s[const] = _fp16(np.abs(c[const]))
    if not symmetric:
        zp[const] = np.where(c[const] > 0, 0, m - 1)
    return [*cands, (s, zp)]


def _uniform_pick(
    bl: _Blocked, cands: list[tuple[np.ndarray, np.ndarray]], bits: int, symmetric: bool, method: str
) -> QuantizedTensor:
    """Exact nearest codes for each candidate ``(scale, zp)``; per block the smallest exact weighted error wins
    (earlier candidates win ties)."""
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
    return QuantizedTensor(
        kind="uniform", bits=bits, shape=bl.shape, block_size=bl.block_size,
        codes=bl.unblock(codes.astype(np.uint8)), scale=bl.per_block(s),
        zero_point=None if symmetric else bl.per_block(zp).astype(np.uint8),
        symmetric=symmetric, method=method,
    )


# ------------------------------------------------------------------------------------------------------------
# Codebook helpers


def _codebook_result(
    bl: _Blocked, cb: np.ndarray, s: np.ndarray, off: np.ndarray | None, bits: int, method: str
) -> QuantizedTensor:
    cb = np.sort(np.asarray(cb, dtype=np.float32))
    s32 = np.asarray(s, dtype=np.float32)
    off32 = None if off is None else np.asarray(off, dtype=np.float32)
    grid = _Grid(s32, codebook=cb, offset=off32)
    may_tie = off32 is not None or bool((np.diff(cb) == 0).any())
    codes = _nearest_codes(bl.x, grid, 0, cb.size - 1, may_tie=may_tie)
    return QuantizedTensor(
        kind="codebook", bits=bits, shape=bl.shape, block_size=bl.block_size,
        codes=bl.unblock(codes.astype(np.uint8)), scale=bl.per_block(s32), codebook=cb,
        offset=None if off32 is None else bl.per_block(off32), method=method,
    )


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
