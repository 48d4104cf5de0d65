"""Shared builders: tiny models made with onnx.helper, and runners pinned to exact precision."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
ALL_WIDTHS = tuple(range(9))
"""``allowed_bits`` with 0 and 1: they are opt-in (the default is 2..8); for tests about 0-bit blocks."""


def make_model(nodes, inputs, outputs, initializers, opset: int = 21, ir_version: int = 10) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def matmul_readout(w: np.ndarray, name: str = "W") -> onnx.ModelProto:
    """y = x @ W with x = I reads the decoded weight back exactly."""
    k, n = w.shape
    return make_model(
        [helper.make_node("MatMul", ["x", name], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])],
        [numpy_helper.from_array(w.astype(np.float32), name)],
    )


def mixed_model(seed: int = 0, opset: int = 18) -> onnx.ModelProto:
    """Embedding Gather, MatMul, Gemm(transB), Conv, ConvTranspose: every layout the rewrite knows."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((64, 40)).astype(np.float32)
    w2 = rng.standard_normal((24, 40)).astype(np.float32)
    conv = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    deconv = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    table = rng.standard_normal((50, 64)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("ReduceMean", ["e", "axes"], ["x"], keepdims=0),
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1),
        helper.make_node("Conv", ["img", "C"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("ConvTranspose", ["c", "D"], ["d"]),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 5]),
            helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 3, 6, 6]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 24]),
            helper.make_tensor_value_info("d", TensorProto.FLOAT, ["b", 4, 8, 8]),
        ],
        [
            numpy_helper.from_array(w1, "W1"),
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(conv, "C"),
            numpy_helper.from_array(deconv, "D"),
            numpy_helper.from_array(table, "E"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "axes"),
        ],
        opset=opset,
        ir_version=8,
    )


def ort_run(path, feeds: dict) -> list[np.ndarray]:
    from bq_onnx.runtimes import get_runtime

    return get_runtime("onnxruntime").session(path, exact=True).run(feeds)


@pytest.fixture
def lenet_path() -> Path:
    return MODELS / "lenet.onnx"


@pytest.fixture
def lenet_data() -> dict:
    with np.load(MODELS / "lenet_data.npz") as data:
        return {k: data[k] for k in data.files}


#: Integer codes a weight is stored in (``Cast`` of one is passes/fast_layout.py's decode).
INTEGER_CODE_TYPES = frozenset({onnx.TensorProto.INT2, onnx.TensorProto.UINT2, onnx.TensorProto.INT4,
                                onnx.TensorProto.UINT4, onnx.TensorProto.INT8, onnx.TensorProto.UINT8})


def assert_written(result, path, min_cosine: float = 0.9) -> None:
    """A saved model as a user gets it, which ``save()``'s own ``passed`` flag cannot show (it raises instead of
    returning False): the file stores its weights behind dequantize ops, runs in onnxruntime on the post-write
    check's first inputs, and each float output has the FP32 model's shape and a cosine to it of at least
    ``min_cosine``."""
    import onnx_ir as ir
    import onnxruntime as ort

    written = onnx.load(str(path))
    nodes = list(written.graph.node) + [n for f in written.functions for n in f.node]
    integer_codes = {t.name for t in written.graph.initializer if t.data_type in INTEGER_CODE_TYPES}
    assert any(n.op_type == "DequantizeLinear" or n.domain == "bq"
               or (n.op_type == "Cast" and n.input[0] in integer_codes)  # the fast layout's decode
               for n in nodes), "no weight stored quantized"
    src = result.source
    if isinstance(src, ir.Model):
        src = ir.serde.serialize_model(src)
    fp32 = src.SerializeToString() if isinstance(src, onnx.ModelProto) else str(src)
    feeds = result.sample_feeds()
    reference = ort.InferenceSession(fp32, providers=["CPUExecutionProvider"]).run(None, feeds)
    for ref, got in zip(reference, ort_run(path, feeds), strict=True):
        assert got.shape == ref.shape
        if np.issubdtype(ref.dtype, np.floating):
            a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
            cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))
            assert cosine >= min_cosine, cosine
