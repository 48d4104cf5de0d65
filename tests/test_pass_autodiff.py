"""AutodiffPass (passes/autodiff.py) run alone on a tiny model: the gradient model it returns has the loss and one
gradient output per weight, is made of standard ops, and its gradients match float64 central differences in
onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.passes.autodiff import AutodiffPass
from tests import passkit
from tests.conftest import make_model
from tests.written import run

RNG = np.random.default_rng(11)
W = RNG.standard_normal((5, 4)) * 0.5
V = RNG.standard_normal((4, 3)) * 0.5
X = RNG.standard_normal((6, 5))


def _model(w: np.ndarray, v: np.ndarray, opset: int = 21):
    """``loss = sum(tanh(x @ W) @ V) ** 2)`` in float64."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "V"], ["y"]), helper.make_node("Mul", ["y", "y"], ["s"]),
             helper.make_node("ReduceSum", ["s"], ["loss"], keepdims=0)]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["b", 5])],
                      [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])],
                      [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V")], opset=opset)


def _loss(w: np.ndarray, v: np.ndarray) -> float:
    return float(((np.tanh(X @ w) @ v) ** 2).sum())


def _central(w: np.ndarray, v: np.ndarray, which: str, eps: float = 1e-6) -> np.ndarray:
    base = w if which == "W" else v
    grad = np.zeros_like(base)
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += eps
        minus[idx] -= eps
        args_p = (plus, v) if which == "W" else (w, plus)
        args_m = (minus, v) if which == "W" else (w, minus)
        grad[idx] = (_loss(*args_p) - _loss(*args_m)) / (2 * eps)
    return grad


def test_the_pass_alone_returns_the_gradient_model_and_its_gradients_match_finite_differences():
    model = passkit.load(_model(W, V))
    autodiff = AutodiffPass("loss", ["W", "V"])
    out = autodiff(model)
    assert out.modified and out.model is not model
    assert [v.name for v in out.model.graph.outputs] == ["loss", "W.grad", "V.grad"]
    ops = {n.op_type for n in out.model.graph}
    assert {"MatMul", "Tanh", "Mul", "ReduceSum"} <= ops  # the forward pass is kept
    assert all(n.domain in ("", "ai.onnx") for n in out.model.graph)  # standard ops only: plain onnxruntime runs it
    loss, grad_w, grad_v = run(out.model, {"x": X})
    assert loss == pytest.approx(_loss(W, V), rel=1e-12)
    np.testing.assert_allclose(grad_w, _central(W, V, "W"), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(grad_v, _central(W, V, "V"), rtol=1e-6, atol=1e-8)


def test_the_pass_refuses_an_opset_below_its_minimum():
    with pytest.raises(ir.passes.PreconditionError) as caught:
        AutodiffPass("loss", ["W"])(passkit.load(_model(W, V, opset=11)))
    assert "opset" in str(caught.value.__cause__)
