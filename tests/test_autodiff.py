"""Reverse-mode autodiff: every VJP rule and whole models against central finite differences.

How the checks work: a test builds a small graph ending in ``y``; the harness appends ``proj = y * R`` with a
random constant ``R`` so that the loss ``sum(y * R)`` (non-scalar ``proj``, summed by the pass) has a generic
gradient. Finite differences perturb weight elements by +-h (all elements of small tensors; for bigger ones the
half with the largest gradients and a seeded random rest), run the *forward* model in onnxruntime and sum its
loss output in float64. The error measure is ``max |autodiff - fd| / max |fd|`` over the checked elements of
each weight.

Tolerances (the measured worst cases are in brackets):

* float64 end to end: h = 1e-5, tolerance 1e-4 [4e-8].
* ops onnxruntime runs in float32 only (Conv, ConvTranspose, pools, Erf/Gelu, LeakyRelu, HardSigmoid, HardSwish):
  h = 1e-2, tolerance 5e-4 [4e-5]. Float32 rounding of the forward (~6e-8 relative) divided by 2h is ~1e-5 of
  the gradient scale; the h^2 term vanishes for piecewise-linear ops and stays below 1e-4 for smooth ones.
* whole models in float32: the documented tolerances of their tests (smaller h to stay clear of Relu/MaxPool
  switches, so more float32 noise).

Every gradient model also runs in OpenVINO (f32 inference precision) twice: as built (constant weights, which
OpenVINO folds at compile time) and with the weights fed as inputs (its CPU kernels compute everything); both
must agree with onnxruntime to 1e-3 of the gradient scale.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import openvino
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.autodiff.gradient import GradientGraph, build_gradient_model, supported_ops
from bq_onnx.passes.autodiff import AutodiffPass
from bq_onnx.runtimes.ov import EXACT_CONFIG
from tests.conftest import MODELS

F64_TOL, F32_TOL, OV_TOL = 1e-4, 5e-4, 1e-3


# ----------------------------------------------------------------------------------------------- harness


@dataclasses.dataclass
class Case:
    proto: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    wrt: list[str]
    loss: str = "proj"


def _elem(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(array.dtype)


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def make_case(
    nodes: list[onnx.NodeProto],
    out: str,
    weights: dict[str, np.ndarray],
    *,
    consts: dict[str, np.ndarray] | None = None,
    inputs: dict[str, np.ndarray] | None = None,
    symbolic: dict[str, list] | None = None,
    seed: int = 0,
    project: bool = True,
) -> Case:
    """A model computing ``out`` from ``weights`` (differentiated initializers), ``consts`` (other initializers)
    and ``inputs`` (graph inputs, shapes from ``symbolic`` where given), followed by ``proj = out * R``."""
    consts, inputs, symbolic = consts or {}, inputs or {}, symbolic or {}
    inits = [numpy_helper.from_array(v, k) for k, v in {**weights, **consts}.items()]
    graph_inputs = [
        helper.make_tensor_value_info(k, _elem(v), symbolic.get(k, list(v.shape))) for k, v in inputs.items()
    ]

    def model(extra_nodes, extra_inits, output):
        graph = helper.make_graph(
            [*nodes, *extra_nodes],
            "t",
            graph_inputs,
            [helper.make_empty_tensor_value_info(output)],
            initializer=[*inits, *extra_inits],
        )
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        proto.ir_version = 10
        return proto

    if not project:
        return Case(model([], [], out), dict(inputs), list(weights), loss=out)
    value = _session(model([], [], out)).run([out], inputs)[0]
    r = np.random.default_rng(seed + 1000).standard_normal(value.shape).astype(value.dtype)
    proto = model([helper.make_node("Mul", [out, "R"], ["proj"])], [numpy_helper.from_array(r, "R")], "proj")
    return Case(proto, dict(inputs), list(weights))


def forward_with_weight_inputs(case: Case) -> ort.InferenceSession:
    """The forward model with the weights also declared as inputs, so perturbed copies can be fed."""
    proto = onnx.ModelProto()
    proto.CopyFrom(case.proto)
    for init in proto.graph.initializer:
        if init.name in case.wrt:
            proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    return _session(proto)


def finite_difference_check(
    case: Case, grads: dict[str, np.ndarray], *, h: float, tol: float, samples: int = 12, seed: int = 0
) -> dict[str, float]:
    """Central differences of ``sum(loss)`` for a seeded subset of each weight's elements; returns the errors."""
    session = forward_with_weight_inputs(case)
    weights = {i.name: numpy_helper.to_array(i) for i in case.proto.graph.initializer if i.name in case.wrt}
    rng = np.random.default_rng(seed)

    def loss(name, value):
        out = session.run([case.loss], {**case.feeds, name: value})[0]
        return float(np.sum(out, dtype=np.float64))

    errors = {}
    for name, w in weights.items():
        if w.size <= samples:
            picks = np.arange(w.size)
        else:  # the largest gradients (a signal well above float32 noise) and a random rest
            largest = np.argsort(-np.abs(grads[name]).ravel(), kind="stable")[: samples // 2]
            rest = np.setdiff1d(np.arange(w.size), largest)
            picks = np.concatenate([largest, rng.choice(rest, samples - len(largest), replace=False)])
        fd, ad = [], []
        for i in picks:
            plus, minus = w.copy(), w.copy()
            plus.flat[i] += h
            minus.flat[i] -= h
            step = float(plus.flat[i]) - float(minus.flat[i])  # the representable perturbation
            fd.append((loss(name, plus) - loss(name, minus)) / step)
            ad.append(float(grads[name].flat[i]))
        fd, ad = np.array(fd), np.array(ad)
        scale = max(np.abs(fd).max(), 1e-12)
        errors[name] = float(np.abs(fd - ad).max() / scale)
        assert errors[name] <= tol, f"{name}: autodiff {ad} vs finite differences {fd} (error {errors[name]:.2e})"
    return errors


def run_gradient_model(result: GradientGraph, feeds: dict) -> dict[str, np.ndarray]:
    proto = ir.to_proto(result.model)
    outs = _session(proto).run(None, feeds)
    return dict(zip([o.name for o in proto.graph.output], outs))


def openvino_outputs(
    result: GradientGraph, feeds: dict, tmp_path, *, weights_fed: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Run the gradient model in OpenVINO (f32 inference precision); outputs by position, since OpenVINO merges
    tensor names through eliminated ops (``get_any_name`` may return another name of the same tensor).

    OpenVINO folds whatever is constant at compile time with its reference implementations; ``weights_fed``
    turns those initializers into plain inputs (OpenVINO ignores an input that also has an initializer) so
    that its CPU kernels compute the gradient ops.
    """
    proto = ir.to_proto(result.model)
    feeds = dict(feeds)
    if weights_fed:
        kept = [i for i in proto.graph.initializer if i.name not in weights_fed]
        for init in proto.graph.initializer:
            if init.name in weights_fed:
                proto.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(kept)
        feeds.update(weights_fed)
    path = tmp_path / ("grad_fed.onnx" if weights_fed else "grad.onnx")
    onnx.save(proto, str(path))
    core = openvino.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", EXACT_CONFIG)
    ordered = [np.array(feeds[i.name]) for i in proto.graph.input]  # by position (copies: writable)
    results = compiled(ordered)
    return {o.name: np.array(results[port]) for o, port in zip(proto.graph.output, compiled.outputs)}


def check(
    case: Case,
    tmp_path,
    *,
    dtype: str = "f64",
    openvino: bool = True,
    samples: int = 12,
    h: float | None = None,
    tol: float | None = None,
) -> tuple[GradientGraph, dict[str, float]]:
    """Build the gradient model, compare it with finite differences (and OpenVINO), return the errors."""
    model = ir.from_proto(case.proto)
    before = ir.to_proto(model).SerializeToString()
    result = build_gradient_model(model, case.loss, case.wrt)
    assert ir.to_proto(model).SerializeToString() == before, "the input model was modified"
    assert not result.unsupported, result.unsupported
    assert list(result.gradients) == case.wrt
    outs = run_gradient_model(result, case.feeds)
    grads = {w: outs[name] for w, name in result.gradients.items()}
    for init in case.proto.graph.initializer:
        if init.name in grads:
            expected = numpy_helper.to_array(init)
            assert grads[init.name].shape == expected.shape and grads[init.name].dtype == expected.dtype
    default_h, default_tol = (1e-5, F64_TOL) if dtype == "f64" else (1e-2, F32_TOL)
    h, tol = h or default_h, tol or default_tol
    errors = finite_difference_check(case, grads, h=h, tol=tol, samples=samples)
    if openvino:
        weights = {i.name: numpy_helper.to_array(i) for i in case.proto.graph.initializer if i.name in case.wrt}
        for fed in (None, weights):
            ov = openvino_outputs(result, case.feeds, tmp_path, weights_fed=fed)
            for w, name in result.gradients.items():
                scale = max(np.abs(grads[w]).max(), 1e-12)
                diff = np.abs(ov[name].astype(np.float64) - grads[w]).max() / scale
                where = "weights as inputs" if fed else "constant weights"
                assert diff <= OV_TOL, f"OpenVINO ({where}) differs from onnxruntime on {w}: {diff:.2e}"
    return result, errors


def rand(rng: np.random.Generator, *shape: int, dtype=np.float64, low: float | None = None) -> np.ndarray:
    x = rng.standard_normal(shape)
    if low is not None:
        x = low + np.abs(x)
    return x.astype(dtype)


def node(op: str, inputs: list[str], outputs: list[str] | str, **attrs) -> onnx.NodeProto:
    outputs = [outputs] if isinstance(outputs, str) else outputs
    return helper.make_node(op, inputs, outputs, name=f"{op}_{outputs[0]}", **attrs)


def i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


# ----------------------------------------------------------------------------------------------- elementwise

BINARY_SHAPES = [((3, 1, 4), (2, 1)), ((2, 3), (3,)), ((1, 3, 1), (2, 1, 4)), ((4,), (2, 3, 4)), ((), (2, 3))]


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shapes", BINARY_SHAPES, ids=str)
def test_binary_broadcasting(tmp_path, op, shapes):
    """Both operands differentiated through numpy broadcasting in both directions, rank changes included."""
    rng = np.random.default_rng(len(op) + len(shapes[0]))
    a = rand(rng, *shapes[0])
    b = rand(rng, *shapes[1], low=0.5) if op == "Div" else rand(rng, *shapes[1])
    check(make_case([node(op, ["A", "B"], "y")], "y", {"A": a, "B": b}), tmp_path)


UNARY_F64 = {
    "Neg": None,
    "Relu": None,
    "Sigmoid": None,
    "Tanh": None,
    "Exp": None,
    "Abs": None,
    "Identity": None,
    "Log": 0.2,
    "Sqrt": 0.2,
    "Reciprocal": 0.3,
}


@pytest.mark.parametrize("op", sorted(UNARY_F64))
def test_unary_float64(tmp_path, op):
    rng = np.random.default_rng(3)
    w = rand(rng, 3, 5, low=UNARY_F64[op])
    check(make_case([node(op, ["W"], "y")], "y", {"W": w}), tmp_path)


UNARY_F32 = {
    "LeakyRelu": {"alpha": 0.3},
    "HardSigmoid": {"alpha": 0.3, "beta": 0.4},
    "HardSwish": {},
    "Erf": {},
    "Gelu": {},
    "Gelu_tanh": {"approximate": "tanh"},
}


@pytest.mark.parametrize("op", sorted(UNARY_F32))
def test_unary_float32(tmp_path, op):
    """onnxruntime has these in float32 only (float32 tolerance, see the module docstring)."""
    rng = np.random.default_rng(4)
    w = (rng.uniform(-4, 4, size=(4, 6))).astype(np.float32)
    w[np.abs(w) < 0.05] = 0.5  # keep finite differences away from kinks
    w[np.abs(np.abs(w) - 3) < 0.05] = 1.0
    check(make_case([node(op.split("_")[0], ["W"], "y", **UNARY_F32[op])], "y", {"W": w}), tmp_path, dtype="f32")


def test_pow_constant_and_differentiated_exponent(tmp_path):
    rng = np.random.default_rng(5)
    x = rand(rng, 2, 3, low=0.5)
    nodes = [
        node("Pow", ["X", "p"], "a"),
        node("Pow", ["X", "q"], "b"),
        node("Pow", ["X", "E"], "c"),
        node("Add", ["a", "b"], "ab"),
        node("Add", ["ab", "c"], "y"),
    ]
    consts = {"p": np.array(3.0), "q": np.array(0.5, dtype=np.float32)}
    check(make_case(nodes, "y", {"X": x, "E": rand(rng, 3)}, consts=consts), tmp_path)


def test_clip_with_differentiated_bounds(tmp_path):
    rng = np.random.default_rng(6)
    x = rand(rng, 4, 5) * 2
    lo, hi = np.array(-0.7), np.array(0.9)
    x[np.abs(x - lo) < 0.05] += 0.2
    x[np.abs(x - hi) < 0.05] += 0.2
    nodes = [node("Clip", ["X", "lo", "hi"], "a"), node("Clip", ["X", "", "hi"], "b"), node("Add", ["a", "b"], "y")]
    check(make_case(nodes, "y", {"X": x, "lo": lo, "hi": hi}), tmp_path)


def test_where_broadcasts_both_branches(tmp_path):
    rng = np.random.default_rng(7)
    cond = rng.random((2, 1, 4)) > 0.5
    nodes = [node("Where", ["c", "A", "B"], "y")]
    check(make_case(nodes, "y", {"A": rand(rng, 3, 1), "B": rand(rng, 4)}, consts={"c": cond}), tmp_path)


def test_expand_and_cast(tmp_path):
    """Expand sums back over new and stretched axes; a float32 weight cast to float64 gets a float32 gradient."""
    rng = np.random.default_rng(8)
    nodes = [
        node("Expand", ["A", "shape"], "e"),
        node("Cast", ["W32"], "w64", to=TensorProto.DOUBLE),
        node("Mul", ["e", "w64"], "y"),
    ]
    weights = {"A": rand(rng, 3, 1), "W32": rand(rng, 4, dtype=np.float32)}
    result, _ = check(make_case(nodes, "y", weights, consts={"shape": i64(2, 3, 4)}), tmp_path)
    assert result.model.graph.outputs[2].dtype == ir.DataType.FLOAT


def test_dropout_is_identity_in_inference(tmp_path):
    rng = np.random.default_rng(9)
    nodes = [node("Dropout", ["W"], "a", seed=1), node("Dropout", ["a", "ratio", "train"], "y")]
    consts = {"ratio": np.array(0.5), "train": np.array(False)}
    check(make_case(nodes, "y", {"W": rand(rng, 3, 4)}, consts=consts), tmp_path)


# ----------------------------------------------------------------------------------------------- linear algebra

MATMUL_SHAPES = [
    ((2, 3, 4), (4, 5)),
    ((4,), (2, 4, 5)),
    ((2, 1, 3, 4), (3, 4, 2)),
    ((4,), (4,)),
    ((3, 4), (4,)),
    ((5, 2, 3), (5, 3, 2)),
]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul(tmp_path, shapes):
    """Batched, broadcast batch axes on either side, and 1-D operands."""
    rng = np.random.default_rng(len(shapes[0]) * 7 + len(shapes[1]))
    weights = {"A": rand(rng, *shapes[0]), "B": rand(rng, *shapes[1])}
    check(make_case([node("MatMul", ["A", "B"], "y")], "y", weights), tmp_path)


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [(5,), (1, 5), (3, 1), (3, 5), None], ids=str)
def test_gemm(tmp_path, trans_a, trans_b, c_shape):
    rng = np.random.default_rng(trans_a * 2 + trans_b)
    a = rand(rng, *((4, 3) if trans_a else (3, 4)))
    b = rand(rng, *((5, 4) if trans_b else (4, 5)))
    weights = {"A": a, "B": b} | ({} if c_shape is None else {"C": rand(rng, *c_shape)})
    gemm = node("Gemm", list(weights), "y", alpha=0.7, beta=-1.3, transA=trans_a, transB=trans_b)
    check(make_case([gemm], "y", weights), tmp_path)


# ----------------------------------------------------------------------------------------------- shapes


def test_reshape_flatten_squeeze_unsqueeze_transpose(tmp_path):
    """Reshape with 0 and -1 entries; Transpose with and without perm."""
    rng = np.random.default_rng(10)
    nodes = [
        node("Reshape", ["W", "s1"], "a"),  # [2,3,4] -> [2,12]
        node("Flatten", ["V"], "b", axis=2),  # [2,3,2,2] -> [6,4]
        node("Transpose", ["b"], "bt"),  # -> [4,6]
        node("Unsqueeze", ["bt", "ax0"], "c"),  # -> [1,4,6]
        node("Squeeze", ["c", "ax0"], "d"),  # -> [4,6]
        node("Reshape", ["d", "s2"], "e"),  # -> [2, 12]
        node("Transpose", ["a"], "at", perm=[1, 0]),
        node("Transpose", ["e"], "et", perm=[1, 0]),
        node("Mul", ["at", "et"], "y"),
    ]
    weights = {"W": rand(rng, 2, 3, 4), "V": rand(rng, 2, 3, 2, 2)}
    consts = {"s1": i64(0, -1), "s2": i64(2, -1), "ax0": i64(0)}
    check(make_case(nodes, "y", weights, consts=consts), tmp_path)


@pytest.mark.parametrize("axis", [1, -1])
def test_concat(tmp_path, axis):
    rng = np.random.default_rng(11)
    weights = {"A": rand(rng, 2, 3), "C": rand(rng, 2, 4)}
    consts = {"B": rand(rng, 2, 2)}
    check(make_case([node("Concat", ["A", "B", "C"], "y", axis=axis)], "y", weights, consts=consts), tmp_path)


@pytest.mark.parametrize("form", ["sizes", "num_outputs", "num_outputs_uneven"])
def test_split_with_unused_output(tmp_path, form):
    """Outputs that do not reach the loss contribute zeros. OpenVINO cannot read a forward Split whose
    ``num_outputs`` does not divide the axis (its own limitation), so that case runs in onnxruntime only."""
    rng = np.random.default_rng(12)
    width = 7 if form != "num_outputs" else 6
    if form == "sizes":
        split = node("Split", ["W", "sizes"], ["p", "q", "r"], axis=1)
        consts = {"sizes": i64(2, 1, 4)}
    else:
        split = node("Split", ["W"], ["p", "q", "r"], axis=-1, num_outputs=3)  # 2,2,2 or 3,3,1
        consts = {}
    nodes = [split, node("ReduceSum", ["p", "one"], "ps", keepdims=1), node("Mul", ["ps", "r"], "y")]
    consts["one"] = i64(1)
    case = make_case(nodes, "y", {"W": rand(rng, 3, width)}, consts=consts)
    check(case, tmp_path, openvino=form != "num_outputs_uneven")


SLICES = [
    ((1, -1), (100, -100), (0, 1), (1, -2)),  # clamped end, negative step
    ((-3,), (-1,), (-1,), (1,)),  # negative start/end
    ((0, 5), (4, 0), (2, 1), (2, -2)),  # strided both ways
]


@pytest.mark.parametrize("spec", SLICES, ids=str)
def test_slice(tmp_path, spec):
    starts, ends, axes, steps = (i64(*v) for v in spec)
    rng = np.random.default_rng(13)
    consts = {"starts": starts, "ends": ends, "axes": axes, "steps": steps}
    nodes = [node("Slice", ["W", "starts", "ends", "axes", "steps"], "y")]
    check(make_case(nodes, "y", {"W": rand(rng, 5, 6, 4)}, consts=consts), tmp_path)


@pytest.mark.parametrize(
    ("axis", "indices"),
    [(0, i64(1, 3, 1, 0)), (1, np.array([[0, -1], [2, 2]], np.int32)), (-1, np.array(-2, np.int64)), (0, i64(2))],
    ids=["repeats", "2d-negative-int32", "scalar-last-axis", "one"],
)
def test_gather(tmp_path, axis, indices):
    """Repeated indices accumulate; negative indices, any axis, scalar indices."""
    rng = np.random.default_rng(14)
    nodes = [node("Gather", ["W", "idx"], "y", axis=axis)]
    check(make_case(nodes, "y", {"W": rand(rng, 4, 3, 5)}, consts={"idx": indices}), tmp_path)


@pytest.mark.parametrize(
    ("op", "axes", "attrs"),
    [
        ("ReduceSum", (1,), {"keepdims": 0}),
        ("ReduceSum", (0, -1), {"keepdims": 1}),
        ("ReduceSum", None, {"keepdims": 0}),
        ("ReduceSum", None, {"noop_with_empty_axes": 1}),
        ("ReduceMean", (-1, 0), {"keepdims": 0}),
        ("ReduceMean", (1,), {"keepdims": 1}),
        ("ReduceMean", None, {"keepdims": 1}),
    ],
    ids=str,
)
def test_reductions(tmp_path, op, axes, attrs):
    rng = np.random.default_rng(15)
    inputs = ["W"] if axes is None else ["W", "axes"]
    consts = {} if axes is None else {"axes": i64(*axes)}
    check(make_case([node(op, inputs, "y", **attrs)], "y", {"W": rand(rng, 2, 3, 4)}, consts=consts), tmp_path)


# ----------------------------------------------------------------------------------------------- nn


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("axis", [1, -1])
def test_softmax(tmp_path, op, axis):
    rng = np.random.default_rng(16)
    check(make_case([node(op, ["W"], "y", axis=axis)], "y", {"W": rand(rng, 2, 3, 4)}), tmp_path)


@pytest.mark.parametrize(
    ("axis", "scale_shape", "bias", "extra_outputs"),
    [(-1, (4,), True, False), (1, (3, 4), True, True), (-2, (1, 4), False, False), (2, (1,), True, True)],
    ids=str,
)
def test_layer_normalization(tmp_path, axis, scale_shape, bias, extra_outputs):
    """Scale and bias broadcast over the normalized axes; Mean/InvStdDev outputs present or absent."""
    rng = np.random.default_rng(17)
    weights = {"X": rand(rng, 2, 3, 4), "S": rand(rng, *scale_shape)}
    if bias:
        weights["B"] = rand(rng, *scale_shape)
    outputs = ["y", "mean", "inv"] if extra_outputs else ["y"]
    nodes = [node("LayerNormalization", list(weights), outputs, axis=axis, epsilon=1e-3)]
    check(make_case(nodes, "y", weights), tmp_path)


def test_batch_normalization_all_inputs(tmp_path):
    rng = np.random.default_rng(18)
    c = 3
    weights = {
        "X": rand(rng, 2, c, 4, 3),
        "scale": rand(rng, c),
        "B": rand(rng, c),
        "mean": rand(rng, c),
        "var": rand(rng, c, low=0.5),
    }
    check(make_case([node("BatchNormalization", list(weights), "y", epsilon=1e-2)], "y", weights), tmp_path)


CONVS = {
    "2d-basic": ((2, 3, 6, 5), (4, 3, 3, 3), {}),
    "2d-stride-pad-dil": ((2, 2, 9, 8), (3, 2, 3, 2), {"strides": [2, 3], "pads": [1, 0, 2, 1], "dilations": [2, 1]}),
    "2d-groups": ((1, 4, 7, 7), (6, 2, 3, 3), {"group": 2, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "2d-depthwise": ((2, 3, 6, 6), (3, 1, 3, 3), {"group": 3, "pads": [1, 1, 1, 1]}),
    "2d-same-upper": ((1, 2, 7, 6), (2, 2, 3, 3), {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    "2d-same-lower": ((1, 2, 6, 7), (2, 2, 2, 4), {"auto_pad": "SAME_LOWER", "strides": [2, 1]}),
    "2d-valid": ((1, 2, 7, 6), (2, 2, 3, 3), {"auto_pad": "VALID", "strides": [3, 2]}),
    "1d-stride": ((2, 3, 11), (4, 3, 3), {"strides": [3], "pads": [2, 0]}),
    "1d-groups-dil": ((2, 4, 12), (4, 1, 3), {"group": 4, "dilations": [3], "strides": [2]}),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_conv(tmp_path, name):
    """Input, weight and bias gradients (float32: onnxruntime has no float64 Conv)."""
    x_shape, w_shape, attrs = CONVS[name]
    rng = np.random.default_rng(sorted(CONVS).index(name))
    weights = {
        "X": rand(rng, *x_shape, dtype=np.float32),
        "W": rand(rng, *w_shape, dtype=np.float32),
        "B": rand(rng, w_shape[0], dtype=np.float32),
    }
    check(make_case([node("Conv", ["X", "W", "B"], "y", **attrs)], "y", weights), tmp_path, dtype="f32")


CONV_TRANSPOSES = {
    "2d-basic": ((2, 3, 4, 5), (3, 2, 3, 3), {}),
    "2d-stride-pad-outpad": (
        (1, 2, 4, 3),
        (2, 3, 3, 3),
        {"strides": [2, 3], "pads": [1, 0, 0, 1], "output_padding": [1, 2]},
    ),
    "2d-groups-dil": ((2, 4, 3, 4), (4, 1, 2, 3), {"group": 2, "dilations": [2, 1], "strides": [1, 2]}),
    "2d-output-shape": ((1, 2, 3, 3), (2, 2, 3, 3), {"strides": [2, 2], "output_shape": [6, 5]}),
    "2d-same-upper": ((1, 2, 3, 4), (2, 1, 3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "2d-same-lower": ((1, 2, 3, 4), (2, 1, 4, 3), {"strides": [2, 3], "auto_pad": "SAME_LOWER"}),
    "1d-stride": ((2, 3, 5), (3, 2, 4), {"strides": [3], "pads": [1, 2], "output_padding": [2]}),
}


@pytest.mark.parametrize("name", sorted(CONV_TRANSPOSES))
def test_conv_transpose(tmp_path, name):
    """Input, weight and bias gradients of ConvTranspose (float32 only in onnxruntime)."""
    x_shape, w_shape, attrs = CONV_TRANSPOSES[name]
    rng = np.random.default_rng(sorted(CONV_TRANSPOSES).index(name))
    weights = {
        "X": rand(rng, *x_shape, dtype=np.float32),
        "W": rand(rng, *w_shape, dtype=np.float32),
        "B": rand(rng, w_shape[1] * attrs.get("group", 1), dtype=np.float32),
    }
    check(make_case([node("ConvTranspose", ["X", "W", "B"], "y", **attrs)], "y", weights), tmp_path, dtype="f32")


POOLS = {
    "max-2d": ("MaxPool", (2, 3, 6, 7), {"kernel_shape": [2, 3], "strides": [2, 2]}),
    "max-2d-tiles": ("MaxPool", (2, 3, 6, 9), {"kernel_shape": [2, 3], "strides": [2, 3]}),
    "max-2d-pads-dil-ceil": (
        "MaxPool",
        (1, 2, 7, 7),
        {"kernel_shape": [3, 2], "pads": [1, 0, 1, 1], "dilations": [1, 2], "strides": [2, 2], "ceil_mode": 1},
    ),
    "max-overlap": ("MaxPool", (1, 2, 6, 6), {"kernel_shape": [3, 3], "strides": [1, 1]}),
    "max-1d-same": ("MaxPool", (2, 3, 9), {"kernel_shape": [3], "strides": [2], "auto_pad": "SAME_UPPER"}),
    "avg-2d": ("AveragePool", (2, 3, 6, 7), {"kernel_shape": [2, 3], "strides": [2, 2]}),
    "avg-pads-include": (
        "AveragePool",
        (1, 2, 5, 6),
        {"kernel_shape": [3, 3], "pads": [1, 1, 2, 0], "strides": [2, 1], "count_include_pad": 1},
    ),
    "avg-pads-exclude": (
        "AveragePool",
        (1, 2, 5, 6),
        {"kernel_shape": [3, 3], "pads": [1, 1, 2, 0], "strides": [2, 1], "count_include_pad": 0},
    ),
    "avg-dilated": ("AveragePool", (1, 2, 8, 8), {"kernel_shape": [2, 2], "dilations": [2, 3], "pads": [1, 1, 0, 1]}),
    "avg-same-exclude": (
        "AveragePool",
        (1, 2, 7, 6),
        {"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"},
    ),
    "avg-same-include": (
        "AveragePool",
        (1, 2, 7, 6),
        {"kernel_shape": [3, 3], "strides": [2, 1], "auto_pad": "SAME_UPPER", "count_include_pad": 1},
    ),
    "avg-1d-ceil-exact": ("AveragePool", (2, 2, 9), {"kernel_shape": [3], "strides": [3], "ceil_mode": 1}),
    "global-avg": ("GlobalAveragePool", (2, 3, 4, 5), {}),
}


@pytest.mark.parametrize("name", sorted(POOLS))
def test_pools(tmp_path, name):
    """MaxPool through its Indices, AveragePool with/without counted padding (float32 in onnxruntime)."""
    op, shape, attrs = POOLS[name]
    rng = np.random.default_rng(sorted(POOLS).index(name))
    x = rng.permutation(np.linspace(-3, 3, int(np.prod(shape)))).reshape(shape).astype(np.float32)  # no ties
    check(make_case([node(op, ["X"], "y", **attrs)], "y", {"X": x}), tmp_path, dtype="f32")


def test_max_pool_ties_route_to_the_first_maximum_like_indices():
    """MaxPool's gradient goes to each window's first maximum in row-major window order (its Indices), also
    when all the window's values are equal, with windows that tile the input and with a row left over."""
    from onnx import TensorProto, helper, numpy_helper

    from bq_onnx.estimators import gradients
    from tests.conftest import make_model

    x = np.array([[1, 1, 0, 2], [1, 1, 2, 2], [3, 0, 5, 5], [0, 3, 5, 5]], dtype=np.float32)
    scale = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32).reshape(1, 1, 2, 2)
    for rows in (4, 5):  # 5: a row left over, outside every window
        w = np.concatenate([x, np.full((rows - 4, 4), -9, np.float32)]).reshape(1, 1, rows, 4)
        model = make_model(
            [helper.make_node("MaxPool", ["W"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Mul", ["p", "x"], ["y"]),
             helper.make_node("MatMul", ["z", "V"], ["u"])],  # a quantizable weight, so the model is accepted
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 2]),
             helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 2, 2]),
             helper.make_tensor_value_info("u", TensorProto.FLOAT, [1, 16])],
            [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.eye(16, dtype=np.float32), "V")],
        )
        feeds = {"x": scale, "z": np.zeros((1, 16), np.float32)}
        grad = gradients(model, feeds, loss="mse", labels=np.zeros((1, 1, 2, 2), np.float32), wrt=["W"],
                         output="y")["W"]
        want = np.zeros((rows, 4), np.float32)
        for (r, c), p, s in zip([(0, 0), (0, 3), (2, 0), (2, 2)], [1, 2, 3, 5], scale.reshape(-1)):
            want[r, c] = (p * s) * s  # d/dW of (p * s)^2 / 2 (the mse loss is half the squared error)
        np.testing.assert_allclose(grad.reshape(rows, 4), want, rtol=1e-6, err_msg=f"{rows} rows")


