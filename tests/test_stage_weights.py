"""find_weights (bq_onnx/stages/weights.py): which initializers are weights, in which (K, N) view; model untouched."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.errors import UnsupportedError
from tests import passkit
from tests.conftest import make_model
from tests.written import run

RNG = np.random.default_rng(1)
ARRAYS = {
    "W": RNG.standard_normal((16, 12)).astype(np.float32),  # MatMul B: K = 16 rows
    "G": RNG.standard_normal((8, 12)).astype(np.float32),  # Gemm transB: stored (N, K) = (8, 12)
    "bias": RNG.standard_normal(8).astype(np.float32),  # Add: no reduction axis
    "small": RNG.standard_normal((8, 2)).astype(np.float32),  # below min_size
    "E": RNG.standard_normal((10, 16)).astype(np.float32),  # Gather table
}


def _model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("Add", ["x", "e"], ["xe"]),
        helper.make_node("MatMul", ["xe", "W"], ["h"]),
        helper.make_node("Gemm", ["h", "G"], ["g"], transB=1),
        helper.make_node("Add", ["g", "bias"], ["a"]),
        helper.make_node("MatMul", ["a", "small"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in ARRAYS.items()]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16]),
                              helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])], inits)


def _reference(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    a = {k: v.astype(np.float64) for k, v in ARRAYS.items()}
    h = (x + a["E"][ids]) @ a["W"]
    return (h @ a["G"].T + a["bias"]) @ a["small"]


def test_weights_their_views_and_consumers_are_found_and_the_model_is_unchanged():
    ctx = passkit.context(min_size=32)
    model = passkit.prepare(passkit.load(_model()), ctx)
    before = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph]
    model = passkit.find_weights(model, ctx)
    assert sorted(passkit.weight_names(ctx)) == ["E", "G", "W"]
    assert passkit.view_shapes(ctx)["W"] == (16, 12)
    assert passkit.view_shapes(ctx)["G"] == (12, 8)  # transB: K is the stored second axis
    assert passkit.weight_consumers(ctx)["G"][0].startswith("Gemm")
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph] == before
    x, ids = RNG.standard_normal((3, 16)).astype(np.float32), np.array([0, 9, 4])
    np.testing.assert_allclose(run(model, {"x": x, "ids": ids})[0], _reference(x, ids), rtol=1e-5, atol=1e-5)


def test_keep_fp_patterns_skip_a_weight_with_a_message():
    ctx = passkit.context(min_size=32, keep_fp=("G*",))
    passkit.find_weights(passkit.prepare(passkit.load(_model()), ctx), ctx)
    assert sorted(passkit.weight_names(ctx)) == ["E", "W"]
    assert any("'G'" in m and "--keep-fp" in m for m in passkit.messages(ctx))


def test_no_weight_at_all_is_an_unsupported_model():
    ctx = passkit.context(min_size=10_000)
    with pytest.raises(UnsupportedError, match="no quantizable weights"):
        passkit.find_weights(passkit.prepare(passkit.load(_model()), ctx), ctx)


def test_a_weight_reduced_along_one_element_stays_float_and_alone_is_refused_at_once():
    """A MatMul weight ``[1, N]`` (reduction length 1, issue 22's ``[1, 2^22]``): every block would be one weight
    with its own scale, so it is no weight (it took minutes to be refused over the budget); beside a real weight
    it stays float, alone the run is refused before any table is scored, naming why."""
    wide = numpy_helper.from_array(RNG.standard_normal((1, 4096)).astype(np.float32), "Wide")
    real = numpy_helper.from_array(RNG.standard_normal((16, 1)).astype(np.float32), "Real")
    model = make_model([helper.make_node("MatMul", ["x", "Real"], ["h"]),
                        helper.make_node("MatMul", ["h", "Wide"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4096])], [wide, real])
    ctx = passkit.context(min_size=16)
    passkit.find_weights(passkit.prepare(passkit.load(model), ctx), ctx)
    assert passkit.weight_names(ctx) == ["Real"]
    alone = make_model([helper.make_node("MatMul", ["x", "Wide"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 1])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4096])], [wide])
    ctx = passkit.context(min_size=16)
    with pytest.raises(UnsupportedError, match=r"1 read along an axis of one element \('Wide'"):
        passkit.find_weights(passkit.prepare(passkit.load(alone), ctx), ctx)
