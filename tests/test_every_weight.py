"""Every weight is found (issue 14 item 5): weights in ``If``/``Loop`` subgraphs (initializers and ``Constant``
nodes), main-graph weights read inside a subgraph, LSTM/GRU ``W``/``R``, weights shared by several readers, and
tensors read as shapes or scales that must stay untouched. Each quantized model runs in onnxruntime and OpenVINO
against a reference holding the numpy-dequantized weights, built here from the source proto."""

from __future__ import annotations

import json

import numpy as np
import onnx
import openvino
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx import optimize
from bq_onnx.cli import main
from bq_onnx.inspect import inspect
from tests import passkit
from tests.conftest import assert_written, make_model
from tests.written import run

RNG = np.random.default_rng(14)
FORMATS = ("native", "compact")
OV_EXACT = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def _w(*shape: int) -> np.ndarray:
    return (RNG.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1)).astype(np.float32)


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def if_model(data_cond: bool = False) -> onnx.ModelProto:
    """``If`` whose then-branch holds a MatMul weight as an initializer, the else-branch as a Constant node; the
    condition is an input (``data_cond``: whether ``sum(x) > 0``, so that calibration feeds ``x`` only)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 16])
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W_then"], ["y_then"])], "then", [],
                             [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, ["b", 16])],
                             initializer=[numpy_helper.from_array(_w(32, 16), "W_then")])
    other = helper.make_graph([_const("W_else", _w(32, 16)), helper.make_node("MatMul", ["x", "W_else"], ["y_else"])],
                              "else", [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, ["b", 16])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    inputs = [x]
    if data_cond:
        nodes[:0] = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
                     helper.make_node("Greater", ["total", "zero"], ["cond"])]
        inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    else:
        inputs.append(helper.make_tensor_value_info("cond", TensorProto.BOOL, []))
        inits = []
    return make_model(nodes, inputs, [y], inits)


def loop_model() -> onnx.ModelProto:
    """A ``Loop`` body (3 trips) that reads the main graph's weight ``W_outer``: ``h = tanh(h @ W_outer)``."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("MatMul", ["h_in", "W_outer"], ["m"], name="body_mm"),
         helper.make_node("Tanh", ["m"], ["h_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, ["b", 32])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, ["b", 32])],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["h"], name="loop", body=body)]
    inits = [numpy_helper.from_array(_w(32, 32), "W_outer"), numpy_helper.from_array(np.array(3, np.int64), "trips")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 32])],
                      [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["b", 32])], inits)


def nested_model() -> onnx.ModelProto:
    """Depth 2: a Loop body holds a Constant weight ``W_mid`` and an If whose then-branch owns ``W_deep``; the
    else-branch reads ``W_mid`` from the Loop body (trip 0 takes the else-branch, trips 1-2 the then-branch)."""
    h = ["b", 32]
    then = helper.make_graph([helper.make_node("MatMul", ["h_in", "W_deep"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, h)],
                             initializer=[numpy_helper.from_array(_w(32, 32), "W_deep")])
    other = helper.make_graph([helper.make_node("MatMul", ["h_in", "W_mid"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, h)])
    body = helper.make_graph(
        [_const("W_mid", _w(32, 32)), _const("zero_i", np.array(0, np.int64)),
         helper.make_node("Greater", ["i", "zero_i"], ["later"]),
         helper.make_node("If", ["later"], ["m"], name="inner", then_branch=then, else_branch=other),
         helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Tanh", ["m"], ["h_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_in", TensorProto.FLOAT, h)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, h)],
    )
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], name="loop", body=body)]
    inits = [numpy_helper.from_array(np.array(3, np.int64), "trips")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, h)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, h)], inits)


