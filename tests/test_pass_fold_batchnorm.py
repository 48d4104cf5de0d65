"""FoldBatchNormPass: an inference BatchNormalization after a Conv becomes part of the Conv's weight and bias; the
op types after the rewrite, the outputs against onnxruntime on the original, and the cases that must stay."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.passes.prepare import FoldBatchNormPass
from tests.conftest import make_model

C_IN, C_OUT = 4, 8


def _model(bias: bool = True, constants: bool = False, training: bool = False, extra_reader: str | None = None,
           group: int = 1) -> onnx.ModelProto:
    """x -> Conv(W[, b]) -> BatchNormalization -> Relu -> y; ``constants``: the four vectors as Constant nodes (as
    paddle2onnx writes them); ``extra_reader``: "conv" (the Conv output also a graph output) or "weight" (W read by
    a second Conv)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((C_OUT, C_IN // group, 3, 3)).astype(np.float32)
    vectors = {"scale": rng.uniform(0.5, 2, C_OUT), "shift": rng.standard_normal(C_OUT),
               "mean": rng.standard_normal(C_OUT), "var": rng.uniform(0.1, 3, C_OUT)}
    inits = [numpy_helper.from_array(w, "W")]
    nodes = []
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(C_OUT).astype(np.float32), "b"))
    for name, v in vectors.items():
        array = numpy_helper.from_array(v.astype(np.float32), name)
        if constants:
            nodes.append(helper.make_node("Constant", [], [name], value=array))
        else:
            inits.append(array)
    nodes += [helper.make_node("Conv", ["x", "W", *(["b"] if bias else [])], ["c"], pads=[1, 1, 1, 1], group=group),
              helper.make_node("BatchNormalization", ["c", "scale", "shift", "mean", "var"], ["n"], epsilon=1e-3,
                               **({"training_mode": 1} if training else {})),
              helper.make_node("Relu", ["n"], ["y"])]
    shape = ["b", C_OUT, 6, 6]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if extra_reader == "conv":
        outputs.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, shape))
    if extra_reader == "weight":
        nodes.append(helper.make_node("Conv", ["x", "W"], ["y2"], pads=[1, 1, 1, 1]))
        outputs.append(helper.make_tensor_value_info("y2", TensorProto.FLOAT, shape))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", C_IN, 6, 6])], outputs,
                      inits, opset=15 if training else 21)


def _run(proto: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # its own BN fusion off
    options.log_severity_level = 3
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})


def _fold(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, bool]:
    model = ir.serde.deserialize_model(proto)
    result = FoldBatchNormPass()(model)
    return ir.serde.serialize_model(result.model), result.modified


X = np.random.default_rng(1).standard_normal((2, C_IN, 6, 6)).astype(np.float32)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("constants", [False, True], ids=["initializers", "constant-nodes"])
def test_conv_batchnorm_folds_into_one_conv_with_the_same_outputs(bias, constants):
    proto = _model(bias=bias, constants=constants)
    folded, modified = _fold(proto)
    assert modified
    ops = collections.Counter(n.op_type for n in folded.graph.node)
    assert ops == {"Conv": 1, "Relu": 1}  # the BatchNormalization and its four Constants are gone
    assert {i.name for i in folded.graph.initializer} == {"W", "b" if bias else "W_bias"}
    np.testing.assert_allclose(_run(folded, X)[0], _run(proto, X)[0], rtol=1e-5, atol=1e-5)


def test_grouped_conv_folds_per_output_channel():
    proto = _model(group=C_IN)  # 4 groups of one input channel, 2 outputs each: W [8, 1, 3, 3]
    folded, modified = _fold(proto)
    assert modified
    np.testing.assert_allclose(_run(folded, X)[0], _run(proto, X)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["training", "conv-output-read", "weight-shared"])
def test_what_must_not_fold_is_left_as_it_is(case):
    proto = _model(training=case == "training", extra_reader={"conv-output-read": "conv",
                                                              "weight-shared": "weight"}.get(case))
    folded, modified = _fold(proto)
    assert not modified
    assert "BatchNormalization" in {n.op_type for n in folded.graph.node}


def test_optimize_folds_the_batchnorm_before_quantizing(tmp_path):
    """Through optimize: the written model has no BatchNormalization and its outputs stay close to FP32's."""
    proto = _model(constants=True)
    src = tmp_path / "bn.onnx"
    onnx.save(proto, src)
    result = bq_onnx.optimize(str(src), bits=8, bits_payload=True, min_size=16)
    out = tmp_path / "out.onnx"
    result.save(str(out), force=True)
    written = onnx.load(str(out))
    assert "BatchNormalization" not in {n.op_type for n in written.graph.node}
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    ref = _run(proto, X)[0]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_the_folded_vectors_are_no_credit_for_the_weights(tmp_path):
    """--bits counts what the weights store: the four vectors folding removed must not be spent on the weights.
    Counted against the folded model (its only other tensor the Conv bias), the output stays within the budget;
    counted as room, they (less the bias folding adds) would have bought the weights ~0.33 bits more here."""
    from bq_onnx.counting import count

    rng = np.random.default_rng(4)
    c_in, c_out = 32, 64
    w = (rng.standard_normal((c_out, c_in, 3, 3)) * 0.1).astype(np.float32)
    vectors = [rng.uniform(0.5, 2, c_out), rng.standard_normal(c_out), rng.standard_normal(c_out),
               rng.uniform(0.1, 3, c_out)]
    names = ["scale", "shift", "mean", "var"]
    proto = make_model(
        [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", *names], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", c_in, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", c_out, 8, 8])],
        [numpy_helper.from_array(w, "W"), *(numpy_helper.from_array(v.astype(np.float32), n)
                                            for v, n in zip(vectors, names))])
    src, out = tmp_path / "bn.onnx", tmp_path / "out.onnx"
    onnx.save(proto, src)
    report = bq_onnx.optimize(str(src), bits=4, format="compact").save(str(out), force=True)
    folded, _ = _fold(proto)
    assert count(str(out), folded).bits_per_weight <= 4.0
    counted = count(str(out), proto).bits_per_weight
    assert counted < 4.0 - 8 * 4 * (4 - 1) * c_out / w.size * 0.9  # the room of four vectors less the bias
    # the report says so, with the figure the count against the original file reads
    notes = [m for m in report["messages"] if m.startswith("folding BatchNormalization")]
    assert len(notes) == 1 and "bq-onnx inspect --reference" in notes[0]
    below = float(notes[0].split("reads about ")[1].split()[0])
    assert counted == pytest.approx(report["allocation"]["achieved_bits"] - below, abs=0.01)


def test_a_batchnorm_that_is_a_graph_output_folds_and_the_output_keeps_its_name():
    proto = _model()
    proto.graph.node.remove(proto.graph.node[-1])  # drop the Relu: the BatchNormalization's "n" is the output
    proto.graph.output[0].name = "n"
    folded, modified = _fold(proto)
    assert modified and [o.name for o in folded.graph.output] == ["n"]
    assert [n.op_type for n in folded.graph.node] == ["Conv"] and folded.graph.node[0].output[0] == "n"
    onnx.checker.check_model(folded)
    np.testing.assert_allclose(_run(folded, X)[0], _run(proto, X)[0], rtol=1e-5, atol=1e-5)
