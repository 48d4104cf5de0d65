"""VJP rules for the ops of exported third-party models (issue 14, item 4), checked like tests/test_autodiff.py:
central finite differences of ``sum(y * R)`` in float64 where onnxruntime has float64 kernels (h = 1e-5, tolerance
1e-4), else float32 (h = 1e-2, tolerance 5e-4), and every gradient model run in OpenVINO (f32 inference
precision, constant weights and weights fed as inputs) unless OpenVINO cannot read the forward op itself
(Resize half_pixel_symmetric / tf_crop_and_resize, Pad wrap) or computes a different forward (Resize antialias
and exclude_outside differ from onnxruntime by up to 0.2 there). Tie-breaking rules are checked exactly.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.autodiff.gradient import build_gradient_model, supported_ops
from tests.test_autodiff import check, i64, make_case, node, rand, run_gradient_model

F32 = np.float32


def _gradients(case) -> dict[str, np.ndarray]:
    result = build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt)
    assert not result.unsupported, result.unsupported
    outs = run_gradient_model(result, case.feeds)
    return {w: outs[name] for w, name in result.gradients.items()}


def _r(case) -> np.ndarray:
    return numpy_helper.to_array(next(i for i in case.proto.graph.initializer if i.name == "R"))


def _unsupported(case) -> dict[str, list[str]]:
    return build_gradient_model(ir.from_proto(case.proto), case.loss, case.wrt).unsupported


# ----------------------------------------------------------------------------------------------- Max / Min


@pytest.mark.parametrize("op", ["Max", "Min"])
@pytest.mark.parametrize("shapes", [((3, 1, 4), (4,), (2, 1)), ((2, 3),), ((2, 3), (2, 3))], ids=str)
def test_max_min_broadcasting(tmp_path, op, shapes):
    """n-ary with numpy broadcasting (each operand's share summed back), and the single-input identity."""
    rng = np.random.default_rng(len(shapes) + len(op))
    weights = {f"X{i}": rand(rng, *s) for i, s in enumerate(shapes)}
    check(make_case([node(op, list(weights), "y")], "y", weights), tmp_path)


@pytest.mark.parametrize("op", ["Max", "Min"])
def test_max_min_ties_go_to_the_first_operand(op):
    """Where several operands equal the output, the lowest-index one gets the whole gradient."""
    a = np.array([[1.0, 2.0, 3.0]])
    b = np.array([[1.0, 5.0 if op == "Max" else 0.0, 3.0]])
    c = np.array([3.0 if op == "Max" else 1.0])  # broadcast; ties a in column 0 (Min) and 2 (Max)
    case = make_case([node(op, ["A", "B", "C"], "y")], "y", {"A": a, "B": b, "C": c})
    r = _r(case)
    got = _gradients(case)
    y = (np.maximum if op == "Max" else np.minimum).reduce([a, b, np.broadcast_to(c, a.shape)])
    first_a = a == y
    first_b = (b == y) & ~first_a
    first_c = (c == y) & ~first_a & ~first_b
    np.testing.assert_array_equal(got["A"], np.where(first_a, r, 0))
    np.testing.assert_array_equal(got["B"], np.where(first_b, r, 0))
    np.testing.assert_array_equal(got["C"], np.where(first_c, r, 0).sum().reshape(1))


# ----------------------------------------------------------------------------------------------- reductions


REDUCE_MAX = [
    ((1,), {"keepdims": 0}),
    ((0, -1), {"keepdims": 1}),
    ((2, 0), {"keepdims": 0}),
    (None, {"keepdims": 0}),
    (None, {"keepdims": 1}),
    (None, {"noop_with_empty_axes": 1}),
]


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin"])
@pytest.mark.parametrize(("axes", "attrs"), REDUCE_MAX, ids=str)
def test_reduce_max_min(tmp_path, op, axes, attrs):
    rng = np.random.default_rng(30)
    inputs = ["W"] if axes is None else ["W", "axes"]
    consts = {} if axes is None else {"axes": i64(*axes)}
    check(make_case([node(op, inputs, "y", **attrs)], "y", {"W": rand(rng, 2, 3, 4)}, consts=consts), tmp_path)


@pytest.mark.parametrize(
    ("op", "axes"),
    [("ReduceMax", (1, 3)), ("ReduceMax", (2, 3)), ("ReduceMin", (1,)), ("ReduceMin", (1, 3)),
     ("GlobalMaxPool", (2, 3))],
    ids=str,
)
def test_reductions_route_ties_to_the_first_element_in_row_major_order(op, axes):
    """Like MaxPool's Indices and ArgMax: the first extremum over the reduced axes (flattened row-major) gets
    the whole gradient, also for all-equal slices; contiguous axes (a ReduceMin of positions) and others (an
    exclusive CumSum per axis)."""
    rng = np.random.default_rng(31)
    x = rng.integers(0, 3, size=(2, 3, 4, 5)).astype(F32)
    x[0, 0] = 1.0  # one all-equal slice
    if op == "GlobalMaxPool":
        case = make_case([node(op, ["X"], "y")], "y", {"X": x})
    else:
        case = make_case([node(op, ["X", "axes"], "y", keepdims=0)], "y", {"X": x}, consts={"axes": i64(*axes)})
    r = _r(case)
    got = _gradients(case)["X"]
    ends = tuple(range(-len(axes), 0))
    kept = [d for a, d in enumerate(x.shape) if a not in axes]
    moved = np.moveaxis(x, axes, ends).reshape(*kept, -1)
    first = (np.argmin if op == "ReduceMin" else np.argmax)(moved, axis=-1)
    want = np.zeros_like(moved)
    np.put_along_axis(want, first[..., None], r.reshape(first.shape)[..., None], axis=-1)
    want = np.moveaxis(want.reshape(*kept, *(x.shape[a] for a in axes)), ends, axes)
    np.testing.assert_array_equal(got, want)


def test_global_max_pool(tmp_path):
    """float32 (onnxruntime has no float64 GlobalMaxPool), 1-D and 2-D spatial."""
    rng = np.random.default_rng(32)
    for shape in ((2, 3, 4, 5), (2, 3, 7)):
        x = rng.permutation(np.linspace(-3, 3, int(np.prod(shape)))).reshape(shape).astype(F32)
        check(make_case([node("GlobalMaxPool", ["X"], "y")], "y", {"X": x}), tmp_path, dtype="f32")


@pytest.mark.parametrize("op", ["ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp"])
@pytest.mark.parametrize(("axes", "keepdims"), [((1,), 0), ((0, -1), 1), (None, 0), (None, 1)], ids=str)
def test_sum_reductions(tmp_path, op, axes, keepdims):
    rng = np.random.default_rng(33)
    w = rand(rng, 2, 3, 4, low=0.1) if op == "ReduceLogSum" else rand(rng, 2, 3, 4)
    inputs = ["W"] if axes is None else ["W", "axes"]
    consts = {} if axes is None else {"axes": i64(*axes)}
    check(make_case([node(op, inputs, "y", keepdims=keepdims)], "y", {"W": w}, consts=consts), tmp_path)


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
@pytest.mark.parametrize("axis", [1, -1])
def test_cumsum(tmp_path, exclusive, reverse, axis):
    rng = np.random.default_rng(34)
    nodes = [node("CumSum", ["W", "axis"], "y", exclusive=exclusive, reverse=reverse)]
    check(make_case(nodes, "y", {"W": rand(rng, 2, 3, 4)}, consts={"axis": np.array(axis)}), tmp_path)


# ----------------------------------------------------------------------------------------------- re-indexing


@pytest.mark.parametrize("repeats", [(2, 1, 3), (1, 1, 1), (3, 2, 1)], ids=str)
def test_tile(tmp_path, repeats):
    rng = np.random.default_rng(35)
    nodes = [node("Tile", ["W", "reps"], "y")]
    check(make_case(nodes, "y", {"W": rand(rng, 2, 3, 2)}, consts={"reps": i64(*repeats)}), tmp_path)


PADS = {
    "grow": (0, 2, 1, 0, 1, 3),
    "crop-and-grow": (0, -1, 2, 0, 2, -1),
    "crop": (0, -1, 0, 0, 0, -2),
}


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
@pytest.mark.parametrize("pads", sorted(PADS))
def test_pad(tmp_path, mode, pads):
    """Every mode, negative pads crop; OpenVINO cannot read the forward wrap mode (onnxruntime only)."""
    rng = np.random.default_rng(36)
    nodes = [node("Pad", ["W", "pads"], "y", mode=mode)]
    case = make_case(nodes, "y", {"W": rand(rng, 2, 4, 5)}, consts={"pads": i64(*PADS[pads])})
    check(case, tmp_path, openvino=mode != "wrap")


def test_pad_constant_value_and_axes(tmp_path):
    """The fill value is differentiated (the sum of g where it was used); ``axes`` picks the padded axes."""
    rng = np.random.default_rng(37)
    nodes = [node("Pad", ["W", "pads", "v", "axes"], "a", mode="constant"),
             node("Pad", ["W", "pads", "", "axes"], "b", mode="reflect"),
             node("Add", ["a", "b"], "y")]
    consts = {"pads": i64(2, -1, 1, 2), "axes": i64(-1, 1)}
    check(make_case(nodes, "y", {"W": rand(rng, 2, 4, 5), "v": np.array(0.7)}, consts=consts), tmp_path)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_to_space(tmp_path, mode):
    rng = np.random.default_rng(38)
    nodes = [node("DepthToSpace", ["W"], "y", blocksize=2, mode=mode)]
    check(make_case(nodes, "y", {"W": rand(rng, 2, 8, 2, 3)}), tmp_path)


def test_space_to_depth(tmp_path):
    rng = np.random.default_rng(39)
    check(make_case([node("SpaceToDepth", ["W"], "y", blocksize=2)], "y", {"W": rand(rng, 2, 3, 4, 6)}), tmp_path)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_gather_elements(tmp_path, axis):
    """Repeated indices accumulate; negative indices wrap."""
    rng = np.random.default_rng(40)
    w = rand(rng, 3, 4, 5)
    shape = list(w.shape)
    shape[axis] = 6
    idx = rng.integers(-w.shape[axis], w.shape[axis], size=shape).astype(np.int64)
    nodes = [node("GatherElements", ["W", "idx"], "y", axis=axis)]
    check(make_case(nodes, "y", {"W": w}, consts={"idx": idx}), tmp_path)


def test_gather_nd(tmp_path):
    """Repeated and negative index tuples, partial depth (slices of the last axis)."""
    rng = np.random.default_rng(52)
    idx = np.array([[[0, -1], [2, 1]], [[0, 3], [0, -1]]], np.int64)
    check(make_case([node("GatherND", ["W", "idx"], "y")], "y", {"W": rand(rng, 3, 4, 5)}, consts={"idx": idx}),
          tmp_path)


@pytest.mark.parametrize("reduction", ["none", "add"])
def test_scatter_nd(tmp_path, reduction):
    rng = np.random.default_rng(53)
    idx = np.array([[0, 1], [2, -1]], np.int64)
    weights = {"W": rand(rng, 3, 4, 5), "U": rand(rng, 2, 5)}
    nodes = [node("ScatterND", ["W", "idx", "U"], "y", reduction=reduction)]
    check(make_case(nodes, "y", weights, consts={"idx": idx}), tmp_path)


@pytest.mark.parametrize("reduction", ["none", "add"])
@pytest.mark.parametrize("axis", [0, -1])
def test_scatter_elements(tmp_path, reduction, axis):
    rng = np.random.default_rng(54)
    w = rand(rng, 4, 5)
    if reduction == "add":  # repeated targets accumulate
        idx = np.array([[0, 3, 0], [2, -1, 2]]) if axis else np.array([[0, 3, 1, 2, 0], [0, -1, 0, 1, 3]])
    else:  # distinct targets: the overwrite order of duplicates is unspecified
        idx = np.array([[0, 3, 1], [2, -1, 0]]) if axis else np.array([[0, 3, 1, 2, 0], [2, -2, 0, 1, 3]])
    weights = {"W": w, "U": rand(rng, *idx.shape)}
    nodes = [node("ScatterElements", ["W", "idx", "U"], "y", reduction=reduction, axis=axis)]
    check(make_case(nodes, "y", weights, consts={"idx": idx}), tmp_path)


@pytest.mark.parametrize("upper", [0, 1])
def test_trilu(tmp_path, upper):
    rng = np.random.default_rng(55)
    nodes = [node("Trilu", ["W", "k"], "y", upper=upper)]
    check(make_case(nodes, "y", {"W": rand(rng, 2, 4, 5)}, consts={"k": np.array(1, np.int64)}), tmp_path)


@pytest.mark.parametrize("size", [3, 5])
def test_lrn(tmp_path, size):
    """float32 (onnxruntime has no float64 LRN, nor even sizes: those the rule refuses)."""
    rng = np.random.default_rng(56)
    nodes = [node("LRN", ["X"], "y", size=size, alpha=0.3, beta=0.7, bias=1.5)]
    check(make_case(nodes, "y", {"X": rand(rng, 2, 6, 3, 2, dtype=F32)}), tmp_path, dtype="f32")


# ----------------------------------------------------------------------------------------------- Resize

#: name -> (attrs, scales or None, sizes or None, OpenVINO reads the forward and agrees with onnxruntime)
RESIZES = {
    **{
        f"nearest-{nm}": ({"mode": "nearest", "nearest_mode": nm}, (1, 1, 1.5, 0.6), None, True)
        for nm in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
    },
    **{
        f"{mode}-{ctm}": ({"mode": mode, "coordinate_transformation_mode": ctm}, (1, 1, 1.7, 0.6), None,
                          ctm not in ("half_pixel_symmetric", "tf_crop_and_resize"))
        for mode in ("nearest", "linear", "cubic")
        for ctm in ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
                    "tf_crop_and_resize")
    },
    "linear-upsample-2x": ({"mode": "linear"}, (1, 1, 2, 2), None, True),
    "nearest-sizes": ({"mode": "nearest"}, None, (2, 3, 9, 3), True),
    "linear-sizes-align": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"}, None,
                           (2, 3, 3, 8), True),
    "cubic-sizes-all-axes": ({"mode": "cubic", "cubic_coeff_a": -0.5}, None, (2, 3, 7, 4), True),
    "cubic-exclude-outside": ({"mode": "cubic", "exclude_outside": 1}, (1, 1, 1.6, 0.7), None, False),
    "linear-antialias": ({"mode": "linear", "antialias": 1}, (1, 1, 0.6, 0.5), None, False),
    "cubic-antialias": ({"mode": "cubic", "antialias": 1}, (1, 1, 0.45, 0.8), None, False),
    "linear-axes-attr": ({"mode": "linear", "axes": [3, 2]}, (0.6, 1.5), None, False),
}