def scan_model() -> onnx.ModelProto:
    """A Scan over ``x [6, 32]`` whose body multiplies each row by its own Constant weight and sums the rows."""
    body = helper.make_graph(
        [_const("W_scan", _w(32, 16)), helper.make_node("MatMul", ["x_t", "W_scan"], ["y_t"]),
         helper.make_node("Add", ["s_in", "y_t"], ["s_out"]), helper.make_node("Identity", ["y_t"], ["y_copy"])],
        "body",
        [helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [32])],
        [helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [16]),
         helper.make_tensor_value_info("y_copy", TensorProto.FLOAT, [16])],
    )
    nodes = [helper.make_node("Scan", ["s0", "x"], ["s", "ys"], name="scan", body=body, num_scan_inputs=1)]
    inits = [numpy_helper.from_array(np.zeros(16, np.float32), "s0")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6, 32])],
                      [helper.make_tensor_value_info("s", TensorProto.FLOAT, [16]),
                       helper.make_tensor_value_info("ys", TensorProto.FLOAT, [6, 16])], inits)


def recurrent_model(op: str, directions: int = 2, batch_first: bool = False) -> onnx.ModelProto:
    """One bidirectional LSTM/GRU over ``x [seq 5, batch 2, 24]`` with hidden 16, reading W, R, B initializers
    (``batch_first``: ``x [batch, 5, 24]`` with a symbolic batch, as calibration wants it, transposed around)."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    hidden, size = 16, 24
    inits = [numpy_helper.from_array(_w(directions, gates * hidden, size), "W"),
             numpy_helper.from_array(_w(directions, gates * hidden, hidden), "R"),
             numpy_helper.from_array(0.1 * _w(directions, 2 * gates * hidden), "B")]
    direction = "bidirectional" if directions == 2 else "forward"
    if not batch_first:
        nodes = [helper.make_node(op, ["x", "W", "R", "B"], ["y", "y_h"], name="rnn", hidden_size=hidden,
                                  direction=direction)]
        x, y, y_h = [5, 2, size], [5, directions, 2, hidden], [directions, 2, hidden]
    else:  # onnxruntime runs layout 0 only: exporters transpose around the layer
        nodes = [helper.make_node("Transpose", ["x"], ["x_t"], perm=[1, 0, 2]),
                 helper.make_node(op, ["x_t", "W", "R", "B"], ["y_t", "y_h_t"], name="rnn", hidden_size=hidden,
                                  direction=direction),
                 helper.make_node("Transpose", ["y_t"], ["y"], perm=[2, 0, 1, 3]),
                 helper.make_node("Transpose", ["y_h_t"], ["y_h"], perm=[1, 0, 2])]
        x, y, y_h = ["b", 5, size], ["b", 5, directions, hidden], ["b", directions, hidden]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, y),
                       helper.make_tensor_value_info("y_h", TensorProto.FLOAT, y_h)], inits)


def tied_model() -> onnx.ModelProto:
    """Tied embeddings: ``E [V, D]`` is the Gather table and the transB Gemm head; ``W`` is read by two MatMuls."""
    inits = [numpy_helper.from_array(_w(40, 32), "E"), numpy_helper.from_array(_w(32, 32), "W")]
    nodes = [helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
             helper.make_node("MatMul", ["e", "W"], ["h1"], name="mm1"),
             helper.make_node("MatMul", ["h1", "W"], ["h2"], name="mm2"),
             helper.make_node("Gemm", ["h2", "E"], ["logits"], name="head", transB=1)]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, [6])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [6, 40])], inits)


def control_model() -> onnx.ModelProto:
    """A float Resize ``scales`` and an int64 Reshape ``shape`` that pass min_size 4, next to a real MatMul weight."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Reshape", ["h", "shape"], ["img"], name="reshape"),
             helper.make_node("Resize", ["img", "", "scales"], ["y"], name="resize", mode="nearest")]
    inits = [numpy_helper.from_array(_w(32, 16), "W"),
             numpy_helper.from_array(np.array([1.0, 1.0, 2.0, 2.0], np.float32), "scales"),
             numpy_helper.from_array(np.array([1, 1, 4, 4], np.int64), "shape")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8, 8])], inits)


