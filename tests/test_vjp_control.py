"""Control-flow gradients (issue 14, item 4): ``If`` by the branch taken, ``Loop``/``Scan`` unrolled when small
(the others: tests/test_vjp_loop.py), weights stored inside subgraphs; checked against float64 central finite
differences like tests/test_autodiff.py (and OpenVINO where it runs the gradient model)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.autodiff.gradient import build_gradient_model
from bq_onnx.autodiff.vjp_control import MAX_UNROLL, _refusal, unroll_loops
from tests.test_autodiff import F64_TOL, _session, check, i64, make_case, node, rand, run_gradient_model


def _branch(name: str, nodes: list, out: str, inits: list | None = None) -> onnx.GraphProto:
    return helper.make_graph(nodes, name, [], [helper.make_empty_tensor_value_info(out)], initializer=inits or [])


@pytest.mark.parametrize("flag", [True, False], ids=["then", "else"])
def test_if_follows_the_branch_taken(tmp_path, flag):
    """Outer weights read by one branch, by both, by neither branch but after the If; a branch output that is
    used twice downstream."""
    rng = np.random.default_rng(1)
    then = _branch("then", [helper.make_node("MatMul", ["x", "W"], ["t0"]), helper.make_node("Tanh", ["t0"], ["t"])],
                   "t")
    other = _branch("else", [helper.make_node("MatMul", ["x", "U"], ["e0"]),
                             helper.make_node("Mul", ["e0", "W2"], ["e"])], "e")
    nodes = [node("If", ["flag"], "y", then_branch=then, else_branch=other),
             node("Mul", ["y", "V"], "z0"), node("Add", ["z0", "y"], "z")]
    weights = {"W": rand(rng, 3, 4), "U": rand(rng, 3, 4), "W2": rand(rng, 4), "V": rand(rng, 4)}
    case = make_case(nodes, "z", weights, consts={"flag": np.array(flag)}, inputs={"x": rand(rng, 2, 3)})
    result, _ = check(case, tmp_path)
    grads = run_gradient_model(result, case.feeds)
    untaken = ["U", "W2"] if flag else ["W"]
    for w in untaken:  # the branch not taken gives nothing
        assert not np.any(grads[result.gradients[w]])


def _subgraph_case(flag: bool, seed: int = 2):
    """``z = sum(If(flag, then: relu(x @ A) @ B, else: x @ C) * R)`` with A, B, C stored inside the branches, the
    then branch holding a nested If over the same flag."""
    rng = np.random.default_rng(seed)
    arrays = {"A": rand(rng, 3, 5), "B": rand(rng, 5, 4), "C": rand(rng, 3, 4)}
    inner_then = _branch("inner_then", [helper.make_node("MatMul", ["h", "B"], ["it"])], "it",
                         [numpy_helper.from_array(arrays["B"], "B")])
    inner_else = _branch("inner_else", [helper.make_node("Identity", ["h4"], ["ie"])], "ie")
    then = _branch("then", [helper.make_node("MatMul", ["x", "A"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"]),
                            helper.make_node("Slice", ["h", "s0", "s4", "s1"], ["h4"]),
                            helper.make_node("If", ["flag"], ["t"], then_branch=inner_then, else_branch=inner_else)],
                   "t", [numpy_helper.from_array(arrays["A"], "A")])
    other = _branch("else", [helper.make_node("MatMul", ["x", "C"], ["e"])], "e",
                    [numpy_helper.from_array(arrays["C"], "C")])
    x = rand(rng, 2, 3)
    r = rand(rng, 2, 4)
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other),
         helper.make_node("Mul", ["y", "R"], ["z"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 3])],
        [helper.make_empty_tensor_value_info("z")],
        initializer=[numpy_helper.from_array(np.array(flag), "flag"), numpy_helper.from_array(r, "R"),
                     numpy_helper.from_array(i64(0), "s0"), numpy_helper.from_array(i64(4), "s4"),
                     numpy_helper.from_array(i64(1), "s1")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto, arrays, {"x": x}


def _set_initializer(proto: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    stack = [out.graph]
    while stack:
        g = stack.pop()
        for init in g.initializer:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(array, name))
        for n in g.node:
            stack.extend(a.g for a in n.attribute if a.type == onnx.AttributeProto.GRAPH)
    return out


@pytest.mark.parametrize("flag", [True, False], ids=["then", "else"])
def test_weights_stored_inside_branches_get_gradients(flag):
    """Initializers of a branch (and of a nested branch) are differentiated: central differences in float64 on
    every element, the model given unchanged."""
    proto, arrays, feeds = _subgraph_case(flag)
    model = ir.from_proto(proto)
    before = ir.to_proto(model).SerializeToString()
    result = build_gradient_model(model, "z", list(arrays))
    assert ir.to_proto(model).SerializeToString() == before, "the input model was modified"
    assert not result.unsupported and list(result.gradients) == list(arrays)
    outs = run_gradient_model(result, feeds)
    h = 1e-6
    for name, w in arrays.items():
        got = outs[result.gradients[name]]
        assert got.shape == w.shape
        fd = np.zeros_like(w)
        for i in range(w.size):
            plus, minus = w.copy(), w.copy()
            plus.flat[i] += h
            minus.flat[i] -= h
            loss = [float(_session(_set_initializer(proto, name, v)).run(["z"], feeds)[0].sum()) for v in (plus, minus)]
            fd.flat[i] = (loss[0] - loss[1]) / (2 * h)
        scale = max(np.abs(fd).max(), 1e-12)
        assert np.abs(fd - got).max() / scale <= F64_TOL, (name, fd, got)
        taken = {"A", "B"} if flag else {"C"}
        assert (np.abs(got).max() > 0) == (name in taken)


def test_an_op_without_a_rule_inside_a_branch_blocks_only_what_it_reads():
    rng = np.random.default_rng(3)
    then = _branch("then", [helper.make_node("Mul", ["x", "W"], ["t0"]),
                            helper.make_node("TopK", ["t0", "k"], ["t", "ti"], name="top", axis=-1)], "t")
    other = _branch("else", [helper.make_node("Slice", ["x", "s0", "s2", "s0"], ["e"])], "e")
    nodes = [node("If", ["flag"], "y", then_branch=then, else_branch=other), node("Mul", ["y", "V"], "z")]
    consts = {"flag": np.array(True), "k": i64(2), "s0": i64(0), "s2": i64(2)}
    case = make_case(nodes, "z", {"W": rand(rng, 3), "V": rand(rng, 2)}, consts=consts, inputs={"x": rand(rng, 3)})
    result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
    label = "If 'If_y' > then_branch TopK 'top'"
    assert result.unsupported == {"W": [label]}
    assert "TopK" in result.reasons[label] or result.reasons[label] == "no rule"
    assert list(result.gradients) == ["V"]


def _loop_body(weight: str) -> onnx.GraphProto:
    """state <- tanh(state @ W + i), scan output: state * 2."""
    nodes = [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.array(2.0))),
             helper.make_node("MatMul", ["s_in", weight], ["m"]),
             helper.make_node("Cast", ["i"], ["fi"], to=TensorProto.DOUBLE),
             helper.make_node("Add", ["m", "fi"], ["a"]), helper.make_node("Tanh", ["a"], ["s_out"]),
             helper.make_node("Identity", ["c_in"], ["c_out"]),
             helper.make_node("Mul", ["s_out", "two"], ["scan_out"])]
    return helper.make_graph(
        nodes, "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("s_in", TensorProto.DOUBLE, None)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []), helper.make_empty_tensor_value_info("s_out"),
         helper.make_empty_tensor_value_info("scan_out")])


@pytest.mark.parametrize("trips", [1, 3])
def test_loop_with_a_constant_trip_count_is_unrolled(tmp_path, trips):
    """The final state and the stacked scan output both reach the loss; W (outer, read in the body) and S0."""
    rng = np.random.default_rng(4)
    nodes = [node("Loop", ["M", "", "S0"], ["sf", "st"], body=_loop_body("W")),
             node("ReduceSum", ["st", "ax0"], "st0", keepdims=0), node("Add", ["sf", "st0"], "y")]
    weights = {"W": rand(rng, 4, 4) * 0.5, "S0": rand(rng, 2, 4)}
    case = make_case(nodes, "y", weights, consts={"M": i64(trips), "ax0": i64(0)})
    check(case, tmp_path)


def _not_unrolled_because(case) -> str | None:
    """Why the case's Loop is left to the body rule (``vjp_loop``), or None when it is unrolled."""
    model = ir.from_proto(case.proto)
    loop = next(n for n in model.graph if n.op_type == "Loop")
    why = _refusal(loop)
    assert unroll_loops(model.graph) == (why is None)
    return why


