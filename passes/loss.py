"""Append a scalar loss to a model so the autodiff pass can differentiate it (the loss itself:
:mod:`bq_onnx.autodiff.loss`)."""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.autodiff.loss import LossPlan, append_loss


class AppendLossPass(ir.passes.InPlacePass):
    """Replace the graph outputs by ``bq_loss``; add the input ``bq_target`` (a resolved :class:`LossPlan`, or
    one kind on ``output``)."""

    def __init__(self, kind: str | LossPlan, output: str | None = None, axis: int = -1) -> None:
        self.kind = LossPlan.single(kind, output) if isinstance(kind, str) else kind
        self.output = output
        self.axis = axis

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        append_loss(model, self.kind, self.output, self.axis)
        return ir.passes.PassResult(model, modified=True)
