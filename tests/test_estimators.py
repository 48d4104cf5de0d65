"""Gradient-based estimators against closed forms on a softmax-regression model where the Fisher is known.

For ``logits = x W`` with softmax cross-entropy: per-sample gradient ``x_k (p_c - y_c)``, so the empirical
Fisher diagonal is ``mean_i x_ik^2 (p_ic - y_ic)^2`` and the true Fisher (= Hessian of the KL at the trained
weights) is ``mean_i x_ik^2 p_ic (1 - p_ic)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.estimate import estimate_posterior, gradients
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
    post = estimate_posterior(model, {"input": x}, "laplace", loss="ce", labels=labels, min_size=1,
                              prior_precision=0.25)
    y = np.eye(C)[labels]
    expected = (x.astype(np.float64) ** 2).T @ ((p - y) ** 2) / N
    np.testing.assert_allclose(post.weights["W"].curvature, expected, rtol=2e-4)
    np.testing.assert_allclose(post.weights["W"].precision, N * expected + 0.25, rtol=2e-4)
    # without labels: the FP32 model's top-1 class is the pseudo-label
    post = estimate_posterior(model, {"input": x}, "laplace", min_size=1)
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
    post = estimate_posterior(model, {"input": x}, method, min_size=1, **options)
    exact = (x.astype(np.float64) ** 2).T @ (p * (1 - p)) / N
    got = post.weights["W"].curvature
    assert abs(got.sum() / exact.sum() - 1) < tolerance
    assert np.corrcoef(got.ravel(), exact.ravel())[0, 1] > correlation


def test_gradients_api_matches_closed_form(softmax_regression):
    model, x, p, labels = softmax_regression
    g = gradients(model, {"input": x[:10]}, loss="ce", labels=labels[:10], min_size=1)["W"]
    y = np.eye(C)[labels[:10]]
    np.testing.assert_allclose(g, x[:10].T.astype(np.float64) @ (p[:10] - y), rtol=1e-4, atol=1e-5)
    # the KL to the model's own output has zero gradient at the trained weights
    g = gradients(model, {"input": x[:10]}, min_size=1)["W"]
    assert np.abs(g).max() < 1e-5


def test_estimators_are_deterministic_with_the_seed(softmax_regression):
    model, x, _, _ = softmax_regression
    a = estimate_posterior(model, {"input": x[:50]}, "fisher-mc", min_size=1, seed=3)
    b = estimate_posterior(model, {"input": x[:50]}, "fisher-mc", min_size=1, seed=3)
    np.testing.assert_array_equal(a.weights["W"].precision, b.weights["W"].precision)
