"""Batched per-sample squared gradients (bq_onnx.estimators.per_sample) against independent references.

The numpy routine is checked against explicit per-sample weight gradients in float64 (a direct convolution
written as loops over kernel offsets, and plain matrix products), and the batched estimator against the
one-sample-per-run estimator on models with Conv (groups, strides, pads, dilations), Gemm and batched MatMul.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.config import WeightsConfig
from bq_onnx.estimators import estimate_posterior
from bq_onnx.estimators.per_sample import squared_gradient_sum
from bq_onnx.estimators.probes import ProbeSite
from bq_onnx.layout import WeightLayout
from tests.conftest import make_model


def _conv_weight_grad(x: np.ndarray, d: np.ndarray, shape, attrs) -> np.ndarray:
    """float64 reference: dW[m, c, i, j] = sum_p xpad[c_in(m, c), i*dil + p*stride] d[m, p] for one sample."""
    m, c_local, kh, kw = shape
    groups = attrs.get("group", 1)
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilations", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    xp = np.pad(x.astype(np.float64), ((0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    ho, wo = d.shape[1:]
    out = np.zeros(shape)
    for mm in range(m):
        g = mm // (m // groups)
        for c in range(c_local):
            for i in range(kh):
                for j in range(kw):
                    patch = xp[g * c_local + c, i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                               j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                    out[mm, c, i, j] = np.sum(patch * d[mm])
    return out


def _assert_conv_sum_matches(x: np.ndarray, d: np.ndarray, shape: tuple, attrs: dict) -> None:
    """The batched sum of squared Conv weight gradients equals the explicit per-sample sum."""
    layout = WeightLayout(shape, (1, 2, 3))
    site = ProbeSite("W", "Conv", "x", "p", attrs, 1)
    got = squared_gradient_sum(site, shape, layout.view_shape, x, d)
    want = sum(np.square(_conv_weight_grad(x[n], d[n], shape, attrs)) for n in range(len(x)))
    np.testing.assert_allclose(layout.from_view(got), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("group", "stride", "pad", "dilation"), [(1, 1, 0, 1), (1, 2, 1, 1), (2, 1, 2, 2),
                                                                   (4, 2, 1, 1)])
def test_conv_squared_gradients_match_explicit_per_sample_gradients(group, stride, pad, dilation):
    rng = np.random.default_rng(group + 3 * stride + 5 * pad)
    b, c, m, h = 5, 4, 8, 9
    shape = (m, c // group, 3, 2)
    attrs = {"group": group, "strides": [stride, stride], "pads": [pad, pad + 1, pad, pad],
             "dilations": [dilation, dilation]}
    ho = (h + 2 * pad - dilation * 2 - 1) // stride + 1
    wo = (h + 2 * pad + 1 - dilation - 1) // stride + 1
    x = rng.standard_normal((b, c, h, h)).astype(np.float32)
    d = rng.standard_normal((b, m, ho, wo)).astype(np.float32)
    _assert_conv_sum_matches(x, d, shape, attrs)


@pytest.mark.parametrize(("strides", "dilations", "pads", "width", "group"), [
    ((2, 1), (1, 1), (1, 0, 0, 2), 9, 1),  # contiguous patch rows, every second row
    ((1, 2), (1, 1), (0, 1, 2, 0), 9, 2),  # column stride: one strided copy per kernel offset
    ((1, 1), (2, 3), (2, 1, 0, 3), 11, 1),  # rows with dilation and uneven pads
    ((3, 1), (1, 2), (0, 0, 0, 0), 12, 4),
    ((1, 1), (1, 1), (3, 4, 3, 4), 3, 1),  # padded width more than twice the output width: per-offset copies
])
@pytest.mark.parametrize("chunk", [None, 200])  # 200: patches gathered a few samples at a time
def test_conv_patch_layouts_match_explicit_per_sample_gradients(monkeypatch, strides, dilations, pads, width, group,
                                                                 chunk):
    import bq_onnx.estimators.per_sample as per_sample

    if chunk:
        monkeypatch.setattr(per_sample, "MAX_PATCH_ELEMENTS", chunk)
    rng = np.random.default_rng(sum(strides) + 7 * width + group)
    b, c, m, h = 6, 4, 8, 7
    shape = (m, c // group, 3, 2)
    attrs = {"group": group, "strides": list(strides), "pads": list(pads), "dilations": list(dilations)}
    ho = (h + pads[0] + pads[2] - dilations[0] * 2 - 1) // strides[0] + 1
    wo = (width + pads[1] + pads[3] - dilations[1] - 1) // strides[1] + 1
    x = rng.standard_normal((b, c, h, width)).astype(np.float32)
    d = rng.standard_normal((b, m, ho, wo)).astype(np.float32)
    _assert_conv_sum_matches(x, d, shape, attrs)


@pytest.mark.parametrize("op", ["Conv", "Conv-groups-strided"])
def test_conv_products_in_numpy_and_in_onnxruntime_match_explicit_per_sample_gradients(monkeypatch, op):
    """Patch products run in numpy (big) or in a one-thread onnxruntime MatMul (small): both paths, with a short
    batch after a full one (the cached session has a symbolic sample axis), against float64 references."""
    import bq_onnx.estimators.per_sample as per_sample

    rng = np.random.default_rng(7)
    group, stride = (1, 1) if op == "Conv" else (2, 2)
    shape = (4, 6 // group, 3, 3)
    attrs = {"group": group, "strides": [stride, 1], "pads": [1, 1, 1, 1]}
    layout = WeightLayout(shape, (1, 2, 3))
    site = ProbeSite("W", "Conv", "x", "p", attrs, 1)
    data = {b: (rng.standard_normal((b, 6, 7, 8)).astype(np.float32),
                rng.standard_normal((b, 4, (7 - 1) // stride + 1, 8)).astype(np.float32)) for b in (6, 3)}
    results = {}
    for macs in (0, 1 << 40):  # everything in numpy / everything in onnxruntime
        monkeypatch.setattr(per_sample, "SMALL_PRODUCT_MACS", macs)
        for b, (x, d) in data.items():
            got = layout.from_view(squared_gradient_sum(site, shape, layout.view_shape, x, d))
            want = sum(np.square(_conv_weight_grad(x[n], d[n], shape, attrs)) for n in range(b))
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
            results.setdefault(b, []).append(got)
    for in_numpy, in_onnxruntime in results.values():
        np.testing.assert_allclose(in_numpy, in_onnxruntime, rtol=1e-5, atol=1e-7)
    assert per_sample._SESSIONS  # the onnxruntime path ran


@pytest.mark.parametrize("rows", [1, 7])
def test_matmul_squared_gradients_match_explicit_per_sample_gradients(rows):
    rng = np.random.default_rng(rows)
    b, k, n = 6, 5, 3
    a = rng.standard_normal((b, rows, k)).astype(np.float32)
    d = rng.standard_normal((b, rows, n)).astype(np.float32)
    if rows == 1:
        a, d = a[:, 0], d[:, 0]
    site = ProbeSite("W", "MatMul", "a", "p", {}, -1)
    got = squared_gradient_sum(site, (k, n), (k, n), a, d)
    a64, d64 = a.reshape(b, -1, k).astype(np.float64), d.reshape(b, -1, n).astype(np.float64)
    want = sum(np.square(a64[i].T @ d64[i]) for i in range(b))
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.fixture(scope="module")
def mixed_model():
    """Conv (grouped, strided, padded, dilated) -> Relu -> Flatten -> Gemm(transB) and a batched MatMul branch."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((6, 2, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((5, 6 * 3 * 3)) * 0.2).astype(np.float32)
    w3 = (rng.standard_normal((7, 5)) * 0.4).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c"], group=2, strides=[2, 2], pads=[1, 1, 1, 1],
                         dilations=[1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "W2"], ["h"], transB=1),
        helper.make_node("MatMul", ["t", "W3"], ["u"]),  # t: [b, 4, 7] tokens
        helper.make_node("ReduceMean", ["u", "ax"], ["um"], keepdims=0),
        helper.make_node("Add", ["h", "um"], ["logits"]),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, 6, 6]),
         helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b", 4, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 5])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"), numpy_helper.from_array(w3, "W3"),
         numpy_helper.from_array(np.array([1], dtype=np.int64), "ax")],
    )
    feeds = {"x": rng.standard_normal((37, 4, 6, 6)).astype(np.float32),
             "t": rng.standard_normal((37, 4, 7)).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize("method", ["laplace", "fisher-mc"])
def test_batched_estimator_equals_one_sample_per_run(mixed_model, method):
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare
    from bq_onnx.graph import batch_major_weights
    from bq_onnx.model_io import copy_model

    model, feeds = mixed_model
    prepared = prepare(model, WeightsConfig(min_size=1))
    calib = load_calibration(feeds, prepared.model)
    assert batch_major_weights(copy_model(prepared.model), prepared.weights, calib) == {"W1": 1, "W2": 1, "W3": 1}
    batched = estimate_posterior(model, feeds, method, weights=WeightsConfig(min_size=1), batch_size=8, seed=1)
    loop = estimate_posterior(model, feeds, method, weights=WeightsConfig(min_size=1), batch_size=1, seed=1)
    assert set(batched.weights) == {"W1", "W2", "W3"}
    for name, post in batched.weights.items():
        assert post.source == method
        np.testing.assert_allclose(post.precision, loop.weights[name].precision, rtol=2e-4,
                                   err_msg=f"{name} ({method})")


@pytest.mark.parametrize("method", ["laplace", "fisher-mc"])
def test_a_broadcast_against_a_computed_shape_keeps_the_layers_after_it_batched(method):
    """Issue 17: ONNX shape inference loses the sample axis where a sample-major tensor is added to one of a computed
    shape (all-MiniLM's token-type embeddings: ``Slice`` to the sequence length, ``Expand``, ``Gather``); every layer
    after it then ran one sample per run. The axis is carried through the broadcast
    (:func:`bq_onnx.graph.carry_sample_axis`), a lookup of rows from a computed shape added in is probed after its
    ``Add`` (:func:`bq_onnx.graph.broadcast_sum`), and the batched posterior equals the one-sample-per-run one for
    every weight."""
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare
    from bq_onnx.graph import batch_major_weights
    from bq_onnx.model_io import copy_model

    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Shape", ["t"], ["shp"], end=2),
        helper.make_node("Shape", ["t"], ["len"], start=1, end=2),
        helper.make_node("Slice", ["zeros", "start", "len", "one"], ["sl"]),
        helper.make_node("Expand", ["sl", "shp"], ["ids"]),
        helper.make_node("Gather", ["table", "ids"], ["bias"]),  # [?, ?, 7]: the sample axis lost in the Add
        helper.make_node("Add", ["t", "bias"], ["tb"]),
        helper.make_node("LayerNormalization", ["tb", "gamma"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "W3"], ["u"]),
        helper.make_node("Relu", ["u"], ["ur"]),
        helper.make_node("MatMul", ["ur", "W4"], ["v"]),
        helper.make_node("ReduceMean", ["v", "ax"], ["logits"], keepdims=0),
    ]
    model = make_model(
        nodes, [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b", 4, 7])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array((rng.standard_normal((7, 5)) * 0.4).astype(np.float32), "W3"),
         numpy_helper.from_array((rng.standard_normal((5, 3)) * 0.4).astype(np.float32), "W4"),
         numpy_helper.from_array(rng.standard_normal((2, 7)).astype(np.float32), "table"),

         numpy_helper.from_array(np.ones(7, np.float32), "gamma"),
         numpy_helper.from_array(np.zeros((1, 16), np.int64), "zeros"),
         numpy_helper.from_array(np.array([0], np.int64), "start"),
         numpy_helper.from_array(np.array([1], np.int64), "one"),
         numpy_helper.from_array(np.array([1], np.int64), "ax")])
    feeds = {"t": rng.standard_normal((29, 4, 7)).astype(np.float32)}
    weights = WeightsConfig(min_size=1)
    prepared = prepare(model, weights)
    calib = load_calibration(feeds, prepared.model)
    assert batch_major_weights(copy_model(prepared.model), prepared.weights, calib) == {"W3": 1, "W4": 1, "table": 1}
    batched = estimate_posterior(model, feeds, method, weights=weights, batch_size=8, seed=1)
    loop = estimate_posterior(model, feeds, method, weights=weights, batch_size=1, seed=1)
    assert set(batched.weights) == {"W3", "W4", "table"}
    for name in batched.weights:
        np.testing.assert_allclose(batched.weights[name].precision, loop.weights[name].precision, rtol=2e-4,
                                   err_msg=f"{name} ({method})")


