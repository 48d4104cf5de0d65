"""distill (bq_onnx/stages/distill.py): tunes scales with the codes fixed; the held-out KL never gets worse."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests import passkit
from tests.conftest import make_model

RNG = np.random.default_rng(7)
W1 = (RNG.standard_normal((16, 32)) / 4).astype(np.float32)
W2 = (RNG.standard_normal((32, 10)) / 4).astype(np.float32)
MODEL = make_model(
    [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
     helper.make_node("MatMul", ["r", "W2"], ["logits"])],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16])],
    [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 10])],
    [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")],
)
X = RNG.standard_normal((40, 16)).astype(np.float32)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _kl(weights: dict, x: np.ndarray) -> float:
    """Mean KL(float || quantized) of the output distribution, float64 numpy."""
    def logits(w1, w2):
        return np.maximum(x.astype(np.float64) @ w1, 0) @ w2

    p = _log_softmax(logits(W1.astype(np.float64), W2.astype(np.float64)))
    q = _log_softmax(logits(weights["W1"].astype(np.float64), weights["W2"].astype(np.float64)))
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))


def test_distillation_changes_only_metadata_and_lowers_the_held_out_kl():
    model, ctx = passkit.quantized_model(MODEL, bits=2, group_size=16, min_size=64)
    before = copy.deepcopy(passkit.quantized(ctx))
    ops = [n.op_type for n in model.graph]
    model = passkit.distill(model, ctx, {"x": X}, steps=8, lr=0.05, batch_size=16)
    assert [n.op_type for n in model.graph] == ops and {"W1", "W2"} <= set(model.graph.initializers)
    after = passkit.quantized(ctx)
    for name in ("W1", "W2"):
        np.testing.assert_array_equal(after[name].codes, before[name].codes)
        np.testing.assert_array_equal(after[name].scale, after[name].scale.astype(np.float16).astype(np.float32))
    assert any(not np.array_equal(after[n].scale, before[n].scale) for n in ("W1", "W2"))
    report = passkit.distillation(ctx)
    assert report["held_out_samples"] == 8 and report["kl_after"] < report["kl_before"]
    held = X[-8:]  # the last fifth of the calibration samples
    old = {n: q.dequantize() for n, q in before.items()}
    kl_before, kl_after = _kl(old, held), _kl(passkit.dequantized(ctx), held)
    assert kl_after < kl_before
    # the report's KL (onnxruntime, float32) is the same quantity
    assert (kl_before, kl_after) == pytest.approx((report["kl_before"], report["kl_after"]), rel=1e-3, abs=1e-6)
