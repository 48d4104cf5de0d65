"""Quantizer numerics: a float weight in canonical ``(K, N)`` view becomes a :class:`QuantizedTensor`.

Plain numpy/scipy; nothing here knows about ONNX. One module per family (:mod:`.uniform`, :mod:`.codebook`,
:mod:`.lloyd`), the blocked view and nearest-level search they share (:mod:`.blocked`, :mod:`.grid`), the
name -> quantizer registry (:mod:`.registry`) and the designs a tensor is offered (:mod:`.spec`).
Conventions shared by every quantizer:

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

from bq_onnx.quantizers.blocked import FP16_MAX, quantize_mean
from bq_onnx.quantizers.codebook import gaussian_grid, nf_grid, quantize_gaussian, quantize_nf
from bq_onnx.quantizers.lloyd import (
    LLOYD_FIT_SAMPLE,
    LLOYD_MAX_ITER,
    lloyd_codebook,
    quantize_lloyd,
    quantize_lloyd_l1,
)
from bq_onnx.quantizers.registry import (
    METHODS,
    QUANTIZERS,
    SCALAR_QUANTIZERS,
    VECTOR_FAMILIES,
    Quantizer,
    quantize,
)
from bq_onnx.quantizers.spec import (
    Spec,
    by_columns,
    candidates,
    column_separable,
    quantization_error,
    quantize_spec,
)
from bq_onnx.quantizers.uniform import (
    UNIFORM_SHRINK,
    UNIFORM_SIDE_SHRINK,
    quantize_percentile,
    quantize_uniform,
    quantize_uniform_sym,
    uniform_codes,
)

__all__ = [
    "by_columns",
    "column_separable",
    "FP16_MAX",
    "LLOYD_FIT_SAMPLE",
    "LLOYD_MAX_ITER",
    "METHODS",
    "QUANTIZERS",
    "SCALAR_QUANTIZERS",
    "UNIFORM_SHRINK",
    "UNIFORM_SIDE_SHRINK",
    "VECTOR_FAMILIES",
    "Quantizer",
    "Spec",
    "candidates",
    "gaussian_grid",
    "lloyd_codebook",
    "nf_grid",
    "quantization_error",
    "quantize",
    "quantize_gaussian",
    "quantize_lloyd",
    "quantize_lloyd_l1",
    "quantize_mean",
    "quantize_nf",
    "quantize_percentile",
    "quantize_spec",
    "quantize_uniform",
    "quantize_uniform_sym",
    "uniform_codes",
]