@pytest.mark.parametrize("name", sorted(RESIZES))
def test_resize(tmp_path, name):
    """The gradient w.r.t. X in every mode, coordinate transformation and nearest mode (float32: onnxruntime has
    no float64 Resize)."""
    attrs, scales, sizes, ov = RESIZES[name]
    rng = np.random.default_rng(sorted(RESIZES).index(name))
    consts = {"roi": np.array([0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7], F32)}
    inputs = ["X", "roi" if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize" else ""]
    if scales is not None:
        consts["scales"] = np.array(scales, F32)
        inputs.append("scales")
    else:
        consts["sizes"] = i64(*sizes)
        inputs += ["", "sizes"]
    case = make_case([node("Resize", inputs, "y", **attrs)], "y", {"X": rand(rng, 2, 3, 5, 6, dtype=F32)},
                     consts=consts)
    check(case, tmp_path, dtype="f32", openvino=ov)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_with_symbolic_spatial_dims(tmp_path, mode):
    """A detector-style upsample between convolutions with symbolic batch, height and width: the resize matrices
    are built from run-time identities (EyeLike); the sizes are ``Concat(Shape(x)[:2], 2 * Shape(x)[2:])`` (by
    Shape's start/end or by a Slice), so batch and channel axes are known to be kept and not contracted."""
    rng = np.random.default_rng(43)
    if mode == "nearest":
        head = [node("Shape", ["x"], "lead", start=0, end=2), node("Shape", ["x"], "hw", start=2)]
    else:
        head = [node("Shape", ["x"], "shp"), node("Slice", ["shp", "s0", "s2"], "lead"),
                node("Slice", ["shp", "s2", "s4"], "hw")]
    nodes = [
        node("Conv", ["inp", "W0"], "x", pads=[1, 1, 1, 1]),
        *head,
        node("Mul", ["hw", "two"], "hw2"),
        node("Concat", ["lead", "hw2"], "sizes", axis=0),
        node("Resize", ["x", "", "", "sizes"], "u", mode=mode),
        node("Conv", ["u", "W1"], "y"),
    ]
    weights = {"W0": rand(rng, 3, 2, 3, 3, dtype=F32), "W1": rand(rng, 2, 3, 1, 1, dtype=F32)}
    inp = rand(rng, 2, 2, 4, 5, dtype=F32)
    consts = {"two": i64(2, 2), "s0": i64(0), "s2": i64(2), "s4": i64(4)}
    case = make_case(nodes, "y", weights, consts=consts, inputs={"inp": inp}, symbolic={"inp": ["b", 2, "h", "w"]})
    result, _ = check(case, tmp_path, dtype="f32")
    assert [n.op_type for n in result.model.graph].count("Resize") == 3  # the forward and one per spatial axis


def test_upsample_is_upgraded_to_resize(tmp_path):
    """An opset-9 Upsample becomes Resize in the prepare pass's opset upgrade; its gradient is Resize's."""
    from bq_onnx.passes.prepare import UpgradeOpsetPass

    rng = np.random.default_rng(44)
    x = rand(rng, 1, 2, 3, 4, dtype=F32)
    graph = helper.make_graph(
        [helper.make_node("Upsample", ["X", "scales"], ["y"], mode="linear")], "up", [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(x, "X"), numpy_helper.from_array(np.array([1, 1, 2, 1.5], F32), "scales")],
    )
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model = UpgradeOpsetPass()(ir.from_proto(old)).model
    ops = [n.op_type for n in model.graph]
    assert "Resize" in ops and "Upsample" not in ops
    proto = ir.to_proto(model)
    del proto.graph.output[:]
    proto.graph.output.append(helper.make_empty_tensor_value_info("y"))
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer if i.name != "X"}
    constant_nodes = [n for n in proto.graph.node if n.op_type == "Constant"]
    consts |= {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in constant_nodes}
    nodes = [n for n in proto.graph.node if n.op_type != "Constant"]  # as the prepare pass makes them initializers
    up = make_case(nodes, "y", {"X": x}, consts=consts)
    check(up, tmp_path, dtype="f32")


