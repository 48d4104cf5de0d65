"""``Loop``/``Scan`` differentiated by their body (issue 14, item 4): trip counts given as inputs, conditions that
exit early, more steps than the unroll limit, Scans of symbolic length in both directions, loops nested in ``If``
and ``If`` in loops; each checked against float64 central finite differences in onnxruntime and against
onnxruntime in OpenVINO (``check``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.autodiff.gradient import build_gradient_model
from bq_onnx.autodiff.vjp_control import MAX_UNROLL
from tests.test_autodiff import check, i64, make_case, node, rand, run_gradient_model
from tests.test_vjp_control import _loop_body, _scan_body


def _count(result, op: str) -> int:
    return sum(1 for n in ir.traversal.RecursiveGraphIterator(result.model.graph) if n.op_type == op)


def _loop_case(trips, *, feed_trips: bool = False, seed: int = 10, weights_outside: bool = False,
               body: onnx.GraphProto | None = None, inputs: dict | None = None, cond: str = ""):
    """``y = sum(final state) + sum(stacked outputs)`` of ``state <- tanh(state @ W + i)`` from ``S0`` (from
    ``S0 @ W`` when ``weights_outside``: W read before the loop and inside it)."""
    rng = np.random.default_rng(seed)
    nodes = [node("MatMul", ["S0", "W"], "S1") if weights_outside else node("Identity", ["S0"], "S1"),
             node("Loop", ["M", cond, "S1"], ["sf", "st"], body=body or _loop_body("W")),
             node("ReduceSum", ["st", "ax0"], "st0", keepdims=0), node("Add", ["sf", "st0"], "y")]
    weights = {"W": rand(rng, 4, 4) * 0.4, "S0": rand(rng, 2, 4)}
    trip = np.array(trips, np.int64)
    consts = {"ax0": i64(0)} if not cond else {"ax0": i64(0), cond: np.array(True)}
    feeds = dict(inputs or {})
    if feed_trips:
        feeds["M"] = trip
    else:
        consts["M"] = trip
    return make_case(nodes, "y", weights, consts=consts, inputs=feeds)


def test_loop_with_a_trip_count_given_as_an_input(tmp_path):
    result, _ = check(_loop_case(5, feed_trips=True), tmp_path)
    assert _count(result, "Loop") == 2  # the forward (saving what the backward needs), the reverse


def test_loop_beyond_the_unroll_limit(tmp_path):
    """100 steps: not unrolled (a few Loops, not 100 copies of the body), differentiated by the body."""
    result, _ = check(_loop_case(MAX_UNROLL + 36), tmp_path)
    assert _count(result, "Loop") == 2
    assert _count(result, "Tanh") < 10


def test_loop_that_runs_no_iteration(tmp_path):
    """A trip count of 0: the final state is the initial one (its gradient passes through), W gets zeros."""
    rng = np.random.default_rng(22)
    nodes = [node("Loop", ["M", "", "S0"], ["sf", "st"], body=_loop_body("W")), node("Mul", ["sf", "V"], "y")]
    weights = {"W": rand(rng, 4, 4), "S0": rand(rng, 2, 4), "V": rand(rng, 4)}
    case = make_case(nodes, "y", weights, inputs={"M": np.array(0, np.int64)})
    result, _ = check(case, tmp_path)
    assert not np.any(run_gradient_model(result, case.feeds)[result.gradients["W"]])


def test_loop_in_float32_with_an_input_trip_count(tmp_path):
    case = _loop_case(5, feed_trips=True)
    proto = case.proto
    for init in proto.graph.initializer:
        if init.data_type == TensorProto.DOUBLE:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    body = next(a.g for n in proto.graph.node for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    body.input[2].type.tensor_type.elem_type = TensorProto.FLOAT
    for inner in body.node:
        for attr in inner.attribute:
            if attr.name == "to":
                attr.i = TensorProto.FLOAT
            if attr.name == "value":
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32)))
    check(case, tmp_path, dtype="f32")


def test_loop_with_only_stacked_outputs_and_an_integer_counter(tmp_path):
    """``ys[i] = X[i] @ W`` for 70 steps, an int64 carried counter beside: X (read by the body from outside,
    row by row) and W both get gradients."""
    body = helper.make_graph(
        [helper.make_node("Gather", ["X", "i"], ["xi"], axis=0), helper.make_node("MatMul", ["xi", "W"], ["y"]),
         helper.make_node("Add", ["k_in", "one"], ["k_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("k_in", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("k_out", TensorProto.INT64, []), helper.make_empty_tensor_value_info("y")])
    rng = np.random.default_rng(20)
    nodes = [node("Loop", ["M", "", "k0"], ["kf", "ys"], body=body)]
    consts = {"k0": np.array(0, np.int64), "one": np.array(1, np.int64), "M": np.array(70, np.int64)}
    check(make_case(nodes, "ys", {"W": rand(rng, 3, 2), "X": rand(rng, 70, 3)}, consts=consts), tmp_path)


def test_a_loop_inside_a_loop_body(tmp_path):
    """The outer loop (trip count an input) runs an inner loop of 3 steps (unrolled inside the outer body) and
    scales its result by V."""
    outer_body = helper.make_graph(
        [helper.make_node("Loop", ["M2", "", "s_in"], ["s_mid", "st"], body=_loop_body("W")),
         helper.make_node("Mul", ["s_mid", "V"], ["s_out"]), helper.make_node("Identity", ["c_in"], ["c_out"])],
        "outer_body", [helper.make_tensor_value_info("j", TensorProto.INT64, []),
                       helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                       helper.make_tensor_value_info("s_in", TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_empty_tensor_value_info("s_out")])
    rng = np.random.default_rng(21)
    nodes = [node("Loop", ["M", "", "S0"], ["sf"], body=outer_body)]
    weights = {"W": rand(rng, 4, 4) * 0.5, "V": rand(rng, 4), "S0": rand(rng, 2, 4)}
    check(make_case(nodes, "sf", weights, consts={"M2": np.array(3, np.int64)}, inputs={"M": np.array(3, np.int64)}),
          tmp_path)


def _early_exit_body() -> onnx.GraphProto:
    """The body of ``_loop_body`` with ``cond_out = i < K``: the run stops after K+1 iterations (K an input)."""
    body = _loop_body("W")
    body.node[5].CopyFrom(helper.make_node("Cast", ["i"], ["fi2"], to=TensorProto.DOUBLE))
    body.node.append(helper.make_node("Less", ["fi2", "K"], ["c_out"]))
    return body


@pytest.mark.parametrize("k", [6.0, 2.5, 0.0])
def test_loop_with_a_condition_computed_in_the_body(tmp_path, k):
    """The trip count (1000) is far above what runs: the body's condition ``i < K`` exits after a number of
    iterations that depends on the input K (7, 3 and 1)."""
    check(_loop_case(1000, body=_early_exit_body(), inputs={"K": np.array(k)}, cond="C"), tmp_path)


def test_a_weight_read_inside_and_outside_the_loop(tmp_path):
    check(_loop_case(70, weights_outside=True, seed=11), tmp_path)


@pytest.mark.parametrize(("in_axis", "in_dir", "out_axis", "out_dir"),
                         [(0, 0, 0, 0), (0, 1, 0, 1), (1, 1, 1, 0), (0, 0, -1, 1)], ids=str)
def test_scan_of_symbolic_length(tmp_path, in_axis, in_dir, out_axis, out_dir):
    """The scanned axis is symbolic (``T``): the Scan becomes a Loop, differentiated by its body; every
    direction and axis, the scanned input itself differentiated (it is computed from the weight Wx)."""
    rng = np.random.default_rng(12)
    xs = rand(rng, 5, 2, 3) if in_axis == 0 else rand(rng, 2, 5, 3)
    symbolic = {"X": ["T", 2, 3] if in_axis == 0 else [2, "T", 3]}
    nodes = [node("MatMul", ["X", "Wx"], "xw"),
             node("Scan", ["H0", "xw"], ["hf", "ys"], body=_scan_body(), num_scan_inputs=1,
                  scan_input_axes=[in_axis], scan_input_directions=[in_dir], scan_output_axes=[out_axis],
                  scan_output_directions=[out_dir]),
             node("ReduceSum", ["ys", "ax"], "ysum", keepdims=0), node("Add", ["hf", "ysum"], "y")]
    weights = {"Wx": rand(rng, 3, 3), "Wr": rand(rng, 3, 3) * 0.5, "H0": rand(rng, 2, 3)}
    ax = {0: 0, 1: 1, -1: 2}[out_axis]
    case = make_case(nodes, "y", weights, consts={"ax": i64(ax)}, inputs={"X": xs}, symbolic=symbolic)
    result, _ = check(case, tmp_path)
    assert _count(result, "Scan") == 0


def test_scan_longer_than_the_unroll_limit(tmp_path):
    rng = np.random.default_rng(13)
    nodes = [node("Scan", ["H0", "X"], ["hf", "ys"], body=_scan_body(), num_scan_inputs=1,
                  scan_input_directions=[1]),
             node("ReduceSum", ["ys", "ax"], "ysum", keepdims=0), node("Add", ["hf", "ysum"], "y")]
    weights = {"Wr": rand(rng, 3, 3) * 0.4, "H0": rand(rng, 2, 3), "X": rand(rng, MAX_UNROLL + 6, 2, 3)}
    check(make_case(nodes, "y", weights, consts={"ax": i64(0)}), tmp_path)


def test_a_loop_inside_an_if_branch(tmp_path):
    """The then branch runs a loop whose trip count is an input; the else branch a plain MatMul."""
    rng = np.random.default_rng(14)
    then = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "S0"], ["sf", "st"], body=_loop_body("W")),
         helper.make_node("ReduceSum", ["st", "ax0"], ["st0"], keepdims=0),
         helper.make_node("Add", ["sf", "st0"], ["t"])], "then", [], [helper.make_empty_tensor_value_info("t")])
    other = helper.make_graph([helper.make_node("MatMul", ["S0", "W"], ["e"])], "else", [],
                              [helper.make_empty_tensor_value_info("e")])
    for flag in (True, False):
        nodes = [node("If", ["flag"], "y", then_branch=then, else_branch=other)]
        weights = {"W": rand(rng, 4, 4) * 0.4, "S0": rand(rng, 2, 4)}
        case = make_case(nodes, "y", weights, consts={"flag": np.array(flag), "ax0": i64(0)},
                         inputs={"M": np.array(4, np.int64)})
        check(case, tmp_path)


def test_an_if_inside_a_loop_body(tmp_path):
    """Each iteration takes one branch by the parity of its number: ``tanh(s @ W)`` or ``s * V``."""
    rng = np.random.default_rng(15)
    then = helper.make_graph([helper.make_node("MatMul", ["s_in", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["t"])],
                             "then", [], [helper.make_empty_tensor_value_info("t")])
    other = helper.make_graph([helper.make_node("Mul", ["s_in", "V"], ["e"])], "else", [],
                              [helper.make_empty_tensor_value_info("e")])
    body = helper.make_graph(
        [helper.make_node("Mod", ["i", "two"], ["r"]), helper.make_node("Equal", ["r", "zero"], ["even"]),
         helper.make_node("If", ["even"], ["s_out"], then_branch=then, else_branch=other),
         helper.make_node("Identity", ["c_in"], ["c_out"]), helper.make_node("Identity", ["s_out"], ["scan_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_empty_tensor_value_info("s_out"),
         helper.make_empty_tensor_value_info("scan_out")])
    nodes = [node("Loop", ["M", "", "S0"], ["sf", "st"], body=body),
             node("ReduceSum", ["st", "ax0"], "st0", keepdims=0), node("Add", ["sf", "st0"], "y")]
    weights = {"W": rand(rng, 4, 4) * 0.5, "V": rand(rng, 4), "S0": rand(rng, 2, 4)}
    consts = {"ax0": i64(0), "two": np.array(2, np.int64), "zero": np.array(0, np.int64)}
    check(make_case(nodes, "y", weights, consts=consts, inputs={"M": np.array(5, np.int64)}), tmp_path)


def test_an_op_without_a_rule_on_a_carried_value_refuses_naming_it():
    rng = np.random.default_rng(16)
    body = _loop_body("W")
    body.node[4].CopyFrom(helper.make_node("TopK", ["a", "k4"], ["s_out", "order"], name="top"))
    body.initializer.append(numpy_helper.from_array(i64(4), "k4"))
    case = make_case([node("Loop", ["M", "", "S0"], ["sf", "st"], body=body)], "sf",
                     {"W": rand(rng, 4, 4), "S0": rand(rng, 2, 4)}, inputs={"M": np.array(3, np.int64)})
    result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
    label = "Loop 'Loop_sf'"
    assert set(result.unsupported) == {"W", "S0"}
    assert "blocks carried value 0" in result.reasons[label] and "TopK 'top'" in result.reasons[label]


def _calibrated_loop_model(early_exit: bool) -> onnx.ModelProto:
    """``y = Loop(trips, h0 = x @ W_in: h <- tanh(h @ W_rec)) @ W_out`` with the trip count an input; with
    ``early_exit`` the body stops once ``i >= 30 * mean|h|`` (the per-sample test's samples after 7 to 12 steps
    each, a batch of all 8 after 9)."""
    rng = np.random.default_rng(17)
    h = ["b", 32]

    def w(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32))

    cond = [helper.make_node("Identity", ["c_in"], ["c_out"])]
    if early_exit:
        cond = [helper.make_node("Abs", ["h_out"], ["ah"]), helper.make_node("ReduceMean", ["ah"], ["mh"], keepdims=0),
                helper.make_node("Mul", ["mh", "scale"], ["lim"]), helper.make_node("Cast", ["i"], ["fi"], to=1),
                helper.make_node("Less", ["fi", "lim"], ["c_out"])]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W_rec"], ["m"]), helper.make_node("Tanh", ["m"], ["h_out"]), *cond],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, h)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, h)])
    inits = [w(16, 32), w(32, 32), w(32, 8), numpy_helper.from_array(np.array(30.0, np.float32), "scale")]
    for init, name in zip(inits, ["W_in", "W_rec", "W_out"]):
        init.name = name
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_in"], ["h0"]),
         helper.make_node("Loop", ["trips", "", "h0"], ["hf"], name="loop", body=body),
         helper.make_node("MatMul", ["hf", "W_out"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16]),
         helper.make_tensor_value_info("trips", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto


def test_optimize_with_calibration_uses_laplace_for_loop_weights(tmp_path, capsys):
    """End to end on a loop with an input trip count and a condition computed in its body: every weight (the
    one its body reads included) gets its curvature from ``laplace``, no fallback."""
    from bq_onnx.cli import main

    onnx.save(_calibrated_loop_model(early_exit=True), tmp_path / "loop.onnx")
    x = np.random.default_rng(18).standard_normal((24, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x, trips=np.array(100, np.int64))
    out = tmp_path / "loop.bq.onnx"
    code = main(["optimize", str(tmp_path / "loop.onnx"), "--calib", str(tmp_path / "calib.npz"), "-o", str(out),
                 "--format", "compact", "--bits", "4", "--bits-payload"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    assert "estimators: laplace 3 weights" in stdout, stdout
    assert "no gradient rule" not in stdout and "used the activations estimator" not in stdout


@pytest.mark.parametrize("early_exit", [False, True], ids=["trips-input", "early-exit"])
def test_loop_weights_per_sample_curvature_matches_one_sample_runs(early_exit):
    """The Fisher diagonal of every weight is the same from the default runs as from one sample per run; a loop
    that exits on the data is never batched (a batch would run until the whole batch stops), one with a
    trip count given once is."""
    import bq_onnx
    from bq_onnx.graph import batch_major_weights
    from bq_onnx.model_io import load_model

    proto = _calibrated_loop_model(early_exit)
    rng = np.random.default_rng(19)
    samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32), "trips": np.array(100, np.int64)}
               for _ in range(8)]
    default = bq_onnx.optimize(proto, calib=samples, bits=4, bits_payload=True)
    single = bq_onnx.optimize(proto, calib=samples, bits=4, bits_payload=True, batch_size=1)
    batched = batch_major_weights(load_model(proto), default.context.weights, default.calibration)
    assert batched == ({} if early_exit else {"W_in": 1})
    for name in ("W_in", "W_rec", "W_out"):
        assert default.context.posterior.weights[name].source == "laplace"
        np.testing.assert_allclose(default.context.posterior.weights[name].precision,
                                   single.context.posterior.weights[name].precision, rtol=1e-4)


def test_a_carried_value_that_grows_is_refused_naming_the_loop():
    """``seq <- Concat(seq, tanh(h @ W))``: its iterations have different lengths and cannot be stacked."""
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["m"]), helper.make_node("Tanh", ["m"], ["h_out"]),
         helper.make_node("Concat", ["seq_in", "h_out"], ["seq_out"], axis=0),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.DOUBLE, [1, 4]),
                 helper.make_tensor_value_info("seq_in", TensorProto.DOUBLE, ["n", 4])],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.DOUBLE, [1, 4]),
         helper.make_tensor_value_info("seq_out", TensorProto.DOUBLE, ["n1", 4])])
    rng = np.random.default_rng(23)
    nodes = [node("Loop", ["M", "", "H0", "Q0"], ["hf", "qf"], body=body)]
    case = make_case(nodes, "qf", {"W": rand(rng, 4, 4), "H0": rand(rng, 1, 4)}, consts={"Q0": rand(rng, 1, 4)},
                     inputs={"M": np.array(3, np.int64)})
    result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
    assert set(result.unsupported) == {"W", "H0"}
    assert result.reasons["Loop 'Loop_hf'"] == ("carried value 1 grows each iteration (a Concat of itself), so its "
                                               "iterations cannot be stacked")


def test_two_unnamed_scans_of_symbolic_length(tmp_path):
    """Two Scans without node names, one after the other (each rewritten as a Loop with values of its own)."""
    rng = np.random.default_rng(24)
    scan = {"body": _scan_body(), "num_scan_inputs": 1}
    nodes = [helper.make_node("Scan", ["H0", "X"], ["h1", "ys1"], **scan),
             helper.make_node("Scan", ["h1", "ys1"], ["h2", "ys2"], scan_input_directions=[1], **scan),
             node("ReduceSum", ["ys2", "ax"], "ysum", keepdims=0), node("Add", ["h2", "ysum"], "y")]
    weights = {"Wr": rand(rng, 3, 3) * 0.5, "H0": rand(rng, 2, 3)}
    check(make_case(nodes, "y", weights, consts={"ax": i64(0)}, inputs={"X": rand(rng, 4, 2, 3)},
                    symbolic={"X": ["T", 2, 3]}), tmp_path)
