"""expected_loss_tables (bq_onnx/stages/tables.py): per block and width, the loss and the bits the budget counts."""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx.posterior import Posterior, WeightPosterior
from bq_onnx.weights import design
from tests import passkit, tiny


def _prepared(**options):
    ctx = passkit.context(min_size=64, group_size=16, **options)
    model = passkit.find_weights(passkit.prepare(passkit.load(tiny.layouts_model()), ctx), ctx)
    return model, ctx


def test_closed_form_loss_is_the_squared_error_of_each_slice():
    model, ctx = _prepared(bits=3, granularity="rows:5", allowed_bits=[0, 2, 4, 8], bits_payload=True)
    tables = passkit.tables(model, ctx)
    infos = {w.name: w for w in ctx.weights}
    assert {t.weight for t in tables.blocks} == set(infos)
    for t in tables.blocks:
        info = infos[t.weight]
        view = info.layout.to_view(tiny.WEIGHTS[t.weight].astype(np.float32))
        a, b = t.columns
        assert t.numel == view.shape[0] * (b - a) and t.bits == (0, 2, 4, 8)
        for j, bits in enumerate(t.bits):
            decoded = design(ctx, view, None, bits, t.weight).dequantize()
            expected = np.sum((decoded[:, a:b].astype(np.float64) - view[:, a:b]) ** 2)
            assert t.loss[j] == pytest.approx(expected, rel=1e-9)
            assert t.payload[j] == bits * t.numel  # uniform codes: bits per weight, nothing else
        assert np.all(np.diff(t.loss) < 0)  # each width here strictly better than the one before
        np.testing.assert_array_equal(t.cost, t.payload)  # --bits-payload: containers and metadata not counted


def test_stored_bits_count_containers_and_metadata_and_precision_weights_the_error():
    model, ctx = _prepared(bits=3, granularity="tensor", allowed_bits=[2, 4])
    rng = np.random.default_rng(0)
    weights = {}
    for info in ctx.weights:
        w = tiny.WEIGHTS[info.name]
        curvature = rng.uniform(0.1, 10.0, size=w.shape)
        weights[info.name] = WeightPosterior(w, curvature + 1e-4, curvature, "laplace")
    ctx.posterior = Posterior("laplace", 10, 1e-4, weights)
    tables = passkit.tables(model, ctx)
    for t in tables.blocks:
        info = next(w for w in ctx.weights if w.name == t.weight)
        view = info.layout.to_view(tiny.WEIGHTS[t.weight])
        h = info.layout.to_view(ctx.posterior.weights[t.weight].precision)
        assert np.all(t.metadata > 0)
        # native storage: 2-bit codes sit in an int4 container (ragged blocks padded), so they cost what 4-bit
        # codes cost, at least 4 bits per weight plus the metadata
        assert t.cost[0] == t.cost[1] and np.all(t.cost >= 4 * t.numel + t.metadata)
        for j, bits in enumerate(t.bits):
            decoded = design(ctx, view, h, bits, t.weight).dequantize()
            assert t.loss[j] == pytest.approx(np.sum(h * (decoded.astype(np.float64) - view) ** 2), rel=1e-9)


def test_measured_tables_need_calibration():
    from bq_onnx.errors import UsageError

    model, ctx = _prepared(bits=3, tables="mc")
    with pytest.raises(UsageError, match="needs calibration data"):
        passkit.tables(model, ctx)


@pytest.mark.parametrize(("n", "granularity"), [(8, 8), (100, 8), (8192, 8), (8193, 8), (2**22, 8), (30522, 16)])
def test_slices_cover_the_tensor_in_at_most_max_slices_runs_of_whole_granules(n, granularity):
    from bq_onnx.stages.tables import MAX_SLICES, slices

    ranges = slices(n, granularity)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no gap or overlap
    assert len(ranges) <= MAX_SLICES
    widths = {b - a for a, b in ranges[:-1]}
    assert len(widths) <= 1 and all(w % granularity == 0 for w in widths)
    if n <= granularity * MAX_SLICES:  # the usual case is unchanged: runs of exactly the granularity
        assert widths <= {granularity}