# ----------------------------------------------------------------------------------------------- activations

ACTIVATIONS = {
    "Softplus": {},
    "Softsign": {},
    "Mish": {},
    "Elu": {"alpha": 0.7},
    "Selu": {},
    "ThresholdedRelu": {"alpha": 0.4},
}


@pytest.mark.parametrize("op", sorted(ACTIVATIONS))
def test_activations_float32(tmp_path, op):
    """onnxruntime has these in float32 only."""
    rng = np.random.default_rng(45)
    w = rng.uniform(-3, 3, size=(4, 6)).astype(F32)
    w[np.abs(w) < 0.05] = 0.5  # away from the kinks
    w[np.abs(w - 0.4) < 0.05] = 1.0
    check(make_case([node(op, ["W"], "y", **ACTIVATIONS[op])], "y", {"W": w}), tmp_path, dtype="f32")


def test_prelu_broadcast_slope(tmp_path):
    rng = np.random.default_rng(46)
    x = rng.uniform(-3, 3, size=(2, 3, 4, 5)).astype(F32)
    x[np.abs(x) < 0.05] = 0.5
    weights = {"X": x, "S": rand(rng, 3, 1, 1, dtype=F32)}
    check(make_case([node("PRelu", ["X", "S"], "y")], "y", weights), tmp_path, dtype="f32")


