"""A weight as the quantizers see it: its ``(K, N)`` view and importance, and the one function that designs its
quantizer at a width (the expected-loss tables and the quantize pass must agree exactly, so both call it)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx import quantizers
from bq_onnx.context import Context, WeightInfo
from bq_onnx.errors import DataError
from bq_onnx.qtensor import QuantizedTensor


def weight_array(value: ir.Value) -> np.ndarray:
    """The initializer as float32, with NaN/Inf reported by name."""
    arr = np.asarray(value.const_value.numpy(), dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"weight '{value.name}' contains {bad} NaN/Inf value(s)")
    return arr


def weight_view(ctx: Context, info: WeightInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """The values to store and their importance, in the ``(K, N)`` view.

    With a posterior: its mean (a Bayesian network's mean is the weight to store, paper 001; ours equals the
    weight) and its precision as the per-element importance every quantizer weights its error by.
    """
    posterior = ctx.posterior
    if posterior is None:
        return info.layout.to_view(weight_array(info.value)), None
    wp = posterior.weights[info.name]
    return (
        info.layout.to_view(np.asarray(wp.mean, dtype=np.float32)),
        info.layout.to_view(np.asarray(wp.precision, dtype=np.float64)),
    )


def design(
    ctx: Context,
    view: np.ndarray,
    importance: np.ndarray | None,
    bits: int,
    weight: str | None = None,
    spec: quantizers.Spec | None = None,
    base: QuantizedTensor | None = None,
) -> QuantizedTensor:
    """The quantizer of a whole weight at ``bits`` (the tables and the final model use this one function).

    ``spec``: the design; default the one the tables chose for ``(weight, bits)``, else the first candidate of
    ``--quantizer``/``--outliers``. ``base``: the same design without outliers, when already computed.
    """
    q, d = ctx.config.quantization, ctx.derived
    if spec is None:
        spec = ctx.designs.get((weight, bits)) or quantizers.candidates(q.quantizer, d.outliers, bits, view.size)[0]
    group = spec.block or d.group_size_for(weight)
    block = view.shape[0] if group <= 0 else group
    return quantizers.quantize_spec(view, bits, spec, block, importance, seed=q.seed, base=base)
