"""A design's grid and its codes chosen again (:mod:`bq_onnx.quantizers.grids`) give the design itself, array for
array; and the quantize stage gets the tables' designs from their grids, also where the tables ran on workers
(issue 19: the master no longer searches the workers' designs again)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bq_onnx import distributed as dist
from bq_onnx.calibration import load_calibration
from bq_onnx.quantizers import Spec, quantize_spec
from bq_onnx.quantizers import spec as spec_module
from bq_onnx.quantizers.grids import grid_of
from bq_onnx.stages.tables import expected_loss_tables
from bq_onnx.weights import design, weight_view
from tests.test_one_scale import _calib, _estimated, asinh_model

FIELDS = ("codes", "scale", "zero_point", "codebook", "offset", "outlier_index", "outlier_value", "scale_code",
          "super_scale")


def _same(a, b) -> None:
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None) == (y is None), f
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), f
    for f in ("kind", "bits", "shape", "block_size", "symmetric", "method", "vector_dim"):
        assert getattr(a, f) == getattr(b, f), f


def _weights(k: int = 70, n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (k, n)).astype(np.float32)
    w[:, 3] = 0.25  # a constant column: the constant-block candidate wins there
    w[:5, 7] = 0.0
    return w, rng.gamma(0.5, 1.0, (k, n))


@pytest.mark.parametrize("method", ["uniform", "uniform-sym", "percentile", "gaussian", "nf", "lloyd", "lloyd-l1"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_codes_from_the_grid_are_the_designs(method, bits, weighted):
    """Ragged blocks (70 rows in blocks of 32), an importance or none: the codes chosen again equal the search's."""
    w, h = _weights()
    spec = Spec(method)
    qt = quantize_spec(w, bits, spec, 32, h if weighted else None)
    grid = grid_of(qt, spec)
    assert grid is not None and grid.nbytes < w.nbytes // 4
    _same(quantize_spec(w, bits, spec, 32, h if weighted else None, grid=grid), qt)


@pytest.mark.parametrize("spec", [Spec("uniform", double_scales=True), Spec("uniform", outliers=0.02),
                                  Spec("lloyd", outliers=0.02)], ids=["double-scales", "uniform-outliers",
                                                                      "lloyd-outliers"])
def test_double_scales_and_outliers_come_back_too(spec):
    w, h = _weights(k=200)
    qt = quantize_spec(w, 3, spec, 32, h)
    assert (qt.scale_code is not None) == spec.double_scales and (qt.outlier_index is not None) == bool(spec.outliers)
    _same(quantize_spec(w, 3, spec, 32, h, grid=grid_of(qt, spec)), qt)


def test_a_wide_weight_is_encoded_by_slices_of_columns(monkeypatch):
    from bq_onnx.quantizers import grids

    monkeypatch.setattr(grids, "ENCODE_CHUNK_BYTES", 70 * 4 * 5)  # 5 columns at a time: 24 columns in 5 slices
    w, h = _weights()
    for spec in (Spec("uniform"), Spec("gaussian"), Spec("uniform", outliers=0.05)):
        qt = quantize_spec(w, 4, spec, 32, h)
        _same(grids.encode(w, grid_of(qt, spec)), qt)


def test_vectors_and_means_keep_no_grid():
    w, _ = _weights()
    assert grid_of(quantize_spec(w, 0, Spec("uniform"), 32), Spec("uniform")) is None
    assert grid_of(quantize_spec(w, 2, Spec("vq", 2), 32), Spec("vq", 2)) is None


@pytest.mark.parametrize("options", [{}, {"quantizer": "auto", "outliers": "auto"}], ids=["default", "auto"])
def test_the_quantize_stage_reads_the_workers_grids_instead_of_searching(monkeypatch, options):
    """The tables on two workers send every chosen design's grid back; each weight's design at each scored width
    then comes from them without one quantizer search in this process, and equals the one searched afresh."""
    calib = _calib()
    settings = {"bits": 4, "allowed_bits": [2, 3, 4], "granularity": "rows:8", **options}
    model, ctx = _estimated(asinh_model(False), calib, **settings)
    with dist.distributed(2):
        ctx.tables = expected_loss_tables(model, ctx, load_calibration(calib, model))
    assert {name for name, _ in ctx.grids} == {w.name for w in ctx.weights}
    searched = []
    real = spec_module._quantize_spec
    monkeypatch.setattr(spec_module, "_quantize_spec", lambda *a: searched.append(a) or real(*a))
    for info in ctx.weights:
        view, importance = weight_view(ctx, info)
        for name, bits in ctx.grids:
            if name == info.name:
                got = design(ctx, view, importance, bits, name)
                assert not searched, (name, bits)
                fresh = dataclasses.replace(ctx, tables=dataclasses.replace(ctx.tables, grids={}))
                _same(got, design(fresh, view, importance, bits, name))
                searched.clear()
    ctx.posterior = None  # grids fitted on the posterior serve no other one (the guard's data-free tables)
    assert ctx.grids == {}


@pytest.mark.parametrize("spec", [Spec("uniform"), Spec("uniform-sym"), Spec("lloyd"),
                                  Spec("uniform", double_scales=True), Spec("uniform", outliers=0.02),
                                  Spec("lloyd", outliers=0.02)],
                         ids=["uniform", "symmetric", "lloyd", "double-scales", "uniform-outliers", "lloyd-outliers"])
@pytest.mark.parametrize("k", [200, 40, 20])
def test_codes_read_band_by_band_are_the_designs(monkeypatch, spec, k):
    """Bands of rows (as the quantize stage reads a big weight from its file, issue 21): 200 rows in blocks of 32 in
    bands of 64 (a ragged last block, the last band taking the rest), 40 and 20 rows (one band, a short block): the
    codes equal the design's, array for array, and each row is read once."""
    from bq_onnx.quantizers import grids

    monkeypatch.setattr(grids, "ENCODE_CHUNK_BYTES", 64 * 24 * 4)
    w, _ = _weights(k=k)
    qt = quantize_spec(w, 4, spec, 32, None)
    grid = grid_of(qt, spec)
    read: list[tuple[int, int]] = []

    def rows(a: int, b: int) -> np.ndarray:
        read.append((a, b))
        return w[a:b].copy()

    _same(grids.encode_rows(rows, grid), qt)
    assert [a for a, _ in read] == sorted({a for a, _ in read}) and sum(b - a for a, b in read) == k
    assert len(read) == (3 if k == 200 else 1)
