"""What the IR passes promise: which tensors are weights, constants promoted, sharing, opsets, layouts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.errors import UnsupportedError
from bq_onnx.runtimes import get_runtime
from bq_onnx.samples import random_feeds
from bq_onnx.verify import reference_model
from tests.conftest import make_model, mixed_model, ort_run
from tests.written import check_result, quantization_rtol


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("fmt", ["native", "compact"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_every_layout_matches_reference_in_both_runtimes(tmp_path, fmt, bits):
    """Gather table, MatMul, Gemm(transB), Conv and ConvTranspose weights, opset 18 input raised to 21."""
    result = bq_onnx.optimize(mixed_model(), bits=bits, format=fmt, min_size=64, bits_payload=True)
    assert sorted(r["name"] for r in result.report["layers"]) == ["C", "D", "E", "W1", "W2"]
    out = tmp_path / "m.onnx"
    report = result.save(out)  # built-in verification in onnxruntime
    check_result(result, out, report, ops=["DequantizeLinear"] if fmt == "native" else [],
                 domain="bq" if fmt == "compact" else None, float_rtol=quantization_rtol(bits))
    saved = onnx.load(str(out))
    assert saved.opset_import[0].version >= 21 and saved.ir_version == 10
    feeds = random_feeds(result.model, seed=3)
    ref_path = tmp_path / "ref.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(_ref_proto(result)), str(ref_path))
    expected = ort_run(ref_path, feeds)
    for runtime in ("onnxruntime", "openvino"):
        got = get_runtime(runtime).session(out, exact=True).run(feeds)
        for e, g in zip(expected, got):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-4 * np.abs(e).max())


def _ref_proto(result) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.serde.serialize_model(reference_model(result.source, result.context))


def test_native_matmul_uses_dequantize_linear_and_fuses_in_onnxruntime(tmp_path):
    w = np.random.default_rng(0).standard_normal((128, 64)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        [numpy_helper.from_array(w, "W")],
    )
    out = tmp_path / "n.onnx"
    bq_onnx.optimize(model, bits=4, group_size=32, bits_payload=True).save(out)
    assert _ops(out) == ["Cast", "DequantizeLinear", "MatMul"]  # the fp16 scales cast to float, then the decode
    dq = onnx.load(str(out)).graph.node[1]
    assert {a.name: helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 32}
    codes = next(t for t in onnx.load(str(out)).graph.initializer if t.name == "W.bq_codes")
    assert codes.data_type == TensorProto.UINT4


def test_constant_node_weights_are_promoted_and_quantized(tmp_path):
    w = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
            helper.make_node("MatMul", ["x", "W"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
        [],
    )
    result = bq_onnx.optimize(model, bits=4, min_size=16, bits_payload=True)
    assert [r["name"] for r in result.report["layers"]] == ["W"]
    out = tmp_path / "c.onnx"
    result.save(out)
    assert "Constant" not in _ops(out)


def test_shared_initializer_is_quantized_once(tmp_path):
    w = np.random.default_rng(2).standard_normal((24, 24)).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 24])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 24])],
        [numpy_helper.from_array(w, "W")],
    )
    out = tmp_path / "s.onnx"
    result = bq_onnx.optimize(model, bits=4, min_size=16, bits_payload=True)
    result.save(out)
    names = [t.name for t in onnx.load(str(out)).graph.initializer]
    assert names.count("W.bq_codes") == 1 and "W" not in names
    # one decode: W feeds two MatMuls, which onnxruntime does not fuse, so it is the foldable arithmetic
    # (passes/fast_layout.py): one Mul, no DequantizeLinear
    assert _ops(out).count("DequantizeLinear") + _ops(out).count("Mul") == 1


def test_biases_norms_integers_and_small_tensors_stay(tmp_path):
    rng = np.random.default_rng(3)
    model = make_model(
        [
            helper.make_node("Gemm", ["x", "W", "bias"], ["h"], transB=1),
            helper.make_node("LayerNormalization", ["h", "gamma", "beta"], ["n"], axis=-1),
            helper.make_node("MatMul", ["n", "small"], ["m"]),
            helper.make_node("Reshape", ["m", "shape"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [
            numpy_helper.from_array(rng.standard_normal((200, 300)).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(200).astype(np.float32), "bias"),
            numpy_helper.from_array(rng.standard_normal(200).astype(np.float32), "gamma"),
            numpy_helper.from_array(rng.standard_normal(200).astype(np.float32), "beta"),
            numpy_helper.from_array(rng.standard_normal((200, 4)).astype(np.float32), "small"),
            numpy_helper.from_array(np.array([2, 4], dtype=np.int64), "shape"),
        ],
    )
    result = bq_onnx.optimize(model, bits=6, min_size=1000)
    assert [r["name"] for r in result.report["layers"]] == ["W"]
    out = tmp_path / "b.onnx"
    result.save(out)
    kept = {t.name for t in onnx.load(str(out)).graph.initializer}
    assert {"bias", "gamma", "beta", "small", "shape"} <= kept


def test_already_quantized_weights_are_left_alone_with_a_message():
    rng = np.random.default_rng(4)
    q = rng.integers(-8, 8, size=(32, 16)).astype(np.int8)
    float_w = rng.standard_normal((16, 8)).astype(np.float32)
    nodes = [
        helper.make_node("DequantizeLinear", ["Wq", "s"], ["Wd"], axis=1),
        helper.make_node("MatMul", ["x", "Wd"], ["h"]),
        helper.make_node("MatMul", ["h", "F"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(q, "Wq"),
        numpy_helper.from_array(np.full(16, 0.1, np.float32), "s"),
        numpy_helper.from_array(float_w, "F"),
    ]
    io = (
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
    )
    result = bq_onnx.optimize(make_model(nodes, *io, inits), bits=4, bits_payload=True, min_size=16)  # 128 weights
    assert [r["name"] for r in result.report["layers"]] == ["F"]
    assert any("already contains quantized ops (1 DequantizeLinear)" in m for m in result.report["messages"])
    with pytest.raises(UnsupportedError, match="looks quantized already"):
        bq_onnx.optimize(make_model(nodes[:2], io[0], [helper.make_tensor_value_info("h", 1, ["b", 16])],
                                    inits[:2]), bits=4, min_size=16)


def test_fp16_weights_decode_to_fp16(tmp_path):
    w = np.random.default_rng(5).standard_normal((64, 32)).astype(np.float16)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", 32])],
        [numpy_helper.from_array(w, "W")],
    )
    for fmt in ("native", "compact"):
        out = tmp_path / f"h-{fmt}.onnx"
        # payload bits: a stored 4-bit budget cannot hold this small weight's codes and their metadata
        bq_onnx.optimize(model, bits=4, bits_payload=True, format=fmt).save(out)
        assert _ops(out)[-2:] == ["Cast", "MatMul"]


def test_input_model_object_is_not_modified():
    import onnx_ir as ir

    proto = mixed_model()
    before = proto.SerializeToString()
    bq_onnx.optimize(proto, bits=6)
    assert proto.SerializeToString() == before
    model = ir.serde.deserialize_model(mixed_model())
    bq_onnx.optimize(model, bits=6)
    assert "W1" in model.graph.initializers and model.graph.initializers["W1"].dtype == ir.DataType.FLOAT


@pytest.mark.parametrize("fmt", ["native", "compact"])
def test_grouped_and_depthwise_convolutions(tmp_path, fmt):
    """Depthwise Conv (group = channels), grouped Conv and grouped ConvTranspose weights, both runtimes."""
    rng = np.random.default_rng(6)
    depthwise = rng.standard_normal((8, 1, 3, 3)).astype(np.float32)
    grouped = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    deconv = rng.standard_normal((16, 4, 2, 2)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["img", "DW"], ["a"], group=8, pads=[1, 1, 1, 1]),
            helper.make_node("Conv", ["a", "G"], ["b"], group=2),
            helper.make_node("ConvTranspose", ["b", "T"], ["y"], group=2, strides=[2, 2]),
        ],
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 8, 7, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8, 10, 10])],
        [numpy_helper.from_array(depthwise, "DW"), numpy_helper.from_array(grouped, "G"),
         numpy_helper.from_array(deconv, "T")],
    )
    result = bq_onnx.optimize(model, bits=4, format=fmt, min_size=64, allocator="uniform")
    assert sorted(r["name"] for r in result.report["layers"]) == ["DW", "G", "T"]
    out = tmp_path / "c.onnx"
    report = result.save(out)  # native Conv weights: the foldable arithmetic decode (passes/fast_layout.py)
    check_result(result, out, report, ops=["Cast", "Mul"] if fmt == "native" else [],
                 domain="bq" if fmt == "compact" else None, float_rtol=quantization_rtol(4))
    x = np.random.default_rng(7).standard_normal((2, 8, 7, 7)).astype(np.float32)
    a = get_runtime("onnxruntime").session(out).run({"img": x})[0]
    b = get_runtime("openvino").session(out).run({"img": x})[0]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4 * np.abs(a).max())
