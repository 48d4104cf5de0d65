"""``--tables measured`` (issue 18): every tensor's closed-form table is put on the measured scale, the tensor alone
quantized at the three widths around the budget and its loss against FP32 measured on calibration data. Why: the
diagonal curvature ranks tensors wrongly relative to each other (``benchmarks/table_calibration.md``)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from bq_onnx.stages.tables import KL_TO_CLOSED_FORM, MC_SAMPLES, measured_widths
from bq_onnx.weights import design, weight_view
from tests import passkit
from tests.test_one_scale import _calib, _estimated, _table, asinh_model

SETTINGS = {"bits": 4, "allowed_bits": [2, 3, 4, 5, 6, 7, 8], "granularity": "tensor"}


@pytest.mark.parametrize(("budget", "allowed", "expected"), [
    (4.0, (2, 3, 4, 5, 6, 7, 8), (3, 4, 5)), (3.5, (2, 3, 4, 5, 6, 7, 8), (2, 3, 4)),
    (2.5, (2, 3, 4, 5, 6, 7, 8), (2, 3, 4)), (8.0, (2, 3, 4, 5, 6, 7, 8), (6, 7, 8)),
    (4.5, (0, 2, 4, 8), (0, 2, 4, 8)), (3.0, (3,), (3,)),
])
def test_measured_widths_around_the_budget(budget, allowed, expected):
    assert measured_widths(allowed, budget) == expected


def _kl_reference(proto, name: str, weight: np.ndarray, x: np.ndarray) -> float:
    """Mean KL(FP32 || ``name`` replaced by ``weight``) over ``x``, float64 from onnxruntime's logits."""
    def logits(model) -> np.ndarray:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": x})[0].astype(np.float64)

    swapped = type(proto)()
    swapped.CopyFrom(proto)
    for i, init in enumerate(swapped.graph.initializer):
        if init.name == name:
            swapped.graph.initializer[i].CopyFrom(numpy_helper.from_array(weight.astype(np.float32), name))

    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    p, q = log_softmax(logits(proto)), log_softmax(logits(swapped))
    return float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))


def test_every_tensor_is_measured_at_the_widths_around_the_budget_against_a_float64_reference():
    calib = _calib()
    proto = asinh_model(True)
    model, ctx = _estimated(proto, calib, tables="measured", **SETTINGS)
    tables = passkit.tables(model, ctx, calib)
    assert any(m.startswith("3 weight(s) got loss tables measured on calibration data (widths 3, 4, 5")
               for m in ctx.messages), ctx.messages
    closed_model, closed_ctx = _estimated(proto, calib, **SETTINGS)
    closed_tables = passkit.tables(closed_model, closed_ctx, calib)
    x = calib["x"][:MC_SAMPLES]
    for info in ctx.weights:
        measured, closed = _table(tables, info.name), _table(closed_tables, info.name)
        view, importance = weight_view(ctx, info)
        ratios = []
        for bits in (3, 4, 5):
            decoded = info.layout.from_view(design(ctx, view, importance, bits, info.name).dequantize())
            reference = KL_TO_CLOSED_FORM * ctx.posterior.samples * _kl_reference(proto, info.name, decoded, x)
            j = SETTINGS["allowed_bits"].index(bits)
            np.testing.assert_allclose(measured[j], reference, rtol=1e-4)
            ratios.append(reference / closed[j])
        # outside the measured widths: the closed form times the nearest measured width's ratio (no larger loss
        # than the width below, as every table)
        np.testing.assert_allclose(measured[0], closed[0] * ratios[0], rtol=1e-6)
        for j in (5, 6):
            np.testing.assert_allclose(measured[j], min(closed[j] * ratios[2], measured[j - 1]), rtol=1e-6)


