"""FastLayoutPass: what onnxruntime runs from the default output (the layout, not timings: those are
benchmarks/output_speed.md) and that the arithmetic decode gives the DequantizeLinear's numbers exactly."""

from __future__ import annotations

import collections
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.passes.fast_layout import FastLayoutPass
from tests.conftest import MODELS


def _ort_ops(path: Path, tmp_path: Path) -> collections.Counter:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


def _run(path: Path, feeds: dict, optimize: bool = True) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact: float activations
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, feeds)


def _relu_mlp(path: Path, width: int = 128, layers: int = 3, bias: bool = False) -> Path:
    """MatMul -> Relu layers; with ``bias``, MatMul -> Add -> Relu (a torch Linear exported as MatMul + Add)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / 8).astype(np.float32), f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        if bias:
            inits.append(numpy_helper.from_array(rng.standard_normal(width).astype(np.float32) / 10, f"b{i}"))
            nodes.append(helper.make_node("Add", [f"h{i}", f"b{i}"], [f"a{i}"]))
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
        else:
            nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_default_output_has_no_dequantize_left_in_onnxruntime_conv_model(tmp_path):
    out = tmp_path / "lenet.bq.onnx"
    bq_onnx.optimize(MODELS / "lenet.onnx", bits=4, allocator="uniform").save(out)
    written = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert written["DequantizeLinear"] == 0 and written["Conv"] == 2  # Conv/Gemm weights: foldable arithmetic
    ran = _ort_ops(out, tmp_path)
    assert "DequantizeLinear" not in ran and "Cast" not in ran and "Mul" not in ran, ran  # folded at creation


def test_relu_between_matmuls_keeps_every_matmulnbits_fusion(tmp_path):
    src = _relu_mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.bq.onnx"
    bq_onnx.optimize(src, bits=4, allocator="uniform").save(out)
    written = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert written["DequantizeLinear"] == 3 and written["Max"] == 2 and written["Relu"] == 1, written
    ran = _ort_ops(out, tmp_path)
    assert ran["MatMulNBits"] == 3 and "DequantizeLinear" not in ran, ran
    x = {"x": np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)}
    # Max(x, 0) is Relu: the unfused (no graph optimization) run equals the fused one up to the kernel's rounding
    np.testing.assert_allclose(_run(out, x)[0], _run(out, x, optimize=False)[0], rtol=1e-4, atol=1e-4)


def test_a_bias_between_matmul_and_relu_keeps_the_fusion(tmp_path):
    """MatMul -> Add(bias) -> Relu -> MatMul: onnxruntime fused MatMul + Add + Relu into a float FusedGemm first and
    left the DequantizeLinear running on every call (digits_mlp 4.46x FP32); the Relu written as Max keeps
    MatMulNBits."""
    src = _relu_mlp(tmp_path / "mlp.onnx", bias=True)
    out = tmp_path / "mlp.bq.onnx"
    bq_onnx.optimize(src, bits=4, allocator="uniform").save(out)
    written = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    assert written["Max"] == 2 and written["Relu"] == 1, written
    ran = _ort_ops(out, tmp_path)
    assert ran["MatMulNBits"] == 3 and "DequantizeLinear" not in ran, ran
    x = {"x": np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)}
    np.testing.assert_allclose(_run(out, x)[0], _run(out, x, optimize=False)[0], rtol=1e-4, atol=1e-4)


def test_arithmetic_decode_equals_dequantize_linear_bit_for_bit(tmp_path):
    """Blocked (axis 0), per-axis (axis 1 and axis 0) and per-tensor DequantizeLinear feeding Gemm/Conv/Add."""
    rng = np.random.default_rng(2)
    codes_b = rng.integers(0, 16, (64, 8)).astype(ml_dtypes.uint4)
    zero_b = rng.integers(0, 16, (2, 8)).astype(ml_dtypes.uint4)
    scale_b = rng.uniform(0.01, 0.1, (2, 8)).astype(np.float16)
    codes_a = rng.integers(-128, 128, (8, 4, 3, 3)).astype(np.int8)
    scale_a = rng.uniform(0.01, 0.1, (8,)).astype(np.float32)
    codes_t = rng.integers(-8, 8, (8,)).astype(ml_dtypes.int4)
    inits = [numpy_helper.from_array(np.asarray(a), n) for a, n in (
        (codes_b, "cb"), (zero_b, "zb"), (scale_b, "sb"), (codes_a, "ca"), (scale_a, "sa"), (codes_t, "ct"),
        (np.array(0.5, np.float32), "st"))]
    nodes = [
        helper.make_node("Cast", ["sb"], ["sbf"], to=TensorProto.FLOAT),
        helper.make_node("DequantizeLinear", ["cb", "sbf", "zb"], ["wb"], axis=0, block_size=32),
        helper.make_node("Gemm", ["v", "wb"], ["yb"]),
        helper.make_node("DequantizeLinear", ["ca", "sa"], ["wa"], axis=0),
        helper.make_node("Conv", ["img", "wa"], ["ya"]),
        helper.make_node("DequantizeLinear", ["ct", "st"], ["wt"]),
        helper.make_node("Add", ["yb", "wt"], ["yt"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("v", TensorProto.FLOAT, [2, 64]),
                                           helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 4, 5, 5])],
                              [helper.make_tensor_value_info("yt", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("ya", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    onnx.save(proto, str(tmp_path / "dq.onnx"))
    model = ir.serde.deserialize_model(proto)
    assert FastLayoutPass()(model).modified
    assert not [n for n in model.graph if n.op_type == "DequantizeLinear"]
    onnx.save(ir.serde.serialize_model(model), str(tmp_path / "arith.onnx"))
    feeds = {"v": rng.standard_normal((2, 64)).astype(np.float32),
             "img": rng.standard_normal((1, 4, 5, 5)).astype(np.float32)}
    for a, b in zip(_run(tmp_path / "dq.onnx", feeds, optimize=False), _run(tmp_path / "arith.onnx", feeds,
                                                                           optimize=False), strict=True):
        np.testing.assert_array_equal(a, b)
    assert "DequantizeLinear" not in _ort_ops(tmp_path / "arith.onnx", tmp_path)
