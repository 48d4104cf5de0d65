"""Append a scalar loss to a model so the autodiff pass can differentiate it (the loss itself:
:mod:`bq_onnx.autodiff.loss`)."""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.autodiff.loss import LOSS_KINDS, append_loss
from bq_onnx.errors import UsageError


class AppendLossPass(ir.passes.InPlacePass):
    """Replace the graph outputs by ``bq_loss``; add the input ``bq_target`` shaped like the chosen output."""

    def __init__(self, kind: str, output: str | None = None, axis: int = -1) -> None:
        if kind not in LOSS_KINDS:
            raise UsageError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
        self.kind = kind
        self.output = output
        self.axis = axis

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        append_loss(model, self.kind, self.output, self.axis)
        return ir.passes.PassResult(model, modified=True)