def _replaced(proto: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``proto`` with the named initializers and Constant nodes replaced, in every graph (the numpy reference)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    missing = set(weights)

    def visit(graph: onnx.GraphProto) -> None:
        for init in graph.initializer:
            if init.name in weights:
                init.CopyFrom(numpy_helper.from_array(weights[init.name].astype(np.float32), init.name))
                missing.discard(init.name)
        for node in graph.node:
            if node.op_type == "Constant" and node.output[0] in weights:
                node.attribute[0].t.CopyFrom(numpy_helper.from_array(weights[node.output[0]], node.output[0]))
                missing.discard(node.output[0])
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                for g in attr.graphs:
                    visit(g)

    visit(out.graph)
    assert not missing, f"not in the source: {sorted(missing)}"
    return out


def _openvino(path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """OpenVINO (exact f32) on the written file; the bq decode functions are inlined first (OpenVINO rejects them)."""
    import onnx.inliner

    proto = onnx.load(str(path))
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
        del proto.functions[:]
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(proto.SerializeToString(), b""), "CPU", OV_EXACT)
    names = [i.name for i in proto.graph.input]
    result = compiled.create_infer_request().infer({i: feeds[n] for i, n in enumerate(names)})
    return [np.array(result[o]) for o in compiled.outputs]


def _check(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], tmp_path, fmt: str, expect: set[str],
           **options) -> dict:
    """Optimize at 4 bits in ``fmt``; the weights ``expect`` are the quantized ones; onnxruntime and OpenVINO
    match the numpy-dequantized reference (1e-4 of the output scale), in every graph of the model."""
    # payload bits: with vq or outliers the tables decide, and a stored 4-bit budget cannot hold these small weights
    result = optimize(proto, bits=4, bits_payload=True, allocator="uniform", format=fmt, group_size=16, **options)
    assert {w.name for w in result.context.weights} == expect
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{fmt}.onnx"
    result.save(path)
    onnx.checker.check_model(str(path), full_check=True)
    written = onnx.load(str(path))
    stored = {t.name for g in _graphs(written.graph) for t in g.initializer}
    assert not expect & stored, f"float weights still stored: {sorted(expect & stored)}"
    reference = run(_replaced(proto, passkit.dequantized(result.context)), feeds)
    for name, got in (("onnxruntime", run(path, feeds)), ("openvino", _openvino(path, feeds))):
        for g, e in zip(got, reference, strict=True):
            scale = max(float(np.abs(e).max()), 1e-3)
            assert float(np.abs(g.astype(np.float64) - e).max()) <= 1e-4 * scale, name
    float_out = run(proto, feeds)
    assert not all(np.array_equal(a, b) for a, b in zip(reference, float_out)), "nothing was quantized"
    return result.report


def _graphs(graph: onnx.GraphProto):
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for g in attr.graphs:
                yield from _graphs(g)