@pytest.mark.parametrize("method", ["laplace", "fisher-mc"])
def test_two_lookups_summed_by_one_add_share_its_probe(method):
    """BERT adds its word, position and token-type lookups: every one is probed after the same ``Add``, whose
    gradient is each lookup's. One probe serves them all (a second one of the same name made onnxruntime refuse the
    gradient graph: all-MiniLM-L6-v2 as torch exports it, found by ``benchmarks/gptq.py``), and the batched
    posterior equals the one-sample-per-run one."""
    rng = np.random.default_rng(5)
    nodes = [
        helper.make_node("Gather", ["words", "ids"], ["w"]),  # [b, 4, 7]
        helper.make_node("Gather", ["positions", "pos"], ["p"]),  # [1, 4, 7]: shared by the samples
        helper.make_node("Add", ["w", "p"], ["e"]),
        helper.make_node("LayerNormalization", ["e", "gamma"], ["n"], axis=-1),
        helper.make_node("MatMul", ["n", "W3"], ["u"]),
        helper.make_node("ReduceMean", ["u", "ax"], ["logits"], keepdims=0),
    ]
    model = make_model(
        nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 3])],
        [numpy_helper.from_array(rng.standard_normal((9, 7)).astype(np.float32), "words"),
         numpy_helper.from_array(rng.standard_normal((6, 7)).astype(np.float32), "positions"),
         numpy_helper.from_array(np.arange(4, dtype=np.int64)[None], "pos"),
         numpy_helper.from_array((rng.standard_normal((7, 3)) * 0.4).astype(np.float32), "W3"),
         numpy_helper.from_array(np.ones(7, np.float32), "gamma"),
         numpy_helper.from_array(np.array([1], np.int64), "ax")])
    feeds = {"ids": rng.integers(0, 9, (21, 4)).astype(np.int64)}
    weights = WeightsConfig(min_size=1)
    batched = estimate_posterior(model, feeds, method, weights=weights, batch_size=8, seed=1)
    loop = estimate_posterior(model, feeds, method, weights=weights, batch_size=1, seed=1)
    assert set(batched.weights) == {"words", "positions", "W3"}
    for name in batched.weights:
        assert batched.weights[name].source == method, name
        np.testing.assert_allclose(batched.weights[name].precision, loop.weights[name].precision, rtol=2e-4,
                                   err_msg=f"{name} ({method})")


