"""quantize_weights (bq_onnx/stages/quantize.py): every weight gets a quantized form of the asked width."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import passkit
from tests.conftest import make_model
from tests.written import run, with_weights

RNG = np.random.default_rng(2)
W = RNG.standard_normal((64, 24)).astype(np.float32)
G = RNG.standard_normal((16, 24)).astype(np.float32)  # Gemm transB: view (24, 16)
MODEL = make_model(
    [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Gemm", ["h", "G"], ["y"], transB=1)],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
    [numpy_helper.from_array(W, "W"), numpy_helper.from_array(G, "G")],
)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_block_holds_at_most_two_to_the_bits_levels_within_one_step(bits):
    ctx = passkit.context(bits=bits, group_size=16, min_size=32)
    model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), ctx), ctx)
    ops = [n.op_type for n in model.graph]
    model = passkit.quantize_weights(model, ctx)
    assert [n.op_type for n in model.graph] == ops and set(model.graph.initializers) == {"W", "G"}
    deq = passkit.dequantized(ctx)
    assert set(deq) == {"W", "G"} and deq["W"].shape == W.shape and deq["G"].shape == G.shape
    view = deq["W"].reshape(4, 16, 24)  # blocks of 16 rows along K, per output column
    assert max(len(np.unique(view[b, :, c])) for b in range(4) for c in range(24)) <= 2**bits
    step = (W.max() - W.min()) / (2**bits - 1)
    assert np.abs(deq["W"] - W).max() <= step  # within one grid step of the whole tensor's range
    x = RNG.standard_normal((5, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ deq["W"].astype(np.float64) @ deq["G"].astype(np.float64).T
    np.testing.assert_allclose(run(with_weights(model, deq), {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