def test_loop_beyond_the_unroll_limit_is_left_to_its_body_rule():
    rng = np.random.default_rng(5)
    nodes = [node("Loop", ["M", "", "S0"], ["sf", "st"], body=_loop_body("W"))]
    weights = {"W": rand(rng, 4, 4), "S0": rand(rng, 2, 4)}
    case = make_case(nodes, "sf", weights, consts={"M": i64(MAX_UNROLL + 1)})
    why = f"a trip count of {MAX_UNROLL + 1}, over the unroll limit of {MAX_UNROLL} steps"
    assert _not_unrolled_because(case) == why
    assert _not_unrolled_because(make_case(nodes, "sf", weights, consts={"M": i64(MAX_UNROLL)})) is None
    result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
    assert not result.unsupported and list(result.gradients) == ["W", "S0"]


def test_loop_with_a_data_dependent_condition_is_left_to_its_body_rule():
    rng = np.random.default_rng(6)
    body = _loop_body("W")
    body.node[5].CopyFrom(helper.make_node("Identity", ["c_in"], ["c_mid"]))
    body.node.append(helper.make_node("Not", ["c_mid"], ["c_out"]))
    nodes = [node("Loop", ["M", "", "S0"], ["sf", "st"], body=body)]
    case = make_case(nodes, "sf", {"W": rand(rng, 4, 4), "S0": rand(rng, 2, 4)}, consts={"M": i64(3)})
    assert "depends on the data" in _not_unrolled_because(case)