def test_gather_squared_gradients_of_one_row_of_indices_shared_by_the_samples():
    """A lookup broadcast over the samples by an ``Add`` (BERT's position embeddings) reads one row of indices for
    every sample: each sample's gradient adds its own output gradient into those rows."""
    rng = np.random.default_rng(8)
    ids, d = np.array([[3, 1, 3, 0]]), rng.standard_normal((5, 4, 7))
    want = np.zeros((6, 7))
    for n in range(5):
        g = np.zeros((6, 7))
        np.add.at(g, ids[0], d[n])
        want += g ** 2
    np.testing.assert_allclose(squared_gradient_sum(ProbeSite("E", "Gather", "ids", "p", {}, 0), (6, 7), (6, 7),
                                                    ids, d.astype(np.float32)), want, rtol=1e-5)


def test_a_batch_declared_minus_one_is_batched():
    """PaddlePaddle exports declare a dynamic batch as ``dim_value: -1`` (PP-OCR's classifier): a sample axis, not a
    fixed batch; it was taken for one, and all 49 of that model's weights ran one sample per run (issue 17)."""
    rng = np.random.default_rng(4)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3])],
                       [numpy_helper.from_array(rng.standard_normal((6, 3)).astype(np.float32), "W")])
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare
    from bq_onnx.graph import batch_major_weights
    from bq_onnx.model_io import copy_model

    prepared = prepare(model, WeightsConfig(min_size=1))
    calib = load_calibration({"x": rng.standard_normal((10, 6)).astype(np.float32)}, prepared.model)
    assert batch_major_weights(copy_model(prepared.model), prepared.weights, calib) == {"W": 1}


