"""Structurally broken graphs and degenerate weights: one-line errors with documented codes, or correct output."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.cli import main
from tests.conftest import make_model
from tests.written import check_result


def _weights(k=16, n=8, seed=0):
    return numpy_helper.from_array(np.random.default_rng(seed).standard_normal((k, n)).astype(np.float32), "W")


def _io(k=16, n=8):
    return ([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])])


def _run(tmp_path, model: onnx.ModelProto, capsys, *extra):
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    out = tmp_path / "out.onnx"
    code = main(["optimize", str(src), "-o", str(out), "--min-size", "16", *extra])
    err = capsys.readouterr().err
    return code, err, out


def _broken(mutate) -> onnx.ModelProto:
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                       *_io(), [_weights()])
    mutate(model)
    return model


CASES = {
    "cycle": lambda m: (m.graph.node[0].input.__setitem__(0, "y")),
    "dangling input": lambda m: m.graph.node[1].input.__setitem__(0, "nowhere"),
    "duplicate output names": lambda m: m.graph.node[1].output.__setitem__(0, "h"),
    "unknown op": lambda m: setattr(m.graph.node[1], "op_type", "FrobnicateRelu"),
    "unknown domain": lambda m: setattr(m.graph.node[1], "domain", "com.example.secret"),
    "missing opset import": lambda m: m.ClearField("opset_import"),
    "opset newer than onnx knows": lambda m: setattr(m.opset_import[0], "version", 99),
}


@pytest.mark.parametrize("case", list(CASES))
def test_structurally_broken_graphs_are_one_line_errors(tmp_path, capsys, case):
    code, err, out = _run(tmp_path, _broken(CASES[case]), capsys)
    assert code in (3, 4), (case, code, err)
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["native", "compact"])
@pytest.mark.parametrize("quantizer", ["uniform", "uniform-sym", "nf", "lloyd", "gaussian", "percentile"])
def test_all_zero_weights_quantize_to_zero(tmp_path, fmt, quantizer):
    zero = numpy_helper.from_array(np.zeros((32, 8), np.float32), "W")
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], *_io(32), [zero])
    result = bq_onnx.optimize(model, bits=3, format=fmt, quantizer=quantizer, min_size=16, allocator="uniform")
    assert np.array_equal(result.context.quantized["W"].dequantize(), np.zeros((32, 8), np.float32))
    report = result.save(tmp_path / "z.onnx")
    check_result(result, tmp_path / "z.onnx", report, float_rtol=1e-4)  # the float outputs: exactly zero


def test_zero_size_weights_are_not_weights(tmp_path, capsys):
    empty = numpy_helper.from_array(np.zeros((0, 8), np.float32), "W")
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 0])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [empty])
    code, err, out = _run(tmp_path, model, capsys)
    assert code == 4 and "no quantizable weights" in err and not out.exists()


def test_fully_dynamic_shapes_quantize_and_verify(tmp_path, capsys):
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "k"])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], [_weights(24, 8)])
    code, err, out = _run(tmp_path, model, capsys, "--bits", "4", "--bits-payload")  # 192 weights: grid bits
    assert code == 0, err
    assert out.exists()