def _scan_body() -> onnx.GraphProto:
    """h <- tanh(h @ Wr + x_t), output h * x_t's first column."""
    nodes = [helper.make_node("MatMul", ["h_in", "Wr"], ["m"]), helper.make_node("Add", ["m", "x_t"], ["a"]),
             helper.make_node("Tanh", ["a"], ["h_out"]), helper.make_node("Mul", ["h_out", "x_t"], ["o"])]
    return helper.make_graph(
        nodes, "scan_body",
        [helper.make_tensor_value_info("h_in", TensorProto.DOUBLE, [2, 3]),
         helper.make_tensor_value_info("x_t", TensorProto.DOUBLE, [2, 3])],
        [helper.make_empty_tensor_value_info("h_out"), helper.make_empty_tensor_value_info("o")])


@pytest.mark.parametrize(("in_axis", "in_dir", "out_axis", "out_dir"), [(0, 0, 0, 0), (1, 1, 1, 0), (0, 0, -1, 1)],
                         ids=str)
def test_scan_with_a_static_length_is_unrolled(tmp_path, in_axis, in_dir, out_axis, out_dir):
    rng = np.random.default_rng(7)
    xs = rand(rng, 4, 2, 3) if in_axis == 0 else rand(rng, 2, 4, 3)
    nodes = [node("MatMul", ["X", "Wx"], "xw"),
             node("Scan", ["H0", "xw"], ["hf", "ys"], body=_scan_body(), num_scan_inputs=1,
                  scan_input_axes=[in_axis], scan_input_directions=[in_dir], scan_output_axes=[out_axis],
                  scan_output_directions=[out_dir]),
             node("ReduceSum", ["ys", "ax"], "ysum", keepdims=0), node("Add", ["hf", "ysum"], "y")]
    weights = {"Wx": rand(rng, 3, 3), "Wr": rand(rng, 3, 3) * 0.5, "H0": rand(rng, 2, 3)}
    ax = 0 if out_axis == 0 else (1 if out_axis == 1 else 2)
    check(make_case(nodes, "y", weights, consts={"ax": i64(ax)}, inputs={"X": xs}), tmp_path)