def test_fixed_batch_models_are_not_batched():
    """A model whose input has a fixed first dimension runs one sample at a time (same result)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                       [numpy_helper.from_array(w, "W")])
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare
    from bq_onnx.graph import batch_major_weights
    from bq_onnx.model_io import copy_model

    x = rng.standard_normal((10, 6)).astype(np.float32)
    prepared = prepare(model, WeightsConfig(min_size=1))
    calib = load_calibration({"x": x}, prepared.model)
    assert batch_major_weights(copy_model(prepared.model), prepared.weights, calib) == {}


def test_gather_squared_gradients_match_explicit_per_sample_gradients():
    """Repeated tokens within a sample add up before squaring; negative ids count from the end."""
    rng = np.random.default_rng(5)
    vocab, dim, b, t = 7, 3, 4, 5
    ids = rng.integers(-vocab, vocab, size=(b, t))
    ids[0, :3] = 2  # a token three times in one sample
    d = rng.standard_normal((b, t, dim)).astype(np.float32)
    site = ProbeSite("E", "Gather", "ids", "p", {}, 0)
    got = squared_gradient_sum(site, (vocab, dim), (vocab, dim), ids, d)
    want = np.zeros((vocab, dim))
    for n in range(b):
        g = np.zeros((vocab, dim))
        for pos in range(t):
            g[ids[n, pos] % vocab] += d[n, pos]
        want += np.square(g)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(squared_gradient_sum(site, (vocab, dim), (dim, vocab), ids, d), want.T, rtol=1e-5,
                               atol=1e-7)


def test_gather_squared_gradients_of_a_3d_table_with_unread_rows():
    """A table [rows, 2, 3] read by ids [B, 2, 3]: rows no sample reads stay zero, repeats add up per sample."""
    rng = np.random.default_rng(6)
    vocab, b = 9, 6
    ids = rng.integers(0, 4, size=(b, 2, 3))  # rows 4.. are never read
    d = rng.standard_normal((b, 2, 3, 2, 3)).astype(np.float32)
    site = ProbeSite("E", "Gather", "ids", "p", {}, 0)
    got = squared_gradient_sum(site, (vocab, 2, 3), (vocab, 6), ids, d)
    want = np.zeros((vocab, 6))
    for n in range(b):
        g = np.zeros((vocab, 6))
        np.add.at(g, ids[n].reshape(-1), d[n].reshape(-1, 6).astype(np.float64))
        want += np.square(g)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert not got[4:].any()


def test_every_tiny_transformer_weight_is_batched_embedding_included():
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare
    from bq_onnx.estimators.batched import BatchedGraph
    from bq_onnx.runtimes.sessions import TempSessions
    from tests.conftest import MODELS

    prepared = prepare(MODELS / "tiny_transformer.onnx")
    calib = load_calibration(MODELS / "tiny_transformer_calib.npz", prepared.model, 16)
    sessions = TempSessions()
    try:
        graph = BatchedGraph.build(sessions, prepared, calib, "kl", None, 8)
        assert {s.weight for s in graph.sites} == {w.name for w in prepared.weights}
    finally:
        sessions.close()
