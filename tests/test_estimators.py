"""Gradient-based estimators against closed forms on a softmax-regression model where the Fisher is known.

For ``logits = x W`` with softmax cross-entropy: per-sample gradient ``x_k (p_c - y_c)``, so the empirical
Fisher diagonal is ``mean_i x_ik^2 (p_ic - y_ic)^2`` and the true Fisher (= Hessian of the KL at the trained
weights) is ``mean_i x_ik^2 p_ic (1 - p_ic)``.
"""

from __future__ import annotations

import tempfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.config import WeightsConfig
from bq_onnx.estimators import estimate_posterior, gradients
from tests.conftest import make_model

K, C, N = 12, 4, 300


@pytest.fixture(scope="module")
def softmax_regression():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, C)) * 0.7).astype(np.float32)
    model = make_model(
        [helper.make_node("MatMul", ["input", "W"], ["logits"])],
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["b", K])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", C])],
        [numpy_helper.from_array(w, "W")],
    )
    x = rng.standard_normal((N, K)).astype(np.float32)
    z = x.astype(np.float64) @ w
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labels = rng.integers(0, C, N)
    return model, x, p, labels


def test_laplace_is_the_empirical_fisher(softmax_regression):
    model, x, p, labels = softmax_regression
    post = estimate_posterior(model, {"input": x}, "laplace", loss="ce", labels=labels,
                              weights=WeightsConfig(min_size=1), prior_precision=0.25)
    y = np.eye(C)[labels]
    expected = (x.astype(np.float64) ** 2).T @ ((p - y) ** 2) / N
    np.testing.assert_allclose(post.weights["W"].curvature, expected, rtol=2e-4)
    np.testing.assert_allclose(post.weights["W"].precision, N * expected + 0.25, rtol=2e-4)
    # without labels: the FP32 model's top-1 class is the pseudo-label
    post = estimate_posterior(model, {"input": x}, "laplace", weights=WeightsConfig(min_size=1))
    y = np.eye(C)[p.argmax(1)]
    np.testing.assert_allclose(post.weights["W"].curvature, (x.astype(np.float64) ** 2).T @ ((p - y) ** 2) / N,
                               rtol=2e-4)


@pytest.mark.parametrize(("method", "options", "tolerance", "correlation"), [
    ("fisher-mc", {"mc_samples": 64}, 0.08, 0.9),
    # rank-1 smoothing keeps the trace and the row/column profile, not every element (correlation 0.82 here)
    ("hutchinson", {"probes": 16}, 0.05, 0.75),
])
def test_fisher_estimators_converge_to_the_true_fisher(softmax_regression, method, options, tolerance, correlation):
    model, x, p, _ = softmax_regression
    post = estimate_posterior(model, {"input": x}, method, weights=WeightsConfig(min_size=1), **options)
    exact = (x.astype(np.float64) ** 2).T @ (p * (1 - p)) / N
    got = post.weights["W"].curvature
    assert abs(got.sum() / exact.sum() - 1) < tolerance
    assert np.corrcoef(got.ravel(), exact.ravel())[0, 1] > correlation


def test_gradients_api_matches_closed_form(softmax_regression):
    model, x, p, labels = softmax_regression
    g = gradients(model, {"input": x[:10]}, loss="ce", labels=labels[:10], weights=WeightsConfig(min_size=1))["W"]
    y = np.eye(C)[labels[:10]]
    np.testing.assert_allclose(g, x[:10].T.astype(np.float64) @ (p[:10] - y), rtol=1e-4, atol=1e-5)
    # the KL to the model's own output has zero gradient at the trained weights
    g = gradients(model, {"input": x[:10]}, weights=WeightsConfig(min_size=1))["W"]
    assert np.abs(g).max() < 1e-5


def test_an_already_loaded_calibration_gives_the_same_posterior(softmax_regression):
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare

    model, x, _, _ = softmax_regression
    calib = load_calibration({"input": x[:30]}, prepare(model, WeightsConfig(min_size=1)).model)
    loaded = estimate_posterior(model, calib, "fisher-mc", weights=WeightsConfig(min_size=1), seed=2)
    raw = estimate_posterior(model, {"input": x[:30]}, "fisher-mc", weights=WeightsConfig(min_size=1), seed=2)
    np.testing.assert_array_equal(loaded.weights["W"].precision, raw.weights["W"].precision)


def test_estimators_are_deterministic_with_the_seed(softmax_regression):
    model, x, _, _ = softmax_regression
    a = estimate_posterior(model, {"input": x[:50]}, "fisher-mc", weights=WeightsConfig(min_size=1), seed=3)
    b = estimate_posterior(model, {"input": x[:50]}, "fisher-mc", weights=WeightsConfig(min_size=1), seed=3)
    np.testing.assert_array_equal(a.weights["W"].precision, b.weights["W"].precision)


