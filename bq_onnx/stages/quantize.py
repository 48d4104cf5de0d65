"""Design the quantizer of every weight: float tensor -> quantized form.

One weight at a time, so only one float copy of one tensor is ever materialised beside the (lazy) model. With
an allocation, a weight whose output-channel slices got different widths becomes :class:`QuantizedPieces`; each
piece is cut from the whole tensor quantized at that width, exactly as the expected-loss tables measured it.
"""

from __future__ import annotations

from bq_onnx.context import Context
from bq_onnx.progress import progress
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, take_columns
from bq_onnx.weights import design, weight_view


def quantize_weights(ctx: Context) -> dict[str, QuantizedTensor]:
    """Each weight quantized at the widths the allocation (or the fixed ``--bits``) gives its blocks."""
    quantized: dict[str, QuantizedTensor] = {}
    for info in progress(ctx.weights, "quantize", enabled=ctx.progress):
        view, importance = weight_view(ctx, info)
        pieces = ctx.pieces_for(info.name, view.shape[1])
        widths = sorted({bits for _, _, bits in pieces})
        designs = {bits: design(ctx, view, importance, bits, info.name) for bits in widths}
        if len(pieces) == 1:
            quantized[info.name] = designs[pieces[0][2]]
        else:
            quantized[info.name] = QuantizedPieces(
                view.shape,
                tuple((start, stop, take_columns(designs[bits], start, stop)) for start, stop, bits in pieces),
            )
    return quantized