@pytest.mark.parametrize("op", ["Sin", "Cos"])
def test_trigonometric(tmp_path, op):
    rng = np.random.default_rng(47)
    check(make_case([node(op, ["W"], "y")], "y", {"W": rand(rng, 3, 4)}), tmp_path)


def test_mean(tmp_path):
    """float32 (onnxruntime has no float64 Mean)."""
    rng = np.random.default_rng(48)
    weights = {"A": rand(rng, 3, 1, dtype=F32), "B": rand(rng, 4, dtype=F32), "C": rand(rng, 2, 3, 4, dtype=F32)}
    check(make_case([node("Mean", list(weights), "y")], "y", weights), tmp_path, dtype="f32")


# ----------------------------------------------------------------------------------------------- normalizations


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (2, 3, 6)], ids=str)
def test_instance_normalization(tmp_path, shape):
    """float32 (onnxruntime has no float64 InstanceNormalization)."""
    rng = np.random.default_rng(49)
    weights = {"X": rand(rng, *shape, dtype=F32), "S": rand(rng, 3, dtype=F32), "B": rand(rng, 3, dtype=F32)}
    nodes = [node("InstanceNormalization", list(weights), "y", epsilon=1e-3)]
    check(make_case(nodes, "y", weights), tmp_path, dtype="f32")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_normalization(tmp_path, groups):
    """float32: onnxruntime computes the statistics in float32 (``stash_type`` 1) even for float64 inputs."""
    rng = np.random.default_rng(50)
    weights = {"X": rand(rng, 2, 4, 3, 2, dtype=F32), "S": rand(rng, 4, dtype=F32), "B": rand(rng, 4, dtype=F32)}
    nodes = [node("GroupNormalization", list(weights), "y", num_groups=groups, epsilon=1e-3)]
    check(make_case(nodes, "y", weights), tmp_path, dtype="f32")


