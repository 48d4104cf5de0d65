"""AppendLossPass (passes/loss.py): the graph ends in the scalar loss the autodiff pass differentiates."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.errors import UsageError
from tests import passkit
from tests.conftest import make_model
from tests.written import run

RNG = np.random.default_rng(5)
W = RNG.standard_normal((6, 5)).astype(np.float32)
X = RNG.standard_normal((4, 6)).astype(np.float32)
MODEL = make_model(
    [helper.make_node("MatMul", ["x", "W"], ["logits"]), helper.make_node("Relu", ["logits"], ["other"])],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
    [helper.make_tensor_value_info("other", TensorProto.FLOAT, ["b", 5]),
     helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5])],
    [numpy_helper.from_array(W, "W")],
)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("kind", ["kl", "ce", "mse"])
def test_loss_replaces_the_outputs_and_matches_numpy(kind):
    model = passkit.append_loss(passkit.load(MODEL), kind, output="logits")
    graph = model.graph
    assert [v.name for v in graph.outputs] == [passkit.LOSS]
    assert [v.name for v in graph.inputs] == ["x", passkit.TARGET]
    ops = {n.op_type for n in graph}
    assert ({"Sub", "ReduceSum"} if kind == "mse" else {"LogSoftmax", "ReduceSum", "Neg"}) <= ops
    logits = X.astype(np.float64) @ W.astype(np.float64)
    target = np.abs(RNG.standard_normal(logits.shape))
    target /= target.sum(axis=1, keepdims=True)
    expected = 0.5 * np.sum((logits - target) ** 2) if kind == "mse" else -np.sum(target * _log_softmax(logits))
    got = run(model, {"x": X, passkit.TARGET: target.astype(np.float32)})[0]
    assert got.shape == () and got == pytest.approx(expected, rel=1e-5)


def test_default_output_is_the_first_and_bad_arguments_are_usage_errors():
    model = passkit.append_loss(passkit.load(MODEL), "ce")
    relu = next(n for n in model.graph if n.op_type == "Relu")
    assert any(u.node.op_type == "LogSoftmax" for u in relu.outputs[0].uses())  # "other" is the first output
    with pytest.raises(UsageError, match="not a graph output"):
        passkit.append_loss(passkit.load(MODEL), "kl", output="nowhere")
    with pytest.raises(UsageError, match="--loss must be one of"):
        passkit.append_loss(passkit.load(MODEL), "hinge")
