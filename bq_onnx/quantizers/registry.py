"""The scalar quantizers by name, and the names ``--quantizer`` accepts.

:data:`SCALAR_QUANTIZERS` maps each method to its function behind one call shape; its order is the order users
see, and :data:`METHODS` and :data:`QUANTIZERS` are derived from it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bq_onnx.qtensor import QuantizedTensor
from bq_onnx.quantizers.codebook import quantize_gaussian, quantize_nf
from bq_onnx.quantizers.lloyd import quantize_lloyd, quantize_lloyd_l1
from bq_onnx.quantizers.uniform import quantize_percentile, quantize_uniform, quantize_uniform_sym

Quantizer = Callable[[np.ndarray, int, int, "np.ndarray | None", int], QuantizedTensor]
"""``(w, bits, block_size, weights, seed) -> QuantizedTensor``."""


def _deterministic(method: Callable[..., QuantizedTensor]) -> Quantizer:
    """A method without randomness: the seed does not reach it."""

    def run(w: np.ndarray, bits: int, block_size: int, weights: np.ndarray | None, seed: int) -> QuantizedTensor:
        return method(w, bits, block_size, weights)

    return run


def _seeded(method: Callable[..., QuantizedTensor]) -> Quantizer:
    """A method whose fitting subsample is drawn with the seed."""

    def run(w: np.ndarray, bits: int, block_size: int, weights: np.ndarray | None, seed: int) -> QuantizedTensor:
        return method(w, bits, block_size, weights, seed=seed)

    return run


SCALAR_QUANTIZERS: dict[str, Quantizer] = {
    "uniform": _deterministic(quantize_uniform),
    "uniform-sym": _deterministic(quantize_uniform_sym),
    "percentile": _deterministic(quantize_percentile),
    "gaussian": _deterministic(quantize_gaussian),
    "nf": _deterministic(quantize_nf),
    "lloyd": _seeded(quantize_lloyd),
    "lloyd-l1": _seeded(quantize_lloyd_l1),
}

METHODS: tuple[str, ...] = tuple(SCALAR_QUANTIZERS)
"""Scalar quantizers (one code per weight)."""

VECTOR_FAMILIES: tuple[str, ...] = ("vq", "vq2", "vq4", "vq8")
"""Vector codebooks: ``vq`` offers every allowed length (:func:`bq_onnx.vector.vector_dims`), ``vqD`` one."""

QUANTIZERS: tuple[str, ...] = (*METHODS, *VECTOR_FAMILIES, "auto")
"""What ``--quantizer`` accepts: a scalar method, a vector family, or ``auto`` (scalar uniform, scalar Lloyd
codebook and every allowed vector codebook, the allocation tables choosing per tensor and width)."""


def quantize(
    w: np.ndarray,
    bits: int,
    method: str = "uniform",
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    double_scales: bool = False,
) -> QuantizedTensor:
    """Quantize ``w`` (``(K, N)``) to ``bits`` (0..8) bits per element with ``method`` from :data:`METHODS`.

    ``double_scales``: byte-coded scales times a per-column fp16 super scale (``uniform`` only)."""
    if method not in SCALAR_QUANTIZERS:
        raise ValueError(f"unknown quantization method {method!r}; expected one of {METHODS}")
    if double_scales:
        if method != "uniform":
            raise ValueError(f"double-quantized scales are implemented for uniform only, not {method!r}")
        return quantize_uniform(w, bits, block_size, weights, double_scales=True)
    return SCALAR_QUANTIZERS[method](w, bits, block_size, weights, seed)
