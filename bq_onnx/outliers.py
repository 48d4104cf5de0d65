"""Outlier isolation (dense-and-sparse, paper 003 remark 4.1): a few weights kept exactly, the grid fitted to the rest.

Plain numpy. Of a tensor's weights, the ``fraction`` with the largest posterior-weighted error under the plain
design (``h * (Q(w) - w)**2``) become sparse outliers; the design is then fitted again with those weights set to 0
and given weight 0 (so they neither stretch a range or an absmax scale nor pull a centroid), and each outlier stores
the fp16 residual ``w - Q'(w)`` that the decode adds back (:meth:`QuantizedTensor.dequantize`). An outlier costs an
index (uint16 when the tensor has at most 65536 weights, else int32) and an fp16 value:
:attr:`QuantizedTensor.outlier_bits`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from bq_onnx.config import MAX_OUTLIERS
from bq_onnx.qtensor import QuantizedTensor, to_fp16_exact

FRACTIONS: tuple[float, ...] = (0.0025, 0.01)
"""Outlier fractions the allocation tables try with ``outliers="auto"`` (besides none)."""

MAX_FRACTION = MAX_OUTLIERS
"""Largest fraction accepted (declared with ``--outliers``)."""

FP16_MAX = 65504.0

Design = Callable[[np.ndarray, "np.ndarray | None"], QuantizedTensor]


def outlier_count(numel: int, fraction: float) -> int:
    """Outliers kept for ``fraction`` of ``numel`` weights (rounded; at least one for a positive fraction)."""
    if not 0.0 <= fraction <= MAX_FRACTION:
        raise ValueError(f"outlier fraction must be in [0, {MAX_FRACTION}], got {fraction!r}")
    return 0 if fraction == 0 else max(1, int(round(fraction * numel)))


def select_outliers(w: np.ndarray, decoded: np.ndarray, weights: np.ndarray | None, count: int) -> np.ndarray:
    """Ascending flat indices of the ``count`` largest ``weights * (decoded - w)**2`` (ties: the lower index)."""
    err = np.square(decoded.astype(np.float64) - np.asarray(w, dtype=np.float64)).ravel()
    if weights is not None:
        err *= np.asarray(weights, dtype=np.float64).ravel()
    count = min(count, err.size)
    order = np.argsort(-err, kind="stable")[:count]
    return np.sort(order).astype(np.int64)


def isolate_outliers(
    w: np.ndarray,
    weights: np.ndarray | None,
    fraction: float,
    design: Design,
    base: QuantizedTensor | None = None,
) -> QuantizedTensor:
    """``design`` (``(w, weights) -> QuantizedTensor``) refitted without the worst ``fraction`` of the weights,
    which are stored as sparse fp16 residuals. ``base``: ``design(w, weights)`` when already computed."""
    w = np.asarray(w, dtype=np.float32)
    count = outlier_count(w.size, fraction)
    if count == 0:
        return base if base is not None else design(w, weights)
    if base is None:
        base = design(w, weights)
    idx = select_outliers(w, base.dequantize(), weights, count)
    rest = w.copy()
    rest.reshape(-1)[idx] = 0.0
    h = np.ones(w.shape) if weights is None else np.array(weights, dtype=np.float64)
    h.reshape(-1)[idx] = 0.0
    qt = design(rest, h).without_outliers()
    dense = qt.dequantize().reshape(-1)
    value = to_fp16_exact(np.clip(w.reshape(-1)[idx].astype(np.float64) - dense[idx], -FP16_MAX, FP16_MAX))
    return dataclasses.replace(qt, outlier_index=idx, outlier_value=value)
