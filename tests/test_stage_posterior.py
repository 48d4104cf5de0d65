"""posterior stage (bq_onnx/stages/posterior.py): a given posterior must match the weights found, by name, shape
and (unless external) values; an estimated one covers every weight."""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx.errors import DataError
from bq_onnx.posterior import Posterior, WeightPosterior
from bq_onnx.stages import posterior as stage
from tests import passkit, tiny


def _found():
    ctx = passkit.context(min_size=64)
    model = passkit.find_weights(passkit.prepare(passkit.load(tiny.layouts_model()), ctx), ctx)
    return model, ctx


def _posterior(weights: dict[str, np.ndarray], method: str = "laplace") -> Posterior:
    return Posterior(method, 4, 1e-4, {n: WeightPosterior(w, np.ones_like(w), np.ones_like(w), method)
                                       for n, w in weights.items()})


def test_a_matching_posterior_is_kept_and_a_wrong_one_named():
    _, ctx = _found()
    good = _posterior(dict(tiny.WEIGHTS))
    assert stage.matched(good, ctx.weights) is good
    missing = _posterior({k: v for k, v in tiny.WEIGHTS.items() if k != "W"})
    with pytest.raises(DataError, match="no posterior for weight 'W'"):
        stage.matched(missing, ctx.weights, "p.npz")
    reshaped = _posterior({**tiny.WEIGHTS, "W": tiny.WEIGHTS["W"].T.copy()})
    with pytest.raises(DataError, match="posterior of 'W' has shape \\[24, 40\\], the weight has \\[40, 24\\]"):
        stage.matched(reshaped, ctx.weights)
    other = _posterior({**tiny.WEIGHTS, "W": tiny.WEIGHTS["W"] + 1})
    with pytest.raises(DataError, match="estimated for other weights"):
        stage.matched(other, ctx.weights)
    assert stage.matched(_posterior({**tiny.WEIGHTS, "W": tiny.WEIGHTS["W"] + 1}, "external"), ctx.weights)


def test_load_reads_a_saved_posterior(tmp_path):
    _, ctx = _found()
    path = tmp_path / "p.npz"
    _posterior(dict(tiny.WEIGHTS)).save(path)
    loaded = stage.load(path, ctx.weights)
    assert set(loaded.weights) == set(tiny.WEIGHTS)
    np.testing.assert_array_equal(loaded.weights["G"].mean, tiny.WEIGHTS["G"])


def test_estimate_covers_every_weight():
    from bq_onnx.calibration import load_calibration
    from bq_onnx.config import PosteriorConfig
    from tests.conftest import MODELS

    ctx = passkit.context()
    model = passkit.find_weights(passkit.prepare(passkit.load(MODELS / "lenet.onnx"), ctx), ctx)
    calib = load_calibration(MODELS / "lenet_calib.npz", model, max_samples=16)
    posterior = stage.estimate(model, ctx.weights, calib, PosteriorConfig(batch_size=8))
    assert set(posterior.weights) == {w.name for w in ctx.weights} and posterior.samples == 16
    for info in ctx.weights:
        wp = posterior.weights[info.name]
        assert wp.curvature.shape == info.layout.shape and np.all(wp.curvature >= 0)
        assert np.any(wp.curvature > 0), info.name
        np.testing.assert_array_equal(wp.mean, info.value.const_value.numpy())
