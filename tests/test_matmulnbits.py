"""--target onnxruntime lowers 4-bit DequantizeLinear+MatMul to com.microsoft.MatMulNBits, numbers unchanged."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.model_io import save_model
from bq_onnx.runtimes import get_runtime
from bq_onnx.verify import reference_model
from tests.conftest import make_model


def _mlp(k: int, widths: list[int]) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits, x, rows = [], [], "x", k
    for i, n in enumerate(widths):
        inits.append(numpy_helper.from_array((rng.standard_normal((rows, n)) / np.sqrt(rows)).astype(np.float32),
                                             f"W{i}"))
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"h{i}"]), helper.make_node("Relu", [f"h{i}"], [f"r{i}"])]
        x, rows = f"r{i}", n
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                      [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", rows])], inits)


@pytest.mark.parametrize("quantizer", ["uniform", "uniform-sym"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_every_matmul_is_lowered_and_matches_the_reference(tmp_path, quantizer, bits):
    model = _mlp(96, [64, 64, 32])  # 96 / 32 = 3 blocks: an odd count pads the packed zero points
    result = bq_onnx.optimize(model, bits=bits, quantizer=quantizer, allocator="uniform", target="onnxruntime")
    out = tmp_path / "q.onnx"
    result.save(out)
    ops = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert ops["MatMulNBits"] == 3 and "DequantizeLinear" not in ops and "MatMul" not in ops
    ref = tmp_path / "ref.onnx"
    save_model(reference_model(result.source, result.context), ref)
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    expected = get_runtime("onnxruntime").session(ref).run({"x": x})[0]
    got = get_runtime("onnxruntime").session(out, exact=True).run({"x": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_only_blocked_4bit_matmul_weights_are_lowered(tmp_path):
    """Ragged K (whole blocks + a per-axis tail, concatenated), 8-bit containers and per-channel blocks stay
    standard DequantizeLinear."""
    model = _mlp(40, [16, 24])  # K = 40 is ragged at group 32; the second layer K = 16 is one block
    result = bq_onnx.optimize(model, bits=4, allocator="uniform", target="onnxruntime")
    result.save(tmp_path / "a.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "a.onnx")).graph.node)
    # three decodes, DequantizeLinear where onnxruntime fuses it, else its arithmetic (passes/fast_layout.py)
    assert "MatMulNBits" not in ops and ops["DequantizeLinear"] + ops["Mul"] == 3
    eight = bq_onnx.optimize(_mlp(64, [32]), bits=8, allocator="uniform", target="onnxruntime")
    eight.save(tmp_path / "b.onnx")
    assert "MatMulNBits" not in {n.op_type for n in onnx.load(str(tmp_path / "b.onnx")).graph.node}