def _if_on_the_data_model(shared: bool) -> onnx.ModelProto:
    """``h = x @ W_pre`` then an If on ``sum(x) > 0`` (``shared``: on a scalar input given once for every sample)
    between two MatMuls."""
    rng = np.random.default_rng(30)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])]
    then = helper.make_graph([helper.make_node("MatMul", ["h", "W_then"], ["yt"])], "then", [],
                             [helper.make_tensor_value_info("yt", TensorProto.FLOAT, ["b", 8])])
    other = helper.make_graph([helper.make_node("MatMul", ["h", "W_else"], ["ye"])], "else", [],
                              [helper.make_tensor_value_info("ye", TensorProto.FLOAT, ["b", 8])])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])]
    if shared:
        inputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    nodes = [helper.make_node("MatMul", ["x", "W_pre"], ["h"]),
             helper.make_node("Greater", ["s" if shared else "t", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)]
    if not shared:
        nodes.insert(1, helper.make_node("ReduceSum", ["x"], ["t"], keepdims=0))
    inits = [w("W_pre", 16, 32), w("W_then", 32, 8), w("W_else", 32, 8),
             numpy_helper.from_array(np.array(0, np.float32), "zero")]
    proto = helper.make_model(helper.make_graph(nodes, "g", inputs, out, initializer=inits),
                              opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto


def test_which_control_flow_depends_on_the_samples():
    from bq_onnx.autodiff.vjp_control import control_on_samples

    on_data = ir.from_proto(_if_on_the_data_model(shared=False))
    assert control_on_samples(on_data.graph, {"x"}) == "If 'branch': its condition depends on the samples"
    assert control_on_samples(on_data.graph, set()) is None
    assert control_on_samples(ir.from_proto(_if_on_the_data_model(shared=True)).graph, {"x"}) is None
    body = _loop_body("W")  # condition passed through: the trip count is the input M's
    rng = np.random.default_rng(31)
    loop = make_case([node("Loop", ["M", "", "S"], ["sf", "st"], body=body)], "sf", {"W": rand(rng, 4, 4)},
                     inputs={"M": i64(3), "S": rand(rng, 2, 4)}, project=False)
    assert control_on_samples(ir.from_proto(loop.proto).graph, {"S"}) is None
    assert "trip count" in control_on_samples(ir.from_proto(loop.proto).graph, {"M"})
    body.node[5].CopyFrom(helper.make_node("ReduceSum", ["s_in"], ["total"], keepdims=0))
    body.node.append(helper.make_node("Greater", ["total", "zero"], ["c_out"]))
    body.initializer.append(numpy_helper.from_array(np.array(0.0), "zero"))
    exits = make_case([node("Loop", ["M", "", "S"], ["sf", "st"], body=body)], "sf", {"W": rand(rng, 4, 4)},
                      inputs={"M": i64(3), "S": rand(rng, 2, 4)}, project=False)
    assert control_on_samples(ir.from_proto(exits.proto).graph, {"S"}) == (
        "Loop 'Loop_sf': its condition, computed in the body, depends on the samples")
    assert control_on_samples(ir.from_proto(exits.proto).graph, {"M"}) is not None


def test_an_if_on_the_samples_is_estimated_one_sample_per_run():
    """Batched, the If would take one branch for the whole batch: the estimators run one sample per run, the same
    numbers as ``batch_size=1``. On a shared scalar it stays batched, with the same numbers too (its batched
    run failed before: a branch output kept the batch of 1 of an earlier specialisation)."""
    import bq_onnx
    from bq_onnx.graph import batch_major_weights
    from bq_onnx.model_io import load_model

    rng = np.random.default_rng(32)
    samples = [{"x": rng.standard_normal((1, 16)).astype(np.float32)} for _ in range(8)]
    assert 0 < sum(float(s["x"].sum()) > 0 for s in samples) < 8
    proto = _if_on_the_data_model(shared=False)
    default = bq_onnx.optimize(proto, calib=samples, bits=4, bits_payload=True)
    single = bq_onnx.optimize(proto, calib=samples, bits=4, bits_payload=True, batch_size=1)
    assert batch_major_weights(load_model(proto), default.context.weights, default.calibration) == {}
    for name in ("W_pre", "W_then", "W_else"):
        np.testing.assert_allclose(default.context.posterior.weights[name].precision,
                                   single.context.posterior.weights[name].precision, rtol=1e-4)
    shared = _if_on_the_data_model(shared=True)
    feeds = [{**s, "s": np.array(1.0, np.float32)} for s in samples]
    default = bq_onnx.optimize(shared, calib=feeds, bits=4, bits_payload=True)
    single = bq_onnx.optimize(shared, calib=feeds, bits=4, bits_payload=True, batch_size=1)
    assert "W_pre" in batch_major_weights(load_model(shared), default.context.weights, default.calibration)
    np.testing.assert_allclose(default.context.posterior.weights["W_pre"].precision,  # the batched one
                               single.context.posterior.weights["W_pre"].precision, rtol=1e-4)