def test_group_normalization_with_symbolic_spatial_dims(tmp_path):
    """The rule needs only the channel count. onnxruntime only: onnx's shape inference leaves the output of a
    GroupNormalization with symbolic spatial dims without a shape, so the harness's ``y * R`` is unbroadcast with
    run-time axes, which OpenVINO's reader refuses (not this rule's doing)."""
    rng = np.random.default_rng(58)
    weights = {"S": rand(rng, 4, dtype=F32), "B": rand(rng, 4, dtype=F32), "W": rand(rng, 4, 1, 1, dtype=F32)}
    nodes = [node("Mul", ["inp", "W"], "x"), node("GroupNormalization", ["x", "S", "B"], "y", num_groups=2)]
    case = make_case(nodes, "y", weights, inputs={"inp": rand(rng, 2, 4, 3, 5, dtype=F32)},
                     symbolic={"inp": ["n", 4, "h", "w"]})
    check(case, tmp_path, dtype="f32", openvino=False)


# ----------------------------------------------------------------------------------------------- Einsum

EINSUMS = {
    "matmul": ("ij,jk->ik", [(3, 4), (4, 5)]),
    "batched": ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    "attention": ("bhid,bhjd->bhij", [(2, 2, 3, 4), (2, 2, 5, 4)]),
    "summed-in-one-operand": ("ij,jk->i", [(3, 4), (4, 5)]),
    "scalar-output": ("ij,ij->", [(3, 4), (3, 4)]),
    "single-transpose": ("ijk->kij", [(2, 3, 4)]),
    "single-sum": ("ijk->j", [(2, 3, 4)]),
    "implicit": ("ij,jk", [(3, 4), (4, 5)]),
    "ellipsis-broadcast": ("...ij,...jk->...ik", [(2, 3, 4), (1, 4, 5)]),
    "ellipsis-implicit": ("...j,j", [(2, 3, 4), (4,)]),
    "three-operands": ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)]),
    "outer": ("i,j->ij", [(3,), (4,)]),
    "uppercase": ("Ab,bC->AC", [(2, 3), (3, 4)]),
}