#: MaxPool cases for the rule's two paths: windows that tile the input (kernel = strides, no padding or dilation;
#: elementwise first-maximum search) and the Indices + ScatterElements fallback. Name -> (shape, attrs, tiles).
MAX_POOLS = {
    "tiles-2x2": ((2, 3, 8, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    "tiles-2x2-leftover": ((2, 3, 7, 9), {"kernel_shape": [2, 2], "strides": [2, 2]}, True),
    "tiles-3x3-leftover": ((1, 2, 10, 9), {"kernel_shape": [3, 3], "strides": [3, 3]}, True),
    "tiles-1x2": ((2, 2, 5, 8), {"kernel_shape": [1, 2], "strides": [1, 2]}, True),
    "tiles-3x2-leftover": ((1, 3, 7, 7), {"kernel_shape": [3, 2], "strides": [3, 2]}, True),
    "tiles-valid": ((1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "VALID"}, True),
    "tiles-same-fits": ((1, 2, 6, 4), {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, True),
    "tiles-ceil-fits": ((1, 2, 6, 4), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, True),
    "overlap": ((2, 2, 7, 7), {"kernel_shape": [3, 3], "strides": [2, 2]}, False),
    "padded": ((1, 2, 6, 6), {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1]}, False),
    "dilated": ((1, 2, 8, 8), {"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 2]}, False),
    "ceil-partial": ((1, 2, 7, 6), {"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}, False),
    "same-padded": ((1, 2, 7, 6), {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}, False),
}


def _ties(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Values full of exact ties: Relu'd small integers (many all-zero windows), a constant block (all-equal
    windows), negative windows and signed zeros."""
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32)
    x[..., :2, :] = 1.5
    x[0, 0, -3:, -3:] = -1.0
    x[-1, -1, -2:, :2] = np.array([[-0.0, 0.0], [0.0, -0.0]], dtype=np.float32)
    return x


@pytest.mark.parametrize("name", sorted(MAX_POOLS))
def test_max_pool_gradient_is_indices_scatter_exactly(name):
    """dx of sum(MaxPool(X) * R) equals, bit for bit, R added at the positions onnxruntime's own MaxPool Indices
    name (its gradient: ties go to the first maximum), on inputs full of ties; the tiling path is taken exactly
    where the windows tile the input (no Indices, no scatter), the Indices + scatter path elsewhere."""
    shape, attrs, tiles = MAX_POOLS[name]
    rng = np.random.default_rng(sorted(MAX_POOLS).index(name))
    for trial in range(3):
        x = _ties(rng, shape) if trial else np.zeros(shape, np.float32)  # trial 0: every window all zero
        case = make_case([node("MaxPool", ["X"], "y", **attrs)], "y", {"X": x}, seed=trial)
        result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
        ops = [n.op_type for n in result.model.graph]
        assert (ops.count("MaxPool"), "ScatterElements" in ops) == ((1, False) if tiles else (2, True)), ops
        got = run_gradient_model(result, {})[result.gradients["X"]]
        with_indices = make_case([node("MaxPool", ["X"], ["y", "i"], **attrs)], "i", {"X": x}, project=False)
        indices = _session(with_indices.proto).run(["i"], {})[0]
        r = numpy_helper.to_array(next(i for i in case.proto.graph.initializer if i.name == "R"))
        want = np.zeros(x.size, np.float32)
        np.add.at(want, indices.reshape(-1), r.reshape(-1))
        np.testing.assert_array_equal(got, want.reshape(shape), err_msg=f"trial {trial}")


@pytest.mark.parametrize("name", sorted(n for n, (_, _, tiles) in MAX_POOLS.items() if tiles))
def test_max_pool_tiles_finite_differences(tmp_path, name):
    """The tiling path against finite differences (no ties) and OpenVINO."""
    shape, attrs, _ = MAX_POOLS[name]
    rng = np.random.default_rng(40 + sorted(MAX_POOLS).index(name))
    x = rng.permutation(np.linspace(-3, 3, int(np.prod(shape)))).reshape(shape).astype(np.float32)
    check(make_case([node("MaxPool", ["X"], "y", **attrs)], "y", {"X": x}), tmp_path, dtype="f32")


def test_max_pool_float64_takes_the_indices_path(tmp_path):
    """Tiling windows in float64 (onnxruntime has no float64 ConvTranspose) go through Indices + ScatterElements,
    against finite differences, and route ties like the Indices."""
    shape, attrs, _ = MAX_POOLS["tiles-2x2-leftover"]
    rng = np.random.default_rng(42)
    x = rng.permutation(np.linspace(-3, 3, int(np.prod(shape)))).reshape(shape)
    result, _ = check(make_case([node("MaxPool", ["X"], "y", **attrs)], "y", {"X": x}), tmp_path)
    assert "ScatterElements" in [n.op_type for n in result.model.graph]
    x = _ties(rng, shape).astype(np.float64)
    case = make_case([node("MaxPool", ["X"], "y", **attrs)], "y", {"X": x})
    result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
    got = run_gradient_model(result, {})[result.gradients["X"]]
    with_indices = make_case([node("MaxPool", ["X"], ["y", "i"], **attrs)], "i", {"X": x}, project=False)
    indices = _session(with_indices.proto).run(["i"], {})[0]
    r = numpy_helper.to_array(next(i for i in case.proto.graph.initializer if i.name == "R"))
    want = np.zeros(x.size)
    np.add.at(want, indices.reshape(-1), r.reshape(-1))
    np.testing.assert_array_equal(got, want.reshape(shape))


def test_max_pool_tiles_with_symbolic_batch(tmp_path):
    """The tiling path with a symbolic batch dim (static channels and spatial dims), between a Mul and a Conv."""
    rng = np.random.default_rng(41)
    nodes = [node("Mul", ["inp", "S"], "x"), node("MaxPool", ["x"], "p", kernel_shape=[2, 2], strides=[2, 2]),
             node("Conv", ["p", "W"], "y")]
    weights = {"S": rand(rng, 3, 1, 1, dtype=np.float32, low=0.5), "W": rand(rng, 2, 3, 2, 2, dtype=np.float32)}
    inp = rng.permutation(np.linspace(-2, 2, 2 * 3 * 6 * 5)).reshape(2, 3, 6, 5).astype(np.float32)
    case = make_case(nodes, "y", weights, inputs={"inp": inp}, symbolic={"inp": ["b", 3, 6, 5]})
    result, _ = check(case, tmp_path, dtype="f32")
    assert "ScatterElements" not in [n.op_type for n in result.model.graph]


# ----------------------------------------------------------------------------------------------- symbolic shapes


@pytest.mark.parametrize("target", [(1, 3), (3,), None], ids=["same-rank", "rank-changing", "unknown-rank"])
def test_unbroadcast_with_unknown_shapes(tmp_path, target):
    """A Reshape to a run-time shape hides dims (and with a symbolic-length shape, the rank) from shape
    inference: the broadcast axes of the following Add are then decided at run time. With an unknown rank the
    reduction axes are computed at run time, which OpenVINO's reader refuses (onnxruntime only)."""
    rng = np.random.default_rng(19)
    nodes = [node("MatMul", ["x", "W"], "h"), node("Reshape", ["h", "shape"], "r"), node("Add", ["r", "C"], "y")]
    shape = i64(1, 3) if target is None else i64(*target)
    inputs = {"x": rand(rng, 1, 6), "shape": shape}
    symbolic = {"x": ["b", 6], "shape": ["k"] if target is None else [len(target)]}
    case = make_case(nodes, "y", {"W": rand(rng, 6, 3), "C": rand(rng, 2, 3)}, inputs=inputs, symbolic=symbolic)
    check(case, tmp_path, openvino=target is not None)


def test_symbolic_batch_broadcasting(tmp_path):
    """Weights broadcast against activations with a symbolic batch dim, in both directions."""
    rng = np.random.default_rng(20)
    nodes = [
        node("Mul", ["x", "S"], "a"),  # [b,1,4] * [3,1] -> [b,3,4]
        node("Add", ["a", "B"], "c"),  # + [4]
        node("Div", ["c", "D"], "d"),  # / [1,1,1]
        node("Sub", ["T", "d"], "y"),  # [3,4] - [b,3,4]
    ]
    weights = {"S": rand(rng, 3, 1), "B": rand(rng, 4), "D": rand(rng, 1, 1, 1, low=0.5), "T": rand(rng, 3, 4)}
    case = make_case(nodes, "y", weights, inputs={"x": rand(rng, 2, 1, 4)}, symbolic={"x": ["b", 1, 4]})
    check(case, tmp_path)


@pytest.mark.parametrize("op", ["Conv", "Conv-groups", "ConvTranspose", "AveragePool", "MaxPool"])
def test_strided_window_with_symbolic_length(tmp_path, op):
    """A 1-D window op over a symbolic batch and length, between two convolutions: input gradients are cropped
    at run time and weight gradients take the unfold + MatMul form (OpenVINO needs constant Conv weights)."""
    rng = np.random.default_rng(21)
    attrs = {"strides": [2], "pads": [1, 0]}
    weights = {"W0": rand(rng, 4, 2, 3, dtype=np.float32)}
    if op == "Conv":
        middle = node("Conv", ["x", "W"], "c", **attrs)
        weights["W"] = rand(rng, 3, 4, 3, dtype=np.float32)
    elif op == "Conv-groups":
        middle = node("Conv", ["x", "W"], "c", group=2, **attrs)
        weights["W"] = rand(rng, 4, 2, 3, dtype=np.float32)
    elif op == "ConvTranspose":
        middle = node("ConvTranspose", ["x", "W"], "c", group=2, output_padding=[1], **attrs)
        weights["W"] = rand(rng, 4, 2, 3, dtype=np.float32)
    else:
        middle = node(op, ["x"], "c", kernel_shape=[3], **attrs)
    channels = 4 if op in ("Conv-groups", "ConvTranspose", "AveragePool", "MaxPool") else 3
    weights["W2"] = rand(rng, 2, channels, 1, dtype=np.float32)
    nodes = [node("Conv", ["inp", "W0"], "x", pads=[1, 1]), middle, node("Conv", ["c", "W2"], "y")]
    case = make_case(
        nodes, "y", weights, inputs={"inp": rand(rng, 2, 2, 10, dtype=np.float32)}, symbolic={"inp": ["b", 2, "L"]}
    )
    check(case, tmp_path, dtype="f32")


# ----------------------------------------------------------------------------------------------- whole models


def kl_loss_nodes(logits: str) -> list[onnx.NodeProto]:
    """kl = sum p * (log p - LogSoftmax(logits)), p a constant input distribution."""
    return [
        node("LogSoftmax", [logits], "lq", axis=-1),
        node("Log", ["p"], "lp"),
        node("Sub", ["lp", "lq"], "kl_diff"),
        node("Mul", ["p", "kl_diff"], "kl_terms"),
        node("ReduceSum", ["kl_terms"], "kl", keepdims=0),
    ]


def transformer_case(dtype, gelu: str, seed: int = 0) -> Case:
    """Embedding + positions, pre-LN attention block (2 heads, scaled softmax), GELU MLP, residuals, mean
    pooling over tokens, classifier; KL loss against a constant distribution ``p``."""
    rng = np.random.default_rng(seed)
    batch, tokens, vocab, d, heads, hidden, classes = 2, 4, 11, 8, 2, 16, 3

    def w(*shape, scale=0.5):
        return (scale * rng.standard_normal(shape)).astype(dtype)

    weights = {
        "E": w(vocab, d),
        "P": w(tokens, d),
        "ln1_s": 1 + w(d, scale=0.1),
        "ln1_b": w(d, scale=0.1),
        "Wq": w(d, d),
        "Wk": w(d, d),
        "Wv": w(d, d),
        "Wo": w(d, d),
        "bo": w(d, scale=0.1),
        "ln2_s": 1 + w(d, scale=0.1),
        "ln2_b": w(d, scale=0.1),
        "W1": w(d, hidden),
        "b1": w(hidden, scale=0.1),
        "W2": w(hidden, d),
        "b2": w(d, scale=0.1),
        "Wc": w(d, classes),
        "bc": w(classes, scale=0.1),
    }
    c = np.sqrt(2 / np.pi)
    consts = {
        "heads": i64(0, 0, heads, d // heads),
        "merge": i64(0, 0, d),
        "scale": np.array(1 / np.sqrt(d // heads), dtype),
        "half": np.array(0.5, dtype),
        "one": np.array(1.0, dtype),
        "rsqrt2": np.array(np.sqrt(0.5), dtype),
        "k3": np.array(0.044715, dtype),
        "c": np.array(c, dtype),
        "tok_axis": i64(1),
    }
    attention = [
        node("Gather", ["E", "ids"], "emb"),
        node("Add", ["emb", "P"], "x0"),
        node("LayerNormalization", ["x0", "ln1_s", "ln1_b"], "h1", axis=-1),
        node("MatMul", ["h1", "Wq"], "q"),
        node("Reshape", ["q", "heads"], "q4"),
        node("Transpose", ["q4"], "qh", perm=[0, 2, 1, 3]),
        node("MatMul", ["h1", "Wk"], "k"),
        node("Reshape", ["k", "heads"], "k4"),
        node("Transpose", ["k4"], "khT", perm=[0, 2, 3, 1]),
        node("MatMul", ["h1", "Wv"], "v"),
        node("Reshape", ["v", "heads"], "v4"),
        node("Transpose", ["v4"], "vh", perm=[0, 2, 1, 3]),
        node("MatMul", ["qh", "khT"], "scores"),
        node("Mul", ["scores", "scale"], "scaled"),
        node("Softmax", ["scaled"], "att", axis=-1),
        node("MatMul", ["att", "vh"], "ctx"),
        node("Transpose", ["ctx"], "ctxT", perm=[0, 2, 1, 3]),
        node("Reshape", ["ctxT", "merge"], "ctxm"),
        node("MatMul", ["ctxm", "Wo"], "o"),
        node("Add", ["o", "bo"], "ob"),
        node("Add", ["x0", "ob"], "x1"),
        node("LayerNormalization", ["x1", "ln2_s", "ln2_b"], "h2", axis=-1),
        node("MatMul", ["h2", "W1"], "f"),
        node("Add", ["f", "b1"], "fb"),
    ]
    if gelu == "erf":  # 0.5 x (1 + erf(x / sqrt 2))
        mlp = [node("Mul", ["fb", "rsqrt2"], "fs"), node("Erf", ["fs"], "fe"), node("Add", ["fe", "one"], "fe1")]
    else:  # 0.5 x (1 + tanh(c (x + 0.044715 x^3)))
        mlp = [
            node("Pow", ["fb", "three"], "f3"),
            node("Mul", ["f3", "k3"], "f3k"),
            node("Add", ["fb", "f3k"], "inner"),
            node("Mul", ["inner", "c"], "ic"),
            node("Tanh", ["ic"], "th"),
            node("Add", ["th", "one"], "fe1"),
        ]
        consts["three"] = np.array(3.0, dtype)
    mlp += [
        node("Mul", ["fb", "fe1"], "fm"),
        node("Mul", ["fm", "half"], "act"),
        node("MatMul", ["act", "W2"], "m"),
        node("Add", ["m", "b2"], "mb"),
        node("Add", ["x1", "mb"], "x2"),
        node("ReduceMean", ["x2", "tok_axis"], "pooled", keepdims=0),
        node("MatMul", ["pooled", "Wc"], "lg"),
        node("Add", ["lg", "bc"], "logits"),
    ]
    p = rng.dirichlet(np.ones(classes), size=batch).astype(dtype)
    ids = rng.integers(0, vocab, size=(batch, tokens)).astype(np.int64)
    ids[0, :2] = 3  # a repeated token: its embedding row accumulates
    return make_case(
        [*attention, *mlp, *kl_loss_nodes("logits")],
        "kl",
        weights,
        consts=consts,
        inputs={"ids": ids, "p": p},
        symbolic={"ids": ["b", tokens], "p": ["b", classes]},
        project=False,
    )


@pytest.mark.parametrize(("dtype", "gelu"), [("f32", "erf"), ("f64", "tanh")])
def test_transformer_block(tmp_path, dtype, gelu):
    """Every weight of a small transformer block with a KL loss matches finite differences.

    float32 with the Erf GELU (onnxruntime has Erf in float32 only): h = 1e-2, tolerance 5e-3 [measured 9e-4;
    a smooth model: the h^2 term and float32 noise are both ~1e-4 of the gradient scale, more for the small
    LayerNorm-scale gradients]. float64 with the tanh GELU (Pow/Tanh have float64 kernels): the float64
    tolerance 1e-4 [measured 9e-10]."""
    case = transformer_case(np.float32 if dtype == "f32" else np.float64, gelu)
    tol = 5e-3 if dtype == "f32" else F64_TOL
    result, errors = check(case, tmp_path, dtype=dtype, samples=10, tol=tol)
    assert set(errors) == set(case.wrt)
    assert result.loss == "kl"


def cnn_case(seed: int = 0) -> Case:
    """Conv(pad) + BatchNorm + Relu + MaxPool, grouped strided Conv + Relu, Flatten, Gemm(transB); KL loss."""
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.5):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    weights = {
        "C1": w(4, 1, 3, 3),
        "c1b": w(4, scale=0.1),
        "bn_s": 1 + w(4, scale=0.1),
        "bn_b": w(4, scale=0.1),
        "bn_m": w(4, scale=0.1),
        "bn_v": (1 + np.abs(w(4))).astype(np.float32),
        "C2": w(6, 2, 3, 3),
        "c2b": w(6, scale=0.1),
        "Wfc": w(3, 24),
        "bfc": w(3, scale=0.1),
    }
    nodes = [
        node("Conv", ["img", "C1", "c1b"], "c1", pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "bn_s", "bn_b", "bn_m", "bn_v"], "bn"),
        node("Relu", ["bn"], "r1"),
        node("MaxPool", ["r1"], "mp", kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["mp", "C2", "c2b"], "c2", group=2, strides=[2, 2], pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], "r2"),
        node("Flatten", ["r2"], "flat"),
        node("Gemm", ["flat", "Wfc", "bfc"], "logits", transB=1),
        *kl_loss_nodes("logits"),
    ]
    img = rng.standard_normal((2, 1, 8, 8)).astype(np.float32)
    p = rng.dirichlet(np.ones(3), size=2).astype(np.float32)
    return make_case(
        nodes,
        "kl",
        weights,
        inputs={"img": img, "p": p},
        symbolic={"img": ["b", 1, 8, 8], "p": ["b", 3]},
        project=False,
    )


def test_small_cnn(tmp_path):
    """Every weight of a small CNN (float32: onnxruntime has no float64 Conv/MaxPool) matches finite
    differences: h = 1e-3 keeps Relu/MaxPool switches out of the perturbation, tolerance 5e-3 [measured 7e-4]
    for the float32 noise that a smaller h brings (~6e-8 * |terms| / 2h)."""
    result, errors = check(cnn_case(), tmp_path, dtype="f32", samples=10, h=1e-3, tol=5e-3)
    assert set(errors) == set(result.gradients)


@pytest.mark.parametrize("family", ["dense", "conv"])
def test_square_weights_read_transposed_in_openvino(tmp_path, family):
    """OpenVINO 2026.4 computes a backward MatMul/Gemm that reads a square constant weight transposed (or a
    ConvTranspose sharing a Conv's weight with equal channel dims) with the forward op's repacked weights; the
    rules hand those ops their own copy. With a run-time input nothing is constant-folded away, so this
    model shows the fault if the copy is dropped."""
    rng = np.random.default_rng(22)
    if family == "dense":
        nodes = [node("MatMul", ["x", "A"], "h"), node("Gemm", ["h", "B"], "y", transB=1)]
        weights = {"A": rand(rng, 6, 6, dtype=np.float32), "B": rand(rng, 6, 6, dtype=np.float32)}
        inputs, symbolic = {"x": rand(rng, 3, 6, dtype=np.float32)}, {"x": ["b", 6]}
    else:
        nodes = [
            node("Conv", ["x", "C"], "h", pads=[1, 1, 1, 1]),
            node("ConvTranspose", ["h", "D"], "y", strides=[2, 2], pads=[1, 1, 1, 1]),
        ]
        weights = {"C": rand(rng, 3, 3, 3, 3, dtype=np.float32), "D": rand(rng, 3, 3, 3, 3, dtype=np.float32)}
        inputs, symbolic = {"x": rand(rng, 2, 3, 5, 5, dtype=np.float32)}, {"x": ["b", 3, 5, 5]}
    weights["x0"] = rand(rng, *inputs["x"].shape[1:], dtype=np.float32)  # differentiated: needs the input gradients
    nodes.insert(0, node("Add", ["inp", "x0"], "x"))
    case = make_case(nodes, "y", weights, inputs={"inp": inputs["x"]}, symbolic={"inp": symbolic["x"]})
    check(case, tmp_path, dtype="f32")


# ----------------------------------------------------------------------------------------------- random broadcasting


@st.composite
def broadcast_pair(draw):
    """Two shapes that broadcast: a base shape, each operand dropping leading axes and setting some dims to 1."""
    base = draw(st.lists(st.integers(1, 4), min_size=0, max_size=4))

    def operand():
        drop = draw(st.integers(0, len(base)))
        return tuple(1 if draw(st.booleans()) else d for d in base[drop:])

    return operand(), operand()


@settings(max_examples=25, deadline=None, derandomize=True)
@given(shapes=broadcast_pair(), op=st.sampled_from(["Add", "Sub", "Mul", "Div", "Where"]))
def test_broadcasting_random_shapes(tmp_path_factory, shapes, op):
    """Hypothesis-drawn broadcast pairs (derandomized: the same examples every run), float64."""
    rng = np.random.default_rng(abs(hash((shapes, op))) % 2**32)
    a = rand(rng, *shapes[0])
    b = rand(rng, *shapes[1], low=0.5) if op == "Div" else rand(rng, *shapes[1])
    if op == "Where":
        cond = rng.random(np.broadcast_shapes(shapes[0], shapes[1])) > 0.5
        case = make_case([node("Where", ["c", "A", "B"], "y")], "y", {"A": a, "B": b}, consts={"c": cond})
    else:
        case = make_case([node(op, ["A", "B"], "y")], "y", {"A": a, "B": b})
    check(case, tmp_path_factory.mktemp("bc"), openvino=False)


# ----------------------------------------------------------------------------------------------- behaviour


def _ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.from_proto(proto)


@pytest.mark.parametrize("blocker", ["TopK", "LpNormalization"])
def test_op_without_rule_is_reported_and_others_still_work(tmp_path, blocker):
    """W1 reaches the loss only through a rule-less op, W2 both ways, W3 never: W1 and W2 are reported with the
    op type and node name; W3 still gets a correct gradient; no exception."""
    rng = np.random.default_rng(23)
    if blocker == "TopK":
        blocked = [node("TopK", ["h", "k"], ["top", "top_idx"], axis=-1)]
        consts = {"k": i64(2)}
    else:
        blocked = [node("LpNormalization", ["h"], "top", axis=-1)]
        consts = {}
    nodes = [
        node("MatMul", ["x", "W1"], "h0"),
        node("Add", ["h0", "W2"], "h"),
        *blocked,
        node("ReduceSum", ["top", "ax1"], "t", keepdims=1),
        node("Mul", ["h", "t"], "m"),
        node("Mul", ["x", "W3"], "s"),
        node("ReduceSum", ["s", "ax1"], "s1", keepdims=1),
        node("Add", ["m", "s1"], "y"),
    ]
    weights = {"W1": rand(rng, 3, 4), "W2": rand(rng, 4), "W3": rand(rng, 3)}
    consts["ax1"] = i64(1)
    case = make_case(nodes, "y", weights, consts=consts, inputs={"x": rand(rng, 2, 3)}, symbolic={"x": ["b", 3]})
    result = build_gradient_model(_ir(case.proto), case.loss, case.wrt)
    label = f"{blocker} '{blocked[0].name}'"
    assert result.unsupported == {"W1": [label], "W2": [label]}
    assert list(result.gradients) == ["W3"]
    outs = run_gradient_model(result, case.feeds)
    assert [v.name for v in result.model.graph.outputs] == [result.loss, result.gradients["W3"]]
    finite_difference_check(
        dataclasses.replace(case, wrt=["W3"]), {"W3": outs[result.gradients["W3"]]}, h=1e-5, tol=F64_TOL
    )


def test_no_differentiable_weight_gives_empty_gradients():
    rng = np.random.default_rng(24)
    nodes = [node("TopK", ["W", "k"], ["top", "idx"], axis=-1)]
    case = make_case(nodes, "top", {"W": rand(rng, 2, 5)}, consts={"k": i64(2)})
    result = build_gradient_model(_ir(case.proto), case.loss, case.wrt)
    assert result.gradients == {} and result.unsupported == {"W": ["TopK 'TopK_top'"]}
    assert [v.name for v in result.model.graph.outputs] == [result.loss]
    assert run_gradient_model(result, case.feeds)[result.loss].shape == ()


def test_weight_read_inside_a_subgraph_gets_its_gradient():
    """A weight captured by an If branch gets the gradient of the branch taken (tests/test_vjp_control.py has the
    rest), never a silent zero."""
    rng = np.random.default_rng(25)
    then = helper.make_graph(
        [helper.make_node("Mul", ["x", "W"], ["t"])], "then", [], [helper.make_empty_tensor_value_info("t")]
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [helper.make_empty_tensor_value_info("e")]
    )
    nodes = [node("If", ["flag"], "y", then_branch=then, else_branch=other), node("Mul", ["y", "V"], "z")]
    case = make_case(
        nodes, "z", {"W": rand(rng, 3), "V": rand(rng, 3)}, consts={"flag": np.array(True)}, inputs={"x": rand(rng, 3)}
    )
    result = build_gradient_model(_ir(case.proto), case.loss, case.wrt)
    assert not result.unsupported and list(result.gradients) == ["W", "V"]
    outs = run_gradient_model(result, case.feeds)
    finite_difference_check(case, {w: outs[n] for w, n in result.gradients.items()}, h=1e-5, tol=F64_TOL)


def test_integer_side_inputs_get_no_gradient():
    """Gather indices and Reshape shapes are initializers too, but integer: asking for them is an error, and
    the float weights' gradients are the only gradient outputs."""
    rng = np.random.default_rng(26)
    nodes = [node("Gather", ["E", "idx"], "g"), node("Reshape", ["g", "shape"], "y")]
    case = make_case(nodes, "y", {"E": rand(rng, 5, 3)}, consts={"idx": i64(0, 4, 0), "shape": i64(-1)})
    result = build_gradient_model(_ir(case.proto), case.loss, ["E"])
    assert list(result.gradients) == ["E"] and not result.unsupported
    assert len(result.model.graph.outputs) == 2
    for name in ("idx", "shape"):
        with pytest.raises(ValueError, match="only float32/float64"):
            build_gradient_model(_ir(case.proto), case.loss, ["E", name])


def test_bad_arguments_raise_value_error():
    rng = np.random.default_rng(27)
    case = make_case([node("Relu", ["W"], "y")], "y", {"W": rand(rng, 3)})
    with pytest.raises(ValueError, match="no value named"):
        build_gradient_model(_ir(case.proto), "nope", ["W"])
    with pytest.raises(ValueError, match="not an initializer"):
        build_gradient_model(_ir(case.proto), "proj", ["nope"])
    old = onnx.ModelProto()
    old.CopyFrom(case.proto)
    old.opset_import[0].version = 17
    with pytest.raises(ValueError, match="opset"):
        build_gradient_model(_ir(old), "proj", ["W"])


def test_loss_naming_unreachable_weight_and_shared_paths(tmp_path):
    """A non-scalar loss is summed into '<loss>.sum'; a weight that does not reach the loss gets zeros; a value
    used by several nodes accumulates their gradients."""
    rng = np.random.default_rng(28)
    nodes = [
        node("Mul", ["W", "W"], "sq"),
        node("Add", ["sq", "W"], "s"),
        node("Mul", ["s", "x"], "y"),
        node("Relu", ["U"], "unused"),
    ]
    # The run-time input matters for OpenVINO 2026.4: compiling this gradient graph with every tensor a float64
    # constant never returns (its constant folding loops); with an input it compiles and runs.
    case = make_case(
        nodes, "y", {"W": rand(rng, 2, 3), "U": rand(rng, 4)}, inputs={"x": rand(rng, 2, 3)}, symbolic={"x": ["b", 3]}
    )
    result, _ = check(case, tmp_path)
    assert result.loss == "proj.sum"
    outs = run_gradient_model(result, case.feeds)
    assert np.array_equal(outs[result.gradients["U"]], np.zeros(4))


def test_maxpool_indices_output_and_original_outputs_dropped(tmp_path):
    """A MaxPool that already exposes Indices is reused; original graph outputs other than the loss go away."""
    rng = np.random.default_rng(29)
    x = rng.permutation(np.linspace(-2, 2, 2 * 2 * 6 * 6)).reshape(2, 2, 6, 6).astype(np.float32)
    nodes = [node("MaxPool", ["X"], ["y", "where"], kernel_shape=[2, 2], strides=[2, 2])]
    case = make_case(nodes, "y", {"X": x})
    result, _ = check(case, tmp_path, dtype="f32")
    assert sum(n.op_type == "MaxPool" for n in result.model.graph) == 1
    assert [v.name for v in result.model.graph.outputs] == ["proj.sum", "X.grad"]


def test_weights_as_inputs_evaluates_perturbed_weights():
    """With weights as inputs one gradient session serves perturbed weights (Hutchinson by differences of
    gradients): feeding W' gives the gradient a model built with W' stored gives."""
    case = transformer_case(np.float64, "tanh", seed=3)
    result = build_gradient_model(_ir(case.proto), case.loss, case.wrt, weights_as_inputs=True)
    proto = ir.to_proto(result.model)
    assert {"Wq", "W1", "E"} <= {i.name for i in proto.graph.input}
    session = _session(proto)
    default = dict(zip([o.name for o in proto.graph.output], session.run(None, case.feeds)))
    weights = {i.name: numpy_helper.to_array(i) for i in case.proto.graph.initializer}
    moved = {"Wq": weights["Wq"] + 0.05, "W1": weights["W1"] * 1.1}
    perturbed = dict(zip([o.name for o in proto.graph.output], session.run(None, {**case.feeds, **moved})))
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(case.proto)
    for init in rebuilt.graph.initializer:
        if init.name in moved:
            init.CopyFrom(numpy_helper.from_array(moved[init.name], init.name))
    expected = run_gradient_model(build_gradient_model(_ir(rebuilt), case.loss, case.wrt), case.feeds)
    for out in result.gradients.values():
        np.testing.assert_allclose(perturbed[out], expected[out], rtol=1e-10, atol=1e-12)
    assert not np.allclose(perturbed[result.gradients["Wk"]], default[result.gradients["Wk"]])


def test_autodiff_pass_and_supported_ops():
    case = transformer_case(np.float64, "tanh")
    model = _ir(case.proto)
    autodiff = AutodiffPass(case.loss, ["Wq", "bc"])
    out = autodiff(model)
    assert out.modified and out.model is not model
    assert autodiff.result is not None and list(autodiff.result.gradients) == ["Wq", "bc"]
    assert [v.name for v in out.model.graph.outputs] == ["kl", "Wq.grad", "bc.grad"]
    required = {
        "Gemm",
        "MatMul",
        "Conv",
        "ConvTranspose",
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Neg",
        "Relu",
        "LeakyRelu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Clip",
        "Erf",
        "Softmax",
        "LogSoftmax",
        "LayerNormalization",
        "BatchNormalization",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "ReduceMean",
        "ReduceSum",
        "Reshape",
        "Flatten",
        "Transpose",
        "Squeeze",
        "Unsqueeze",
        "Concat",
        "Split",
        "Slice",
        "Gather",
        "Where",
        "Expand",
        "Cast",
        "Identity",
        "Pow",
        "Sqrt",
        "Dropout",
        "Constant",
        "Shape",
        "ConstantOfShape",
    }
    assert required <= supported_ops()
    assert not {"TopK", "LpNormalization"} & supported_ops()
    assert {"If", "Loop", "Scan"} <= supported_ops()  # test_vjp_control.py, test_vjp_loop.py


@pytest.mark.parametrize(("name", "count"), [("lenet", 3), ("digits_mlp", 4)])
def test_reference_models_after_opset_upgrade(tmp_path, name, count):
    """The repository's trained LeNet-5 and digits MLP (opset 18, upgraded to 21 by the prepare pass), KL loss
    against smoothed labels: every weight and bias matches finite differences (and OpenVINO).

    Float32 (Conv/MaxPool), h = 2e-3, tolerance 2e-2 [measured 5.4e-3 on LeNet]: the trained logits reach about
    20, so float32 rounding puts ~1e-6 of noise on the loss, ~5e-4 on a difference quotient, against first-layer
    bias gradients of ~0.1; a larger h crosses Relu/MaxPool switches of the 24x24 first-layer maps."""
    from bq_onnx.passes.prepare import UpgradeOpsetPass

    model = UpgradeOpsetPass()(ir.load(str(MODELS / f"{name}.onnx"))).model
    proto = ir.to_proto(model)
    proto.ir_version = 10
    proto.graph.node.extend(kl_loss_nodes("logits"))
    proto.graph.input.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", 10]))
    proto.graph.output.append(helper.make_tensor_value_info("kl", TensorProto.FLOAT, []))
    with np.load(MODELS / f"{name}_data.npz") as data:
        inputs, labels = data["calib_input"][:count], data["calib_labels"][:count]
    p = np.full((count, 10), 0.02, np.float32)
    p[np.arange(count), labels] = 0.82
    wrt = [i.name for i in proto.graph.initializer if i.data_type == TensorProto.FLOAT]
    case = Case(proto, {"input": inputs, "p": p}, wrt, loss="kl")
    result, errors = check(case, tmp_path, dtype="f32", samples=8, h=2e-3, tol=2e-2)
    assert set(errors) == set(wrt) and result.loss == "kl"

