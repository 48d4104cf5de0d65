"""Weights read through layout ops (``bq_onnx.chains``): a linear layer stored ``[N, K]`` and transposed before its
MatMul, PyTorch's LSTM export that slices ``weight_ih``/``weight_hh`` into gates, re-concatenates and unsqueezes
them (silero-vad), and a weight reshaped before its MatMul. Each is quantized along its final consumer's layout
(or as a plain ``(K, N)`` tensor behind a Reshape), the chain keeps reading the decoded tensor, and onnxruntime and
OpenVINO match the numpy-dequantized reference in both formats."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.stages.weights import survey
from tests import passkit
from tests.conftest import make_model
from tests.test_every_weight import FORMATS, _check, _floats, _w

HIDDEN, FEATURES = 16, 24


def _ints(name: str, values: list[int]) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(values, np.int64), name)


def transposed_model() -> onnx.ModelProto:
    """``y = x @ transpose(Wt)`` with ``Wt [N 16, K 32]``: K is Wt's axis 1."""
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], name="t", perm=[1, 0]),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])],
                      [numpy_helper.from_array(_w(16, 32), "Wt")])


def gate_sliced_lstm_model() -> onnx.ModelProto:
    """PyTorch's LSTM export: ``w_ih [4H, I]`` / ``w_hh [4H, H]`` cut into gates (i, f, g, o), re-concatenated in
    ONNX's order (i, o, f, g) and unsqueezed to ``[1, 4H, .]`` before the LSTM."""
    nodes, inits = [], []
    for name, width in (("w_ih", FEATURES), ("w_hh", HIDDEN)):
        inits.append(numpy_helper.from_array(_w(4 * HIDDEN, width), name))
        parts = []
        for i, (lo, hi) in enumerate(((0, HIDDEN), (3 * HIDDEN, 4 * HIDDEN), (HIDDEN, 3 * HIDDEN))):
            inits += [_ints(f"{name}_lo{i}", [lo]), _ints(f"{name}_hi{i}", [hi])]
            nodes.append(helper.make_node("Slice", [name, f"{name}_lo{i}", f"{name}_hi{i}", "axis0"],
                                          [f"{name}_s{i}"], name=f"{name}_slice{i}"))
            parts.append(f"{name}_s{i}")
        nodes += [helper.make_node("Concat", parts, [f"{name}_cat"], name=f"{name}_concat", axis=0),
                  helper.make_node("Unsqueeze", [f"{name}_cat", "axis0"], [f"{name}_3d"], name=f"{name}_unsq")]
    inits.append(_ints("axis0", [0]))
    nodes.append(helper.make_node("LSTM", ["x", "w_ih_3d", "w_hh_3d"], ["y", "y_h"], name="rnn", hidden_size=HIDDEN))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, FEATURES])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 1, 2, HIDDEN]),
                       helper.make_tensor_value_info("y_h", TensorProto.FLOAT, [1, 2, HIDDEN])], inits)


def reshaped_model() -> onnx.ModelProto:
    """``Wr [32, 16]`` reshaped to ``[16, 32]`` before its MatMul: the axis mapping is lost, the chain only changes
    the shape, so Wr is taken as a plain ``(K, N)`` tensor."""
    nodes = [helper.make_node("Reshape", ["Wr", "shape"], ["W"], name="r"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                      [numpy_helper.from_array(_w(32, 16), "Wr"), _ints("shape", [16, 32])])


def expanded_model() -> onnx.ModelProto:
    """A shared weight ``We [32, 16]`` broadcast to ``[b, 32, 16]`` for a batched MatMul (K: We's axis 0), and
    ``Wt [16, 16]`` tiled to ``[32, 16]`` before a MatMul (K: its axis 0, each row repeated)."""
    nodes = [helper.make_node("Shape", ["x"], ["xs"], name="s"),
             helper.make_node("Slice", ["xs", "zero", "one"], ["b"], name="sb"),
             helper.make_node("Concat", ["b", "dims"], ["target"], name="c", axis=0),
             helper.make_node("Expand", ["We", "target"], ["W3"], name="e"),
             helper.make_node("MatMul", ["x", "W3"], ["h"], name="mm"),
             helper.make_node("Tile", ["Wt", "reps"], ["W2"], name="t"),
             helper.make_node("MatMul", ["x2", "W2"], ["y"], name="mm2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 32]),
                              helper.make_tensor_value_info("x2", TensorProto.FLOAT, ["n", 32])],
                      [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 4, 16]),
                       helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
                      [numpy_helper.from_array(_w(32, 16), "We"), numpy_helper.from_array(_w(16, 16), "Wt"),
                       _ints("zero", [0]), _ints("one", [1]), _ints("dims", [32, 16]), _ints("reps", [2, 1])])