def _floats(*shape: int, seed: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("branch", [True, False])
def test_if_branch_weights_initializer_and_constant_are_quantized(tmp_path, fmt, branch):
    feeds = {"x": _floats(2, 32), "cond": np.array(branch)}
    _check(if_model(), feeds, tmp_path, fmt, {"W_then", "W_else"})
    layers = {r["name"]: r for r in inspect(tmp_path / f"{fmt}.onnx")["layers"]}
    assert set(layers) == {"W_then", "W_else"} and all(r["stored_bytes"] > 0 for r in layers.values())
    written = onnx.load(str(tmp_path / f"{fmt}.onnx"))
    branch_graph = written.graph.node[-1].attribute  # the decode lives in the branch that owned the weight
    then = next(a.g for a in branch_graph if a.name == "then_branch")
    assert any(n.op_type in ("DequantizeLinear", "DecodeUniformSym4", "DecodeUniform4") for n in then.node) or any(
        n.domain == "bq" for n in then.node)


@pytest.mark.parametrize("fmt", FORMATS)
def test_loop_body_reads_an_outer_weight_that_is_quantized(tmp_path, fmt):
    _check(loop_model(), {"x": _floats(2, 32)}, tmp_path, fmt, {"W_outer"})


@pytest.mark.parametrize("fmt", FORMATS)
def test_weights_at_depth_two_and_in_scan_bodies_are_quantized(tmp_path, fmt):
    _check(nested_model(), {"x": _floats(2, 32)}, tmp_path / "nested", fmt, {"W_mid", "W_deep"})
    _check(scan_model(), {"x": _floats(6, 32)}, tmp_path / "scan", fmt, {"W_scan"})


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
def test_recurrent_weights_quantized_along_their_own_layout(tmp_path, fmt, op):
    report = _check(recurrent_model(op), {"x": _floats(5, 2, 24)}, tmp_path, fmt, {"W", "R"}, min_size=64)
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    views = {r["name"]: r["view"] for r in report["layers"]}
    assert views == {"W": [24, 2 * gates * 16], "R": [16, 2 * gates * 16]}  # K: the reduced last axis


@pytest.mark.parametrize("options", [{"quantizer": "vq"}, {"quantizer": "lloyd"}, {"outliers": 0.01}])
def test_recurrent_weights_in_every_compact_decode_fold_for_openvino(tmp_path, options):
    """OpenVINO's LSTM takes constant weights only: every compact decode of one must fold (no BitwiseAnd)."""
    _check(recurrent_model("LSTM"), {"x": _floats(5, 2, 24)}, tmp_path, "compact", {"W", "R"}, **options)
    written = onnx.load(str(tmp_path / "compact.onnx"))
    assert not any(n.op_type == "BitwiseAnd" for f in written.functions for n in f.node)


def test_recurrent_layout_reduces_the_last_axis():
    ctx = passkit.context(min_size=64)
    passkit.find_weights(passkit.prepare(passkit.load(recurrent_model("LSTM")), ctx), ctx)
    layouts = {w.name: w.layout for w in ctx.weights}
    w = _floats(2, 64, 24)
    view = layouts["W"].to_view(w)
    assert view.shape == (24, 128)
    np.testing.assert_array_equal(view[:, 64 + 5], w[1, 5, :])  # column = (direction, gate row)
    np.testing.assert_array_equal(layouts["W"].from_view(view), w)


@pytest.mark.parametrize("method", ["laplace", "kfac", "activations"])
def test_recurrent_and_subgraph_weights_survive_calibration(tmp_path, method):
    """LSTM weights get gradients (its VJP rule; K-FAC has no Kronecker factors for them and takes the squared-
    gradient diagonal); so do weights inside If branches (each sample by the branch it takes: both are taken
    here) and a weight read by a Loop body (unrolled)."""
    lstm = optimize(recurrent_model("LSTM", batch_first=True), calib={"x": _floats(8, 5, 24)}, bits=3,
                    bits_payload=True, method=method)
    assert {w.name for w in lstm.context.weights} == {"W", "R"}
    assert set(lstm.context.posterior.weights) == {"W", "R"}
    expected = {"laplace": "laplace", "kfac": "fisher-mc", "activations": "activations"}[method]
    assert {w.source for w in lstm.context.posterior.weights.values()} == {expected}
    lstm.save(tmp_path / "lstm.onnx")
    x = _floats(8, 32)
    assert 0 < int((x.sum(axis=1) > 0).sum()) < 8  # both branches are taken
    branch = optimize(if_model(data_cond=True), calib={"x": x}, bits=3, bits_payload=True, method=method)
    assert set(branch.context.posterior.weights) == {"W_then", "W_else"}
    assert {w.source for w in branch.context.posterior.weights.values()} == {expected}
    branch.save(tmp_path / "branch.onnx")
    loop = optimize(loop_model(), calib={"x": _floats(8, 32)}, bits=3, bits_payload=True, method=method)
    want = "mean" if method == "activations" else expected  # activations: its input is the Loop body's own state
    assert loop.context.posterior.weights["W_outer"].source == want
    loop.save(tmp_path / "loop.onnx")


@pytest.mark.parametrize("rounding", ["gptq", "gptq-plain"])
def test_gptq_rounds_a_weight_read_inside_a_loop_body_to_nearest(tmp_path, rounding):
    """A main-graph weight read by a MatMul inside a Loop body: its layer input is the body's own value, which no
    forward run of the main graph can return, so it has no ``A`` and is rounded to nearest (it raised KeyError
    'h_in' while ``A`` was measured)."""
    loop = optimize(loop_model(), calib={"x": _floats(8, 32)}, bits=3, bits_payload=True, rounding=rounding)
    assert any(m.startswith(f"--rounding {rounding}: no MatMul/Gemm/Conv weight's input can be measured")
               for m in loop.report["messages"]), loop.report["messages"]
    loop.save(tmp_path / "loop.onnx")
    assert_written(loop, tmp_path / "loop.onnx")


@pytest.mark.parametrize("fmt", FORMATS)
def test_shared_weights_are_found_once_and_every_reader_reads_the_decode(tmp_path, fmt):
    report = _check(tied_model(), {"ids": np.array([0, 3, 39, 7, 7, 21])}, tmp_path, fmt, {"E", "W"})
    consumers = {w["name"]: w for w in report["layers"]}
    assert set(consumers) == {"E", "W"}
    ctx = passkit.context(min_size=64)
    passkit.find_weights(passkit.prepare(passkit.load(tied_model()), ctx), ctx)
    assert passkit.weight_consumers(ctx) == {"E": ("Gather:embed", "Gemm:head"), "W": ("MatMul:mm1", "MatMul:mm2")}


def test_shared_weights_under_calibration_are_estimated_from_every_reader(tmp_path):
    """K-FAC's one probe per layer would see one of ``W``'s two MatMuls: it takes the squared-gradient diagonal."""
    proto = tied_model()
    proto.graph.input[0].CopyFrom(helper.make_tensor_value_info("ids", TensorProto.INT64, ["b"]))
    proto.graph.output[0].CopyFrom(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 40]))
    calib = {"ids": np.arange(16) % 40}
    kfac = optimize(proto, calib=calib, bits=3, bits_payload=True, method="kfac")
    assert {k: v.source for k, v in kfac.context.posterior.weights.items()} == {"E": "fisher-mc", "W": "fisher-mc"}
    assert kfac.context.posterior.weights["W"].kfac is None
    kfac.save(tmp_path / "kfac.onnx")