@pytest.mark.parametrize(
    ("group", "stride", "pad", "dilation"), [(1, 1, 0, 1), (1, 2, 1, 1), (2, 1, 1, 2), (4, 2, 0, 1)]
)
def test_im2col_patches_times_the_weight_view_is_the_convolution(group, stride, pad, dilation):
    """The K-FAC input rows of a Conv are its patches in the weight view's feature order."""
    from bq_onnx.estimators.kfac import im2col
    from bq_onnx.estimators.probes import ProbeSite
    from bq_onnx.layout import WeightLayout
    from bq_onnx.runtimes import get_runtime

    rng = np.random.default_rng(group * 10 + stride)
    c, m = 4, 8
    w = rng.standard_normal((m, c // group, 3, 3)).astype(np.float32)
    x = rng.standard_normal((1, c, 9, 10)).astype(np.float32)
    attrs = {"group": group, "strides": [stride, stride], "pads": [pad] * 4, "dilations": [dilation] * 2}
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 9, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "W")],
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/conv.onnx"
        onnx.save(model, path)
        y = get_runtime("onnxruntime").session(path).run({"x": x})[0][0]  # (M, Ho, Wo)
    patches = im2col(x, w.shape, attrs)  # (groups, positions, C/g*9)
    view = WeightLayout(w.shape, (1, 2, 3)).to_view(w).astype(np.float64)  # (C/g*9, M)
    per_group = m // group
    for g in range(group):
        cols = slice(g * per_group, (g + 1) * per_group)
        got = patches[g] @ view[:, cols]
        np.testing.assert_allclose(got.T.reshape(per_group, *y.shape[1:]), y[cols], rtol=1e-4, atol=1e-4)
    assert ProbeSite("W", "Conv", "x", "p", attrs, 1).op == "Conv"


def test_kfac_factors_on_softmax_regression(softmax_regression):
    model, x, p, _ = softmax_regression
    post = estimate_posterior(model, {"input": x}, "kfac", weights=WeightsConfig(min_size=1), mc_samples=64)
    a, g = post.weights["W"].kfac
    np.testing.assert_allclose(a, x.T.astype(np.float64) @ x / N, rtol=1e-5)
    expected_g = np.mean([np.diag(pi) - np.outer(pi, pi) for pi in p], axis=0)  # E_y[(p - y)(p - y)^T]
    np.testing.assert_allclose(g, expected_g, atol=0.02)
    np.testing.assert_allclose(post.weights["W"].curvature, np.outer(np.diag(a), np.diag(g)), rtol=1e-6)
    assert post.weights["W"].source == "kfac"


def test_embedding_rows_unseen_in_calibration_share_the_good_turing_mass_of_the_seen_rows():
    """A token the calibration never contains is not unimportant, but no more used than a once-seen one: the unread
    rows share the Good-Turing part of the seen rows' curvature (rows read once over all reads), each capped at the
    median seen row. Reference: the counts recomputed here from the ids."""
    from bq_onnx.posterior import DEFAULT_PRIOR_PRECISION
    from tests.conftest import MODELS

    with np.load(MODELS / "tiny_transformer_calib.npz") as data:
        ids = data["ids"][:4]
    post = estimate_posterior(MODELS / "tiny_transformer.onnx", {"ids": ids}, "laplace")
    table = post.weights["embed.weight"]
    curvature = (table.precision - DEFAULT_PRIOR_PRECISION) / post.samples
    counts = np.bincount(ids.ravel(), minlength=curvature.shape[0])
    seen = counts > 0
    assert 0 < seen.sum() < len(seen)
    share = max((counts == 1).sum(), 1) / counts.sum()
    per_row = curvature[seen].sum(axis=0) * share / (1 - share) / (~seen).sum()
    want = np.minimum(per_row, np.median(curvature[seen], axis=0))
    np.testing.assert_allclose(curvature[~seen], np.broadcast_to(want, curvature[~seen].shape), rtol=1e-4, atol=1e-12)
    assert (curvature[~seen] > 0).all()  # never free
    assert any("never read by the calibration data" in note and "Good-Turing" in note for note in post.notes)


# --- memory: layers summed one at a time, sessions without weight copies -----------------------------------


@pytest.mark.parametrize(("model_name", "forced"), [("tiny_transformer", False), ("tiny_transformer", True),
                                                   ("lenet", True)])
def test_batched_fisher_on_disk_gives_the_same_numbers_as_in_memory(model_name, forced):
    """Layer inputs and output gradients kept on disk and summed per weight when read: bit for bit the sums
    (``forced``: every site on disk, whatever it would cost)."""
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import Batch, prepare
    from bq_onnx.estimators.batched import BatchedFisher, BatchedGraph
    from bq_onnx.estimators.loss_targets import targets as loss_targets
    from bq_onnx.posterior import Spill
    from bq_onnx.runtimes.sessions import TempSessions
    from tests.conftest import MODELS

    prepared = prepare(MODELS / f"{model_name}.onnx")
    calib = load_calibration(MODELS / f"{model_name}_calib.npz", prepared.model, 21)
    sessions = TempSessions()
    try:
        out = sessions.open(prepared.model).run(dict(next(calib.batches(21))))[0]
        targets = [loss_targets("fisher-mc", "kl", out, None, np.random.default_rng(s)) for s in range(2)]
        graph = BatchedGraph.build(sessions, prepared, calib, "kl", None, 8)
        results = []
        for spill in (None, Spill()):
            fisher = BatchedFisher(graph, calib, targets, "fisher-mc", spill, 0 if forced else 3 * 2)
            for draw in range(2):
                for start in range(0, 21, 8):  # 8 + 8 + 5 (a short last batch)
                    fisher.update(Batch(slice(start, min(start + 8, 21)), draw))
            if spill is not None:
                assert set(fisher.sums) | set(fisher.stored) == set(graph.covered)
                assert all(len(v) == 6 for v in fisher.stored.values())
                if forced:
                    assert not fisher.sums
            assert fisher.count == 42
            results.append(dict(fisher.finalize().curvature.items()))
    finally:
        sessions.close()
    assert results[0].keys() == results[1].keys()
    for name in results[0]:
        np.testing.assert_array_equal(results[0][name], results[1][name])