def _layouts(proto: onnx.ModelProto, **options) -> dict:
    ctx = passkit.context(**options)
    passkit.find_weights(passkit.prepare(passkit.load(proto), ctx), ctx)
    return {w.name: w for w in ctx.weights}


def test_a_chain_maps_the_final_consumers_reduction_axes_back():
    assert _layouts(transposed_model())["Wt"].layout.reduction_axes == (1,)  # MatMul's K, through the Transpose
    lstm = _layouts(gate_sliced_lstm_model(), min_size=64)
    assert {n: w.layout.reduction_axes for n, w in lstm.items()} == {"w_ih": (1,), "w_hh": (1,)}
    assert lstm["w_ih"].consumers == ("LSTM:rnn through Slice",)
    assert _layouts(reshaped_model())["Wr"].layout.reduction_axes == (0,)
    broadcast = _layouts(expanded_model(), min_size=64)
    assert {n: w.layout.reduction_axes for n, w in broadcast.items()} == {"We": (0,), "Wt": (0,)}
    assert broadcast["We"].consumers == ("MatMul:mm through Expand",)


def test_a_chain_that_ends_anywhere_but_a_weight_input_is_no_weight():
    proto = transposed_model()
    proto.graph.node.append(helper.make_node("Relu", ["W"], ["r"]))
    proto.graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [32, 16]))
    ctx = passkit.context()
    found = survey(passkit.prepare(passkit.load(proto), ctx), ctx.config.weights)
    why = {c.name: c.skipped for c in found.candidates}["Wt"]
    assert why.startswith("unsupported layout: no known reduction axis for Transpose")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model, feeds, weights, movers", [
    (transposed_model, {"x": _floats(4, 32)}, {"Wt"}, {"Transpose"}),
    (gate_sliced_lstm_model, {"x": _floats(5, 2, FEATURES)}, {"w_ih", "w_hh"}, {"Slice", "Concat", "Unsqueeze"}),
    (reshaped_model, {"x": _floats(4, 16)}, {"Wr"}, {"Reshape"}),
    (expanded_model, {"x": _floats(3, 4, 32), "x2": _floats(5, 32)}, {"We", "Wt"}, {"Expand", "Tile"}),
], ids=["transpose", "lstm-gate-slices", "reshape", "expand-tile"])
def test_weights_behind_layout_ops_are_quantized_and_the_chain_reads_the_decode(tmp_path, fmt, model, feeds,
                                                                               weights, movers):
    proto = model()
    report = _check(proto, feeds, tmp_path, fmt, weights, min_size=64)
    assert {r["name"] for r in report["layers"]} == weights
    written = onnx.load(str(tmp_path / f"{fmt}.onnx"))
    produced = {o for n in written.graph.node for o in n.output}
    for node in written.graph.node:  # the chain is still there, reading a decoded (produced) tensor
        if node.op_type in movers and node.input[0] in {f"{w}" for w in weights} | produced:
            assert node.input[0] in produced
    assert movers <= {n.op_type for n in written.graph.node}
    assert not weights & {t.name for t in written.graph.initializer}


def test_weights_behind_expand_and_tile_get_gradients_under_calibration():
    """The estimator differentiates through the chain (Expand and Tile rules): both weights get the gradient
    estimator, not the activations fallback."""
    from bq_onnx import optimize

    calib = {"x": _floats(6, 4, 32), "x2": _floats(6, 32)}
    result = optimize(expanded_model(), calib=calib, bits=4, bits_payload=True, min_size=64, method="laplace")
    assert {n: w.source for n, w in result.context.posterior.weights.items()} == {"We": "laplace", "Wt": "laplace"}
