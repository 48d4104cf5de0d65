"""SplitMatMulPass and the native rewrite's column chunks: a weight decoded in pieces feeds one MatMul per piece
(each fused into MatMulNBits by onnxruntime), with the same outputs."""

from __future__ import annotations

import collections
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.passes import split_matmul
from bq_onnx.passes.rewrite_native import RewriteNativePass
from bq_onnx.passes.split_matmul import SplitMatMulPass

K, N1, N2 = 64, 48, 80


def _session(path: Path, optimized: Path | None = None, optimize: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")  # exact: float activations
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _pieces_model(path: Path, constant: bool = True) -> Path:
    """y = x @ Concat(DQ(int4 piece 1), DQ(int4 piece 2), axis=1): a graph output straight from the MatMul. With
    ``constant=False`` the second piece is an activation (x's first columns tiled), which must not be split."""
    rng = np.random.default_rng(0)
    inits, nodes, parts = [], [], []
    for i, n in enumerate((N1, N2)):
        codes = rng.integers(0, 16, (K, n)).astype(ml_dtypes.uint4)
        inits += [helper.make_tensor(f"c{i}", TensorProto.UINT4, (K, n), codes.astype(np.uint8).flatten().tolist()),
                  numpy_helper.from_array(rng.uniform(0.01, 0.1, (K // 32, n)).astype(np.float32), f"s{i}"),
                  helper.make_tensor(f"z{i}", TensorProto.UINT4, (K // 32, n), [8] * (K // 32 * n))]
        nodes.append(helper.make_node("DequantizeLinear", [f"c{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=0,
                                      block_size=32))
        parts.append(f"w{i}")
    if not constant:
        nodes.append(helper.make_node("Slice", ["x", "start", "stop", "axes"], ["xs"]))
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for v, n in (([0], "start"), ([K], "stop"),
                                                                                 ([1], "axes"))]
        nodes.append(helper.make_node("Transpose", ["xs"], ["xt"], perm=[1, 0]))
        parts[1] = "xt"
    nodes += [helper.make_node("Concat", parts, ["w"], axis=1), helper.make_node("MatMul", ["x", "w"], ["y"])]
    n_out = N1 + N2 if constant else None
    graph = helper.make_graph(nodes, "pieces", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, n_out])], inits,
                              value_info=[helper.make_tensor_value_info("w", TensorProto.FLOAT, [K, n_out])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def _apply(src: Path, dst: Path) -> collections.Counter:
    model = ir.load(str(src))
    SplitMatMulPass()(model)
    ir.save(model, str(dst))
    return collections.Counter(n.op_type for n in onnx.load(str(dst)).graph.node)


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(split_matmul, "MIN_PIECE_ELEMENTS", 1)  # the tiny test weights count as large


def test_a_matmul_on_decoded_pieces_becomes_one_matmul_per_piece(tmp_path, small_pieces):
    src = _pieces_model(tmp_path / "pieces.onnx")
    ops = _apply(src, tmp_path / "split.onnx")
    assert ops["MatMul"] == 2 and ops["Concat"] == 1 and ops["DequantizeLinear"] == 2
    split = onnx.load(str(tmp_path / "split.onnx")).graph
    concat = next(n for n in split.node if n.op_type == "Concat")
    assert [n.op_type for n in split.node if n.output[0] in concat.input] == ["MatMul", "MatMul"]
    assert concat.output[0] == "y" == split.output[0].name  # the graph output keeps its name
    x = np.random.default_rng(1).standard_normal((K, K)).astype(np.float32)
    want = _session(src, optimize=False).run(None, {"x": x})[0]
    got = _session(tmp_path / "split.onnx", tmp_path / "opt.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ran = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ran["MatMulNBits"] == 2 and "DequantizeLinear" not in ran, ran  # each piece fused


def test_activations_and_small_pieces_are_left_alone(tmp_path, monkeypatch):
    src = _pieces_model(tmp_path / "pieces.onnx")
    assert _apply(src, tmp_path / "kept.onnx")["MatMul"] == 1  # default threshold: pieces of ~3,000 elements
    monkeypatch.setattr(split_matmul, "MIN_PIECE_ELEMENTS", 1)
    mixed = _pieces_model(tmp_path / "mixed.onnx", constant=False)
    assert _apply(mixed, tmp_path / "mixed_out.onnx")["MatMul"] == 1  # one piece is an activation


def _mlp(path: Path, width: int = 128) -> Path:
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((width, width)) / 8).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", width])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def test_a_weight_over_the_dequantize_limit_is_written_in_column_chunks(tmp_path, monkeypatch, small_pieces):
    """onnxruntime refuses a 2^31-element blockwise DequantizeLinear into MatMul; the limit lowered to 4,096
    codes, a 128x128 weight is written as 4 chunks of 32 columns, each fused, the outputs exactly the reference's."""
    monkeypatch.setattr(RewriteNativePass, "max_dq_elements", 4096)
    src = _mlp(tmp_path / "mlp.onnx")
    out = tmp_path / "mlp.bq.onnx"
    result = bq_onnx.optimize(src, bits=4, allocator="uniform")
    result.save(out)
    graph = onnx.load(str(out)).graph
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 4
    codes = {i.name: i for i in graph.initializer}
    assert all(tuple(codes[n.input[0]].dims) == (128, 32) for n in dqs)
    x = np.random.default_rng(2).standard_normal((3, 128)).astype(np.float32)
    got = _session(out, tmp_path / "opt.onnx").run(None, {"x": x})[0]
    w = result.context.quantized["w"].dequantize()
    np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)
    ran = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ran["MatMulNBits"] == 4 and "DequantizeLinear" not in ran, ran
    assert result.report["totals"]["stored_bits_per_weight"] <= 5.0
