"""The autodiff as a pass: the model it returns is the gradient model of :func:`build_gradient_model`."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from bq_onnx.autodiff.gradient import MIN_OPSET, GradientGraph, build_gradient_model


class AutodiffPass(ir.passes.FunctionalPass):
    """:func:`build_gradient_model` as a pass; the returned model is the gradient model, ``result`` describes it."""

    def __init__(self, loss: str, wrt: Sequence[str], weights_as_inputs: bool = False) -> None:
        self.loss = loss
        self.wrt = list(wrt)
        self.weights_as_inputs = weights_as_inputs
        self.result: GradientGraph | None = None

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < MIN_OPSET:
            raise ValueError(f"autodiff needs default-domain opset >= {MIN_OPSET}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.result = build_gradient_model(model, self.loss, self.wrt, weights_as_inputs=self.weights_as_inputs)
        return ir.passes.PassResult(self.result.model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        assert self.result is not None
        expected = [self.result.loss, *self.result.gradients.values()]
        assert [v.name for v in model.graph.outputs] == expected
