"""Fixed-shape codebooks (Gaussian quantiles, NormalFloat) and the codebook result every codebook method
shares."""

from __future__ import annotations

import numpy as np
from scipy.stats import norm

from bq_onnx.qtensor import QuantizedTensor
from bq_onnx.quantizers.blocked import (
    _block_mean,
    _Blocked,
    _check_bits,
    _fp16,
    _mean_result,
    _prepare,
)
from bq_onnx.quantizers.grid import _Grid, _nearest_codes


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