def test_a_weight_whose_readers_disagree_on_the_layout_is_skipped_with_a_note():
    """``E`` as a Gather table (blocks along D) and a plain MatMul B (blocks along V): no layout suits both."""
    proto = tied_model()
    proto.graph.node[-1].CopyFrom(helper.make_node("MatMul", ["h2", "E_T"], ["logits"], name="head"))
    proto.graph.node.insert(0, helper.make_node("MatMul", ["probe", "E"], ["unused"], name="probe_mm"))
    proto.graph.input.append(helper.make_tensor_value_info("probe", TensorProto.FLOAT, [1, 40]))
    proto.graph.initializer.append(numpy_helper.from_array(_w(32, 40), "E_T"))
    proto.graph.output.append(helper.make_tensor_value_info("unused", TensorProto.FLOAT, [1, 32]))
    ctx = passkit.context(min_size=64)
    passkit.find_weights(passkit.prepare(passkit.load(proto), ctx), ctx)
    assert "E" not in passkit.weight_names(ctx)
    assert any("'E'" in m and "different axes" in m for m in passkit.messages(ctx))


@pytest.mark.parametrize("fmt", FORMATS)
def test_shape_and_scale_tensors_stay_untouched(tmp_path, fmt):
    proto = control_model()
    result = optimize(proto, bits=4, allocator="uniform", format=fmt, min_size=4)
    assert [w.name for w in result.context.weights] == ["W"]
    assert any("'scales'" in m and "read as scales by Resize:resize" in m for m in result.context.messages)
    path = tmp_path / "m.onnx"
    result.save(path)
    written = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    source = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for name in ("scales", "shape"):
        np.testing.assert_array_equal(written[name], source[name])