@pytest.mark.parametrize("name", sorted(EINSUMS))
def test_einsum(tmp_path, name):
    equation, shapes = EINSUMS[name]
    rng = np.random.default_rng(sorted(EINSUMS).index(name))
    weights = {f"X{i}": rand(rng, *s) for i, s in enumerate(shapes)}
    check(make_case([node("Einsum", list(weights), "y", equation=equation)], "y", weights), tmp_path)


# ----------------------------------------------------------------------------------------------- refusals


def test_unsupported_forms_are_reported_not_wrong():
    """Forms a rule does not implement block their weights with a reason instead of giving a wrong gradient."""
    rng = np.random.default_rng(51)
    w = rand(rng, 3, 3)
    cases = {
        "diagonal": make_case([node("Einsum", ["W"], "y", equation="ii->i")], "y", {"W": w}),
        "length-1 label": make_case(
            [node("Einsum", ["W", "V"], "y", equation="ij,ij->ij")], "y", {"W": w[:1], "V": w}
        ),
        "run-time axes": make_case(
            [node("ReduceMax", ["W", "axes"], "y")], "y", {"W": w}, inputs={"axes": i64(1)}, symbolic={"axes": [1]}
        ),
        "noop L2": make_case([node("ReduceL2", ["W"], "y", noop_with_empty_axes=1)], "y", {"W": w}),
        "aspect policy": make_case(
            [node("Resize", ["X", "", "", "sizes"], "y", keep_aspect_ratio_policy="not_larger")],
            "y", {"X": rand(rng, 1, 1, 4, 4, dtype=F32)}, consts={"sizes": i64(1, 1, 3, 2)}
        ),
        "huge resize matrix": make_case(
            [node("Resize", ["X", "", "scales"], "y", mode="nearest")], "y", {"X": rand(rng, 1, 1, 5000, dtype=F32)},
            consts={"scales": np.array([1, 1, 4], F32)}
        ),
    }
    for label, case in cases.items():
        blocked = _unsupported(case)
        assert sorted(blocked) == sorted(case.wrt), label


