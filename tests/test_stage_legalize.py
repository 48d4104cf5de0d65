"""legalize_weights (bq_onnx/targets.py): weights a target cannot run in int4 get an int8 floor, per channel."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests import passkit
from tests.conftest import make_model
from tests.written import run, with_weights

RNG = np.random.default_rng(6)
ARRAYS = {
    "C": RNG.standard_normal((8, 3, 3, 3)).astype(np.float32),  # Conv: TensorRT runs int4 only into MatMul/Gemm
    "W": RNG.standard_normal((128, 32)).astype(np.float32),  # MatMul, two blocks of 64, even N: stays int4
    "O": RNG.standard_normal((32, 7)).astype(np.float32),  # odd last dimension, and fewer rows than a block
}


def _model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["img", "C"], ["c"]),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("MatMul", ["f", "W"], ["h"]),
        helper.make_node("MatMul", ["h", "O"], ["y"]),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("img", TensorProto.FLOAT, [2, 3, 6, 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7])],
                      [numpy_helper.from_array(v, k) for k, v in ARRAYS.items()])


def _legalized(target: str):
    ctx = passkit.context(bits=4, group_size=64, min_size=100, format="native")
    model = passkit.find_weights(passkit.prepare(passkit.load(_model()), ctx), ctx)
    ops = [n.op_type for n in model.graph]
    model = passkit.legalize_weights(model, ctx, target)
    assert [n.op_type for n in model.graph] == ops  # only the context changes
    return model, ctx


def test_tensorrt_floors_conv_and_odd_weights_at_int8_per_channel():
    model, ctx = _legalized("tensorrt")
    assert passkit.weight_floors(ctx) == {"C": 5, "O": 5}
    assert passkit.weight_groups(ctx) == {"C": 0, "O": 0}
    notes = " ".join(passkit.messages(ctx))
    assert "consumed by Conv" in notes and "odd last dimension 7" in notes
    model = passkit.rewrite(passkit.quantize_weights(model, ctx), ctx)
    dq = {n.outputs[0].name.split(".bq/")[0]: n for n in model.graph if n.op_type == "DequantizeLinear"}
    assert set(dq) == {"C", "O", "W"}
    for name in ("C", "O"):  # int8 container, one scale per output channel
        assert dq[name].inputs[0].const_value.dtype.itemsize == 1 and "block_size" not in dq[name].attributes
    assert dq["W"].attributes["block_size"].value == 64 and dq["W"].inputs[0].const_value.dtype.bitwidth == 4
    img = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    expected = run(with_weights(_model(), passkit.dequantized(ctx)), {"img": img})[0]
    np.testing.assert_allclose(run(model, {"img": img})[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_targets_that_run_any_int4_weight_add_no_floor():
    _, ctx = _legalized("openvino")
    assert passkit.weight_floors(ctx) == {} and passkit.weight_groups(ctx) == {}