def test_inspect_lists_every_candidate_with_its_readers_and_why_skipped(tmp_path, capsys):
    proto = if_model()
    proto.graph.node.append(helper.make_node("Add", ["y", "bias"], ["z"], name="add"))
    proto.graph.initializer.append(numpy_helper.from_array(_w(2, 16), "bias"))
    proto.graph.initializer.append(numpy_helper.from_array(_w(4), "tiny"))
    proto.graph.node.append(helper.make_node("Mul", ["z", "tiny4"], ["z4"], name="mul"))
    proto.graph.node.insert(0, helper.make_node("Resize", ["x4", "", "tiny"], ["tiny4"], name="resize"))
    proto.graph.input.append(helper.make_tensor_value_info("x4", TensorProto.FLOAT, [1, 1, 2, 16]))
    path = tmp_path / "float.onnx"
    onnx.save(proto, path)
    rows = {c["name"]: c for c in inspect(path, min_size=4)["candidates"]}
    assert rows["W_then"]["weight"] and rows["W_then"]["scope"] == "If:branch/then_branch"
    assert rows["W_then"]["read_by"] == ["MatMul:? in If:branch/then_branch"]
    assert rows["W_else"]["weight"] and rows["W_else"]["scope"] == "If:branch/else_branch"
    assert not rows["bias"]["weight"] and rows["bias"]["skipped"].startswith("unsupported layout")
    assert rows["bias"]["read_by"] == ["Add:add"]
    assert rows["tiny"]["skipped"] == "read as scales by Resize:resize"
    small = {c["name"]: c for c in inspect(path, min_size=64)["candidates"]}
    assert small["tiny"]["skipped"].startswith("too small")
    assert main(["inspect", str(path), "--min-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "W_then (in If:branch/then_branch)" in out and "read as scales by Resize:resize" in out
    assert main(["inspect", str(path), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["candidates"]) == 4


def test_measured_tables_and_distillation_leave_subgraph_weights_to_their_first_design(tmp_path):
    """``--tables mc`` measures only the weights it can feed; distillation trains only main-graph ones."""
    proto = if_model(data_cond=True)
    proto.graph.node[-1].output[0] = "y_if"
    proto.graph.node.append(helper.make_node("MatMul", ["y_if", "W_main"], ["y"], name="head"))
    proto.graph.initializer.append(numpy_helper.from_array(_w(16, 16), "W_main"))
    calib = {"x": _floats(16, 32)}
    result = optimize(proto, calib=calib, bits=3, bits_payload=True, tables="mc", calib_samples=16, distill_steps=2)
    assert {w.name for w in result.context.weights} == {"W_then", "W_else", "W_main"}
    assert result.context.distillation is not None
    result.save(tmp_path / "m.onnx")


def test_same_named_weights_of_two_branches_get_unique_names(tmp_path):
    """Both branches hold a Constant ``W``: the prepare passes rename the second, so each is quantized under its
    own name."""
    proto = if_model()
    branches = {a.name: a.g for a in proto.graph.node[0].attribute}
    then, other = branches["then_branch"], branches["else_branch"]
    other.node[0].output[0] = other.node[1].input[1] = "W"
    then.ClearField("initializer")
    then.node.insert(0, _const("W", _w(32, 16)))
    then.node[1].input[1] = "W"
    result = optimize(proto, bits=8, allocator="uniform")
    assert sorted(w.name for w in result.context.weights) == ["W", "W.1"]
    result.save(tmp_path / "m.onnx")  # verified against the numpy-dequantized reference by save itself
    for branch in (True, False):
        feeds = {"x": _floats(2, 32), "cond": np.array(branch)}
        got, want = run(tmp_path / "m.onnx", feeds)[0], run(proto, feeds)[0]
        assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()