def test_supported_ops_cover_issue_14():
    required = {
        "Max", "Min", "ReduceMax", "ReduceMin", "GlobalMaxPool", "Tile", "Pad", "Resize", "InstanceNormalization",
        "GroupNormalization", "Softplus", "Einsum", "CumSum", "Elu", "Selu", "PRelu", "Softsign", "Mish", "Sin",
        "Cos", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "DepthToSpace",
        "SpaceToDepth", "GatherElements", "GatherND", "ScatterND", "ScatterElements", "Trilu", "LRN",
        "ThresholdedRelu", "Mean", "Where", "Expand", "HardSwish", "HardSigmoid", "LSTM", "GRU", "RNN",
        "If", "Loop", "Scan",  # tests/test_vjp_control.py; Upsample: upgraded to Resize (test above)
    }
    assert required <= supported_ops()


# ----------------------------------------------------------------------------------------------- end to end


def test_detector_like_model_gets_gradients_for_every_weight():
    """Weights behind Resize, Max, GlobalMaxPool, Pad and InstanceNormalization used to fall back to the
    activations estimator (issue 14); with the rules every weight of such a model gets the Laplace posterior
    from gradients (symbolic batch, height and width)."""
    from bq_onnx.config import WeightsConfig
    from bq_onnx.estimators import estimate_posterior
    from tests.conftest import make_model

    rng = np.random.default_rng(57)

    def w(*shape):
        return numpy_helper.from_array((0.3 * rng.standard_normal(shape)).astype(F32), f"W{len(inits)}")

    inits: list = []
    for shape in ((8, 3, 3, 3), (8,), (8, 8, 3, 3), (8, 16, 1, 1), (8,), (8,), (16, 8), (16,)):
        inits.append(w(*shape))
    names = [i.name for i in inits]
    nodes = [
        helper.make_node("Pad", ["img", "pads"], ["padded"], mode="reflect"),
        helper.make_node("Conv", ["padded", names[0], names[1]], ["c1"], strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", names[2]], ["c2"], pads=[1, 1, 1, 1]),
        helper.make_node("Resize", ["c2", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Resize", ["r1", "", "scales"], ["skip"], mode="linear"),
        helper.make_node("Concat", ["up", "skip"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", names[3]], ["c3"]),
        helper.make_node("InstanceNormalization", ["c3", names[4], names[5]], ["n3"]),
        helper.make_node("Max", ["n3", "up"], ["m"]),
        helper.make_node("GlobalMaxPool", ["m"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", names[6], names[7]], ["logits"], transB=1),
    ]
    inits += [numpy_helper.from_array(i64(0, 0, 1, 1, 0, 0, 1, 1), "pads"),
              numpy_helper.from_array(np.array([1, 1, 2, 2], F32), "scales")]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 16])],
        inits,
    )
    calib = {"img": rng.standard_normal((6, 3, 8, 10)).astype(F32)}
    posterior = estimate_posterior(ir.from_proto(model), calib, "laplace", weights=WeightsConfig(min_size=1))
    sources = {name: p.source for name, p in posterior.weights.items()}
    assert sources and set(sources.values()) == {"laplace"}, sources
    assert not [n for n in posterior.notes if "no gradient rule" in n]
