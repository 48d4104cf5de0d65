"""Design the quantizer of every weight: float tensor -> quantized form in ``ctx.quantized``.

One weight at a time, so only one float copy of one tensor is ever materialised beside the (lazy) model. With
an allocation, a weight whose output-channel slices got different widths becomes :class:`QuantizedPieces`; each
piece is cut from the whole tensor quantized at that width, exactly as the expected-loss tables measured it.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx import quantizers
from bq_onnx.context import Context, WeightInfo
from bq_onnx.errors import DataError
from bq_onnx.progress import progress
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, take_columns


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


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize each weight at the bits the allocation (or the fixed ``--bits``) gives it."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def requires(self, model: ir.Model) -> None:
        assert self.ctx.weights, "FindWeightsPass must run first"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for info in progress(self.ctx.weights, "quantize", enabled=self.ctx.progress):
            view, importance = weight_view(self.ctx, info)
            pieces = self.ctx.pieces_for(info.name, view.shape[1])
            widths = sorted({bits for _, _, bits in pieces})
            designs = {bits: design(self.ctx, view, importance, bits, info.name) for bits in widths}
            if len(pieces) == 1:
                self.ctx.quantized[info.name] = designs[pieces[0][2]]
            else:
                self.ctx.quantized[info.name] = QuantizedPieces(
                    view.shape,
                    tuple((start, stop, take_columns(designs[bits], start, stop)) for start, stop, bits in pieces),
                )
        return ir.passes.PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        missing = [w.name for w in self.ctx.weights if w.name not in self.ctx.quantized]
        assert not missing, f"weights left unquantized: {missing}"
