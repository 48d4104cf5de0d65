"""VJP rules of LSTM, GRU and RNN against float64 central finite differences of a numpy reference of the ops.

onnxruntime runs the recurrent ops in float32 and layout 0 only, so the grid is checked in two ways:

* every attribute combination (direction x optional inputs x layout x which outputs reach the loss, GRU
  ``linear_before_reset``) in float64: in the gradient model the forward op is replaced by constants holding the
  reference's outputs (the rule recomputes the recurrence with ``Scan`` and never reads them; only the loss and
  other rules' shapes do), so onnxruntime runs it in float64 and layout 1; the numpy reference is itself checked
  against onnxruntime's float32 forward (layout 0). h = 1e-6, tolerance 1e-6 of the gradient scale [3e-9];
* a few float32 layout-0 models through tests/test_autodiff.py's harness (finite differences of onnxruntime's own
  forward, and the gradient model in OpenVINO).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.autodiff.gradient import build_gradient_model
from tests.test_autodiff import check, make_case, node

SEQ, BATCH, INPUT, HIDDEN = 4, 2, 3, 4
LENS = np.array([4, 2], np.int32)
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
F64_TOL = 1e-6


# ----------------------------------------------------------------------------------------------- reference


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cell(op: str, x, h, c, w, r, b, p, lbr: int):
    """One step of one direction (ONNX operator definitions, default activations)."""
    hidden = r.shape[-1]
    wb, rb = (b[: b.size // 2], b[b.size // 2 :]) if b is not None else (0.0, 0.0)
    if op == "RNN":
        return np.tanh(x @ w.T + h @ r.T + wb + rb), None
    if op == "GRU":
        wb = np.zeros(3 * hidden) + wb
        rb = np.zeros(3 * hidden) + rb
        z = _sigmoid(x @ w[:hidden].T + h @ r[:hidden].T + wb[:hidden] + rb[:hidden])
        rg = _sigmoid(x @ w[hidden : 2 * hidden].T + h @ r[hidden : 2 * hidden].T + wb[hidden : 2 * hidden]
                      + rb[hidden : 2 * hidden])
        if lbr:
            hc = np.tanh(x @ w[2 * hidden :].T + rg * (h @ r[2 * hidden :].T + rb[2 * hidden :]) + wb[2 * hidden :])
        else:
            hc = np.tanh(x @ w[2 * hidden :].T + (rg * h) @ r[2 * hidden :].T + rb[2 * hidden :] + wb[2 * hidden :])
        return (1 - z) * hc + z * h, None
    pre = x @ w.T + h @ r.T + wb + rb
    ai, ao, af, ac = np.split(pre, 4, axis=-1)
    pi, po, pf = np.split(p, 3) if p is not None else (0.0, 0.0, 0.0)
    i, f = _sigmoid(ai + pi * c), _sigmoid(af + pf * c)
    c_new = f * c + i * np.tanh(ac)
    o = _sigmoid(ao + po * c_new)
    return o * np.tanh(c_new), c_new


def reference(op: str, values: dict[str, np.ndarray], attrs: dict) -> list[np.ndarray]:
    """Y, Y_h (and LSTM's Y_c) of the op, float64."""
    layout = attrs.get("layout", 0)
    x, w, r = values["X"], values["W"], values["R"]
    get = values.get
    h0, c0 = get("initial_h"), get("initial_c")
    if layout:
        x = x.transpose(1, 0, 2)
        h0 = None if h0 is None else h0.transpose(1, 0, 2)
        c0 = None if c0 is None else c0.transpose(1, 0, 2)
    seq, batch = x.shape[:2]
    dirs, hidden = w.shape[0], r.shape[-1]
    lens = get("sequence_lens")
    y = np.zeros((seq, dirs, batch, hidden))
    y_h, y_c = np.zeros((dirs, batch, hidden)), np.zeros((dirs, batch, hidden))
    for d in range(dirs):
        backwards = attrs.get("direction", "forward") == "reverse" or d == 1
        h = np.zeros((batch, hidden)) if h0 is None else h0[d]
        c = np.zeros((batch, hidden)) if c0 is None else c0[d]
        b = None if get("B") is None else get("B")[d]
        p = None if get("P") is None else get("P")[d]
        for t in reversed(range(seq)) if backwards else range(seq):
            h_new, c_new = _cell(op, x[t], h, c, w[d], r[d], b, p, attrs.get("linear_before_reset", 0))
            valid = np.ones((batch, 1), bool) if lens is None else (t < lens)[:, None]
            h = np.where(valid, h_new, h)
            c = c if c_new is None else np.where(valid, c_new, c)
            y[t, d] = np.where(valid, h_new, 0.0)
        y_h[d], y_c[d] = h, c
    if layout:
        y, y_h, y_c = y.transpose(2, 0, 1, 3), y_h.transpose(1, 0, 2), y_c.transpose(1, 0, 2)
    return [y, y_h, y_c] if op == "LSTM" else [y, y_h]


# ----------------------------------------------------------------------------------------------- cases


INPUTS = {"LSTM": ["X", "W", "R", "B", "sequence_lens", "initial_h", "initial_c", "P"],
          "GRU": ["X", "W", "R", "B", "sequence_lens", "initial_h"],
          "RNN": ["X", "W", "R", "B", "sequence_lens", "initial_h"]}
OPTIONAL = {"none": set(), "B": {"B"}, "lens": {"sequence_lens"}, "states": {"initial_h", "initial_c"},
            "P": {"P"}, "all": {"B", "sequence_lens", "initial_h", "initial_c", "P"}}


def _values(op: str, present: set[str], attrs: dict, seed: int, dtype=np.float64) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    dirs = 2 if attrs.get("direction") == "bidirectional" else 1
    gates = GATES[op]
    batch_first = attrs.get("layout", 0) == 1
    state = (BATCH, dirs, HIDDEN) if batch_first else (dirs, BATCH, HIDDEN)
    shapes = {"X": (BATCH, SEQ, INPUT) if batch_first else (SEQ, BATCH, INPUT),
              "W": (dirs, gates * HIDDEN, INPUT), "R": (dirs, gates * HIDDEN, HIDDEN), "B": (dirs, 2 * gates * HIDDEN),
              "initial_h": state, "initial_c": state, "P": (dirs, 3 * HIDDEN)}
    values = {}
    for name in INPUTS[op]:
        if name in ("X", "W", "R") or name in present:
            if name == "sequence_lens":
                values[name] = LENS
            else:
                scale = 1.0 if name in ("X", "initial_h", "initial_c") else 0.5
                values[name] = (scale * rng.standard_normal(shapes[name])).astype(dtype)
    return values


def _model(op: str, values: dict[str, np.ndarray], attrs: dict, outputs: tuple[int, ...], seed: int
           ) -> tuple[onnx.ModelProto, list[np.ndarray]]:
    """The op (every input an initializer) and ``loss = sum_k sum(out_k * R_k)`` over the chosen outputs;
    returns the model and the projections R_k."""
    names = [n if n in values else "" for n in INPUTS[op]]
    while names and not names[-1]:
        names.pop()
    out_names = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    nodes = [helper.make_node(op, names, out_names, name="rnn", hidden_size=HIDDEN, **attrs)]
    ref = reference(op, {k: v.astype(np.float64) for k, v in values.items()}, attrs)
    rng = np.random.default_rng(seed + 1000)
    dtype = values["X"].dtype
    projections, inits, terms = [], [], []
    for k in outputs:
        proj = rng.standard_normal(ref[k].shape)
        projections.append(proj)
        inits.append(numpy_helper.from_array(proj.astype(dtype), f"R{k}"))
        nodes += [helper.make_node("Mul", [out_names[k], f"R{k}"], [f"m{k}"]),
                  helper.make_node("ReduceSum", [f"m{k}"], [f"s{k}"], keepdims=0)]
        terms.append(f"s{k}")
    nodes.append(helper.make_node("Sum", terms, ["loss"]))
    inits += [numpy_helper.from_array(v, k) for k, v in values.items()]
    graph = helper.make_graph(nodes, "rnn", [], [helper.make_tensor_value_info("loss", helper.np_dtype_to_tensor_dtype(
        dtype), [])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto, projections


def _loss(op, values, attrs, outputs, projections) -> float:
    ref = reference(op, values, attrs)
    return float(sum(np.sum(ref[k] * p) for k, p in zip(outputs, projections)))


def _finite_differences(op, values, attrs, outputs, projections, name, h=1e-6) -> np.ndarray:
    grad = np.zeros_like(values[name])
    for i in range(grad.size):
        plus, minus = dict(values), dict(values)
        plus[name], minus[name] = values[name].copy(), values[name].copy()
        plus[name].flat[i] += h
        minus[name].flat[i] -= h
        grad.flat[i] = (_loss(op, plus, attrs, outputs, projections)
                        - _loss(op, minus, attrs, outputs, projections)) / (2 * h)
    return grad


def _gradients_with_reference_forward(proto: onnx.ModelProto, wrt: list[str], forward: list[np.ndarray]
                                      ) -> dict[str, np.ndarray]:
    """The gradient model with the forward op replaced by ``Constant`` nodes holding its reference outputs,
    which lets onnxruntime run float64 and layout 1 (the rule itself never reads the op's outputs)."""
    import onnxruntime as ort

    result = build_gradient_model(ir.from_proto(proto), "loss", wrt)
    assert not result.unsupported, result.unsupported
    out = ir.to_proto(result.model)
    (index,) = [i for i, n in enumerate(out.graph.node) if n.op_type in GATES]
    op_node = out.graph.node[index]
    consts = [helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value))
              for name, value in zip(op_node.output, forward)]
    del out.graph.node[index]
    for i, const in enumerate(consts):
        out.graph.node.insert(index + i, const)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(out.SerializeToString(), options, providers=["CPUExecutionProvider"])
    by_name = dict(zip([o.name for o in out.graph.output], session.run(None, {})))
    return {w: by_name[result.gradients[w]] for w in wrt}


def _grid(op: str) -> list:
    optional = ["none", "B", "lens", "states", "all"] + (["P"] if op == "LSTM" else [])
    lbr = [0, 1] if op == "GRU" else [0]
    cases = []
    for direction, layout, opt, linear in itertools.product(["forward", "reverse", "bidirectional"], [0, 1],
                                                            optional, lbr):
        attrs = {"direction": direction, "layout": layout}
        if op == "GRU":
            attrs["linear_before_reset"] = linear
        cases.append(pytest.param(op, attrs, opt, id=f"{op}-{direction}-layout{layout}-{opt}"
                                  + (f"-lbr{linear}" if op == "GRU" else "")))
    return cases


def _outputs(op: str, opt: str) -> tuple[int, ...]:
    """Every output reaches the loss, except in the ``states`` cases (only the last states) and the ``B`` cases
    (only Y), so that absent output gradients are covered too."""
    if opt == "states":
        return (1, 2) if op == "LSTM" else (1,)
    if opt == "B":
        return (0,)
    return (0, 1, 2) if op == "LSTM" else (0, 1)


@pytest.mark.parametrize(("op", "attrs", "opt"), [*_grid("LSTM"), *_grid("GRU"), *_grid("RNN")])
def test_recurrent_gradients_float64(op, attrs, opt):
    seed = len(op) + len(opt) + attrs["layout"]
    values = _values(op, OPTIONAL[opt], attrs, seed)
    outputs = _outputs(op, opt)
    proto, projections = _model(op, values, attrs, outputs, seed)
    wrt = [n for n in values if n != "sequence_lens"]
    got = _gradients_with_reference_forward(proto, wrt, reference(op, values, attrs))
    for name in wrt:
        fd = _finite_differences(op, values, attrs, outputs, projections, name)
        assert got[name].shape == values[name].shape and got[name].dtype == np.float64
        scale = max(np.abs(fd).max(), 1e-12)
        error = np.abs(got[name] - fd).max() / scale
        assert error <= F64_TOL, f"{name}: error {error:.2e}\nautodiff {got[name].ravel()}\nfd {fd.ravel()}"


@pytest.mark.parametrize("op", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_reference_matches_onnxruntime(op, direction):
    """The numpy reference computes what onnxruntime computes (float32, layout 0, every optional input)."""
    import onnxruntime as ort

    attrs = {"direction": direction}
    values = _values(op, OPTIONAL["all"], attrs, 7, dtype=np.float32)
    values["sequence_lens"] = LENS
    names = [n if n in values else "" for n in INPUTS[op]]
    outs = ["Y", "Y_h", "Y_c"][: 3 if op == "LSTM" else 2]
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, hidden_size=HIDDEN, **attrs)], "g", [],
        [helper.make_empty_tensor_value_info(o) for o in outs],
        initializer=[numpy_helper.from_array(v, k) for k, v in values.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    want = reference(op, {k: v.astype(np.float64) for k, v in values.items()}, attrs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5)


# ----------------------------------------------------------------------------------------------- float32, harness


@pytest.mark.parametrize("symbolic", [False, True], ids=["static", "symbolic"])
@pytest.mark.parametrize(("op", "extra"), [("LSTM", {}), ("GRU", {"linear_before_reset": 1}),
                                           ("GRU", {"linear_before_reset": 0}), ("RNN", {})], ids=str)
def test_recurrent_float32_onnxruntime_and_openvino(tmp_path, op, extra, symbolic):
    """Bidirectional through the shared harness: finite differences of onnxruntime's own float32 forward, and
    the gradient model in OpenVINO. Static shapes: every optional input. A symbolic sequence length and batch:
    no initial states (OpenVINO 2026.4 cannot compile the forward op itself with constant initial states and
    a symbolic batch; the gradient part compiles)."""
    attrs = {"direction": "bidirectional", **extra}
    present = OPTIONAL["all"] - ({"initial_h", "initial_c"} if symbolic else set())
    values = _values(op, present, attrs, 11, dtype=np.float32)
    x = values.pop("X")
    values.pop("sequence_lens")
    values["R_rec"] = values.pop("R")  # the harness's projection is named R
    names = [n if n in values or n == "X" else "" for n in INPUTS[op]]
    names[0], names[2], names[4] = "x", "R_rec", "lens"
    while not names[-1]:
        names.pop()
    out = ["y", "y_h", "y_c"][: 3 if op == "LSTM" else 2]
    nodes = [node(op, names, out, hidden_size=HIDDEN, **attrs), node("Add", ["y", "y_h"], "yy")]
    if op == "LSTM":  # the last states broadcast over Y's sequence axis
        nodes.append(node("Add", ["yy", "y_c"], "yyc"))
    shape = ["T", "N", INPUT] if symbolic else list(x.shape)
    case = make_case(nodes, "yyc" if op == "LSTM" else "yy", values, consts={"lens": LENS},
                     inputs={"x": x}, symbolic={"x": shape})
    check(case, tmp_path, dtype="f32")


# ----------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(("op", "attrs"), [
    ("LSTM", {"clip": 1.0}), ("LSTM", {"activations": ["Relu", "Tanh", "Tanh"]}), ("LSTM", {"input_forget": 1}),
    ("GRU", {"activations": ["Sigmoid", "Relu"]}), ("RNN", {"activations": ["Relu"]}), ("RNN", {"clip": 3.0}),
], ids=str)
def test_unsupported_attributes_are_reported(op, attrs):
    """Refused attributes block the op's weights (reported with the node, so they fall back), no exception."""
    values = _values(op, set(), {}, 3)
    nodes = [helper.make_node(op, ["X", "W", "R"], ["Y"], name="rnn", hidden_size=HIDDEN, **attrs),
             helper.make_node("ReduceSum", ["Y"], ["loss"], keepdims=0)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info("loss", TensorProto.DOUBLE, [])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in values.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    result = build_gradient_model(ir.from_proto(proto), "loss", ["W", "R"])
    assert result.unsupported == {"W": [f"{op} 'rnn'"], "R": [f"{op} 'rnn'"]}


# ----------------------------------------------------------------------------------------------- end to end


def test_optimize_with_calibration_gives_lstm_weights_the_laplace_posterior(tmp_path, capsys):
    """``bq-onnx optimize --calib`` on a bidirectional LSTM (batch-first around the op, symbolic batch): W and R
    get the Laplace posterior from gradients, no longer the ``activations`` fallback (issue 14)."""
    import json

    from bq_onnx.cli import main
    from tests.test_every_weight import recurrent_model

    path, out, calib = tmp_path / "lstm.onnx", tmp_path / "lstm.bq.onnx", tmp_path / "calib.npz"
    onnx.save(recurrent_model("LSTM", batch_first=True), str(path))
    np.savez(calib, x=np.random.default_rng(5).standard_normal((8, 5, 24)).astype(np.float32))
    code = main([str(a) for a in ["optimize", path, "-o", out, "--calib", calib, "--bits", "6", "--json", "-q"]])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    sources = {layer["name"]: layer["source"] for layer in report["posterior"]["layers"]}
    assert sources == {"W": "laplace", "R": "laplace"}