def test_a_tensor_whose_curvature_is_off_by_a_factor_gets_the_allocation_of_the_right_curvature():
    """A per-tensor error of the curvature (the diagonal Fisher misjudging how the network amplifies one tensor's
    error) moves the closed-form allocation; the measured tables do not read that scale."""
    calib = _calib()
    proto = asinh_model(True)
    settings = {**SETTINGS, "bits": 4.5, "format": "compact", "group_size": 16}
    allocations = {}
    for tables in ("closed", "measured"):
        for factor in (1.0, 100.0, 0.01):
            model, ctx = _estimated(proto, calib, tables=tables, **settings)
            wp = ctx.posterior.weights["W2"]  # W2's curvature read `factor` times what it is
            wp.precision, wp.curvature = np.asarray(wp.precision) * factor, np.asarray(wp.curvature) * factor
            passkit.tables(model, ctx, calib)
            allocations[tables, factor] = passkit.allocate(model, ctx).bits
    right = allocations["closed", 1.0]
    assert allocations["closed", 100.0] != right and allocations["closed", 0.01] != right, allocations
    assert allocations["measured", 1.0] == right, allocations
    assert allocations["measured", 100.0] == allocations["measured", 0.01] == right, allocations


def _correlated_calib(n: int = 96, seed: int = 5) -> dict[str, np.ndarray]:
    """Inputs that lie near a 4-dimensional subspace: ``A`` is far from diagonal, so GPTQ's compensation moves the
    first layer's loss far from nearest's."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((4, 24)).astype(np.float32)
    x = rng.standard_normal((n, 4)).astype(np.float32) @ mix + 0.05 * rng.standard_normal((n, 24)).astype(np.float32)
    return {"x": x.astype(np.float32)}


@pytest.mark.parametrize("rounding", ["gptq-plain", "gptq"])
def test_measured_tables_measure_the_rounding_that_is_written(rounding, monkeypatch):
    """Under ``--rounding gptq``/``gptq-plain`` each measured width is the loss of the codes the quantize stage
    writes (GPTQ's, or nearest's where the rounding choice kept them), recomputed here from the rounding module and
    a float64 KL of onnxruntime's logits; it differs from the loss rounded to nearest, and the table follows it."""
    import bq_onnx.stages.tables as tables_stage
    from bq_onnx.calibration import load_calibration
    from bq_onnx.rounding import gptq_round

    choose = tables_stage._Compensation._measured_ratio  # gptq: W2 at 3 bits measured worse than nearest, kept nearest
    if rounding == "gptq":  # (gptq-plain has no choice)
        monkeypatch.setattr(tables_stage._Compensation, "_measured_ratio", lambda self, info, view, qt, rounded: 1.3
                            if (info.name, qt.bits) == ("W2", 3) else choose(self, info, view, qt, rounded))

    calib = _correlated_calib()
    proto = asinh_model(True)
    model, ctx = _estimated(proto, calib, tables="measured", rounding=rounding, **SETTINGS)
    tables = passkit.tables(model, ctx, load_calibration(calib, model))
    near_model, near_ctx = _estimated(proto, calib, tables="measured", **SETTINGS)
    near_tables = passkit.tables(near_model, near_ctx, calib)
    x = calib["x"][:MC_SAMPLES]
    moved = []
    for info in ctx.weights:
        measured, near = _table(tables, info.name), _table(near_tables, info.name)
        view, importance = weight_view(ctx, info)
        for bits in (3, 4, 5):
            qt = design(ctx, view, importance, bits, info.name)
            if not ctx.rounded.get(("nearest", info.name, bits)):
                qt = gptq_round(view, qt, ctx.moments[info.name], None if rounding == "gptq-plain" else importance)
            decoded = info.layout.from_view(qt.dequantize())
            reference = KL_TO_CLOSED_FORM * ctx.posterior.samples * _kl_reference(proto, info.name, decoded, x)
            j = SETTINGS["allowed_bits"].index(bits)
            np.testing.assert_allclose(measured[j], reference, rtol=1e-4)
            if ctx.rounded.get(("nearest", info.name, bits)):
                np.testing.assert_allclose(measured[j], near[j], rtol=1e-6)  # nearest's codes: nearest's loss
            else:
                moved.append(measured[j] / near[j])
    assert bool(ctx.rounded.get(("nearest", "W2", 3))) == (rounding == "gptq")
    # compensation changes the measured loss, and by different factors for different tensors and widths
    assert min(moved) < 0.8, moved
    assert max(moved) / min(moved) > 1.5, moved
