"""Design the quantizer of every weight: float tensor -> quantized form in ``ctx.quantized``.

One weight at a time, so only one float copy of one tensor is ever materialised beside the (lazy) model. With
an allocation, a weight whose output-channel slices got different widths becomes :class:`QuantizedPieces`; each
piece is cut from the whole tensor quantized at that width, exactly as the expected-loss tables measured it.
"""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.context import Context
from bq_onnx.progress import progress
from bq_onnx.qtensor import QuantizedPieces, take_columns
from bq_onnx.weights import design, weight_view


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