def test_estimated_posterior_reads_means_from_the_model_and_holds_no_arrays(softmax_regression, tmp_path):
    model, x, _, _ = softmax_regression
    post = estimate_posterior(model, {"input": x[:40]}, "laplace", weights=WeightsConfig(min_size=1), seed=1)
    wp = post.weights["W"]
    assert wp.lazy
    np.testing.assert_array_equal(wp.mean, numpy_helper.to_array(model.graph.initializer[0]))
    np.testing.assert_array_equal(wp.precision, post.samples * wp.curvature + post.prior_precision)


def test_big_models_get_sessions_without_weight_copies_and_nearly_the_same_posterior(monkeypatch):
    """Over UNPACKED_SESSION_BYTES sessions skip pre-packing and constant folding (onnxruntime memory-maps the
    weights); the kernels then round differently, and nothing else changes."""
    import bq_onnx.runtimes.sessions as sessions_module
    from tests.conftest import MODELS

    path = MODELS / "digits_mlp.onnx"
    calib = MODELS / "digits_mlp_calib.npz"
    packed = estimate_posterior(path, calib, "laplace", calib_samples=24, batch_size=8)
    opened = []
    real = sessions_module.unpacked_session
    monkeypatch.setattr(sessions_module, "UNPACKED_SESSION_BYTES", 0)
    monkeypatch.setattr(sessions_module, "unpacked_session", lambda *a: opened.append(a) or real(*a))
    unpacked = estimate_posterior(path, calib, "laplace", calib_samples=24, batch_size=8)
    assert opened
    for name, wp in packed.weights.items():
        np.testing.assert_allclose(unpacked.weights[name].precision, wp.precision, rtol=1e-3)


def test_batched_fisher_batch_shrinks_to_the_activation_budget(monkeypatch):
    """The batch follows the activation budget (``BQ_ONNX_ACTIVATION_BUDGET_MB``), never above the request."""
    from bq_onnx.calibration import load_calibration
    from bq_onnx.estimators import prepare
    from bq_onnx.estimators.batched import BatchedGraph
    from bq_onnx.estimators.memory import adapted_batch
    from bq_onnx.runtimes.sessions import TempSessions
    from tests.conftest import MODELS

    assert adapted_batch(100, 32, budget=1000) == 10
    assert adapted_batch(100, 32, budget=10) == 1
    assert adapted_batch(100, 8, budget=10**6) == 8
    assert adapted_batch(None, 8, budget=10) == 8
    prepared = prepare(MODELS / "lenet.onnx")
    calib = load_calibration(MODELS / "lenet_calib.npz", prepared.model, 32)
    sessions = TempSessions()
    try:
        assert BatchedGraph.build(sessions, prepared, calib, "kl", None, 32).batch == 32  # 1 GiB: no change
        monkeypatch.setenv("BQ_ONNX_ACTIVATION_BUDGET_MB", "0.25")  # LeNet: ~0.11 MiB a sample
        small = BatchedGraph.build(sessions, prepared, calib, "kl", None, 32).batch
        assert 1 <= small < 32
        monkeypatch.setenv("BQ_ONNX_ACTIVATION_BUDGET_MB", "0.0001")
        assert BatchedGraph.build(sessions, prepared, calib, "kl", None, 32).batch == 1
    finally:
        sessions.close()


def test_adapted_batch_gives_the_same_posterior_up_to_summation_order(monkeypatch):
    from tests.conftest import MODELS

    calib = MODELS / "lenet_calib.npz"
    full = estimate_posterior(MODELS / "lenet.onnx", calib, "fisher-mc", calib_samples=40, batch_size=32)
    monkeypatch.setenv("BQ_ONNX_ACTIVATION_BUDGET_MB", "0.25")
    small = [estimate_posterior(MODELS / "lenet.onnx", calib, "fisher-mc", calib_samples=40, batch_size=32)
             for _ in range(2)]
    assert full.weights.keys() == small[0].weights.keys()
    for name, weight in full.weights.items():
        a, b = np.asarray(weight.curvature), np.asarray(small[0].weights[name].curvature)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), name
        np.testing.assert_array_equal(b, small[1].weights[name].curvature)  # deterministic
