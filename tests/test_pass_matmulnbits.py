"""LowerMatMulNBitsPass (passes/matmulnbits.py): blocked 4-bit DequantizeLinear + MatMul -> MatMulNBits, same numbers.

The end-to-end ``--target onnxruntime`` path is tests/test_matmulnbits.py; this runs the pass alone on a graph
built here, so the packing (nibble order, odd block counts, signed codes) is checked against numpy directly.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests import passkit
from tests.conftest import make_model
from tests.written import run

N = 16


def _dq_matmul(k: int, g: int, *, signed: bool = False, zero_point: bool = True, codes_type=None,
               consumers: int = 1, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray]:
    """``y = x @ DequantizeLinear(codes, scale, [zp], axis=0, block_size=g)`` and its weight in float64."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // g)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = rng.integers(lo, hi, size=(k, N))
    scale = rng.uniform(0.01, 0.1, size=(blocks, N)).astype(np.float32)
    zp = rng.integers(lo, hi, size=(blocks, N)) if zero_point else np.zeros((blocks, N), np.int64)
    ctype = codes_type or (TensorProto.INT4 if signed else TensorProto.UINT4)
    inits = [helper.make_tensor("codes", ctype, [k, N], codes.flatten().tolist()),
             helper.make_tensor("scale", TensorProto.FLOAT, [blocks, N], scale.flatten().tolist())]
    if zero_point:
        inits.append(helper.make_tensor("zp", ctype, [blocks, N], zp.flatten().tolist()))
    nodes = [helper.make_node("DequantizeLinear", [i.name for i in inits], ["w"], axis=0, block_size=g)]
    outputs = []
    for i in range(consumers):
        nodes.append(helper.make_node("MatMul", ["x", "w"], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, ["b", N]))
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])], outputs, inits)
    rows = np.arange(k) // g
    return model, (codes - zp[rows]).astype(np.float64) * scale[rows].astype(np.float64)


@pytest.mark.parametrize(("k", "g", "signed", "zero_point"), [
    (96, 32, False, True),  # three blocks: an odd count pads the packed zero points
    (64, 16, False, False),  # unsigned without zero point: zp 0
    (64, 32, True, False),  # signed codes: stored as unsigned with zero point 8
])
def test_blocked_4bit_pairs_are_lowered_with_the_same_numbers(k, g, signed, zero_point):
    proto, w = _dq_matmul(k, g, signed=signed, zero_point=zero_point)
    model, modified = passkit.lower_matmulnbits(passkit.load(proto))
    assert modified and [n.op_type for n in model.graph] == ["MatMulNBits"]
    node = model.graph[0]
    assert node.domain == "com.microsoft" and model.opset_imports["com.microsoft"] == 1
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size")} == {
        "K": k, "N": N, "bits": 4, "block_size": g}
    assert not {"codes", "scale", "zp"} & set(model.graph.initializers)
    assert [v.name for v in model.graph.outputs] == ["y0"]
    x = np.random.default_rng(1).standard_normal((3, k)).astype(np.float32)
    expected = x.astype(np.float64) @ w
    np.testing.assert_allclose(run(model, {"x": x})[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("case", ["int8 codes", "block 8", "two consumers", "ragged K"])
def test_pairs_matmulnbits_cannot_take_are_left_alone(case):
    proto, _ = {
        "int8 codes": lambda: _dq_matmul(64, 32, codes_type=TensorProto.UINT8),
        "block 8": lambda: _dq_matmul(64, 8),
        "two consumers": lambda: _dq_matmul(64, 32, consumers=2),
        "ragged K": lambda: _dq_matmul(40, 16),
    }[case]()
    before = [n.op_type for n in proto.graph.node]
    model, modified = passkit.lower_matmulnbits(passkit.load(proto))
    assert not modified and [n.op_type for n in model.graph] == before
