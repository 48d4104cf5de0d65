"""Arrays kept on disk a band of rows at a time (bq_onnx/disk_rows.py) and GPTQ over them: the input moments summed
on disk and the band-by-band rounding (bq_onnx/rounding/gptq.py ``DiskMetric``) against the in-memory ones, and what
they hold in memory (tracemalloc)."""

from __future__ import annotations

import os
import tempfile
import tracemalloc

import numpy as np
import pytest

import bq_onnx.rounding.gptq as g
from bq_onnx.disk_rows import DiskRows
from bq_onnx.quantizers import Spec, quantize, quantize_spec
from bq_onnx.rounding import DAMPING, gptq_round, output_error


def test_rows_written_and_read_back_band_by_band():
    a = np.random.default_rng(0).standard_normal((3, 50, 40))
    d = DiskRows.of(a)
    assert d.on_disk and d.shape == (3, 50, 40) and d.rows == 150
    np.testing.assert_array_equal(np.asarray(d), a)
    bands = list(d.bands(10, 70, nbytes=8 * 40 * 7))
    assert bands[0] == (10, 17) and bands[-1][1] == 70 and all(b[0] == c[1] for c, b in zip(bands, bands[1:]))
    part = d.read(20, 23)
    part += 1.0
    d.write(20, part)
    np.testing.assert_array_equal(d.read(20, 23), a.reshape(150, 40)[20:23] + 1.0)
    with pytest.raises(IndexError):
        d.read(149, 151)
    assert not np.asarray(DiskRows((2, 3))).any()  # zeros at first
    os.ftruncate(d._file.fileno(), 8 * 40 + 5)  # the file cut short under it: an error, not a half-filled band
    with pytest.raises(OSError, match="stopped at 325 of 640 bytes"):
        d.read(0, 2)


def test_no_space_for_the_file_keeps_the_array_in_memory(monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tempfile, "TemporaryFile", full)
    a = np.arange(12.0).reshape(3, 4)
    d = DiskRows.of(a)
    assert not d.on_disk
    np.testing.assert_array_equal(np.asarray(d), a)


def _problem(seed: int, k: int, n: int, groups: int = 1):
    rng = np.random.default_rng(seed)
    a = []
    for _ in range(groups):
        x = rng.standard_normal((3 * k, k)) @ rng.standard_normal((k, k)) * 0.3 + rng.standard_normal((3 * k, 1))
        a.append(x.T @ x / (3 * k))
    return rng, np.stack(a), rng.standard_normal((k, n)).astype(np.float32)


def test_the_factor_built_in_place_is_the_in_memory_one_in_float32():
    """The float32 factor LAPACK builds in place is the float64 one (to float32's precision), upper triangular,
    stored once, and is the reference upper Cholesky factor of ``C^-1`` (the test of ``Metric.u``)."""
    _, a, _ = _problem(1, 200, 4)
    metric = g.Metric(a, None, 4, DAMPING)
    disk = g.DiskMetric(DiskRows.of(a), None, 4, DAMPING)
    u = np.asarray(disk.factor(0))
    assert u.dtype == np.float32 and not np.tril(u, -1).any()
    np.testing.assert_allclose(u, metric.u[0], rtol=2e-4, atol=2e-5 * np.abs(u).max())
    assert disk.factor(0) is disk.factor(0)  # built once
    np.testing.assert_array_equal(disk.bands()[0][:2], (0, 0))


@pytest.mark.parametrize("spec", [Spec("uniform", outliers=0.02), Spec("lloyd"), Spec("vq", 2, outliers=0.02)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("groups", [1, 2])
def test_band_by_band_rounding_from_disk_matches_the_in_memory_one(monkeypatch, spec, weighted, groups):
    """Bands of 3 columns, ``A`` read 5 rows at a time: the same codes and the same per-channel errors (to rounding
    in the last bits) as the whole tensor rounded in memory, outliers included."""
    k, n = 48, 10
    rng, a, w = _problem(2, k, n, groups)
    h = rng.uniform(0.05, 3.0, w.shape) if weighted else None
    qt = quantize_spec(w, 3, spec, 8, h)
    import bq_onnx.disk_rows as disk_rows

    monkeypatch.setattr(g, "BAND_BYTES", 8 * k * 3)
    monkeypatch.setattr(disk_rows, "BAND_BYTES", 8 * k * 5)
    want, want_near, want_final = g.gptq_round_errors(w, qt, a, h)
    got, near, final = g.gptq_round_errors(w, qt, DiskRows.of(a), h)
    assert (want.codes != qt.codes).any()
    assert np.mean(got.codes == want.codes) > 0.99
    np.testing.assert_allclose(near, want_near, rtol=1e-9)
    np.testing.assert_allclose(final, want_final, rtol=1e-6)
    if want.outlier_value is not None:
        np.testing.assert_array_equal(got.outlier_index, want.outlier_index)
    assert output_error(w, got.dequantize(), DiskRows.of(a), h) <= output_error(w, qt.dequantize(), a, h) * (1 + 1e-9)
    np.testing.assert_allclose(output_error(w, got.dequantize(), DiskRows.of(a), h),
                               output_error(w, got.dequantize(), a, h), rtol=1e-9)


def test_rounding_from_disk_holds_less_than_one_square_array(monkeypatch):
    """K = 512: the in-memory metric allocates five ``K x K`` float64 arrays at its peak (and keeps two); from disk,
    less than one: the float32 factor while it is built, then the bands of ``K / 32`` columns as at K = 8192
    (tracemalloc; numpy reports its buffers to it)."""
    k, n = 512, 256
    _, a, w = _problem(3, k, n)
    qt = quantize(w, 3, "uniform", 64, None)
    import bq_onnx.disk_rows as disk_rows

    monkeypatch.setattr(g, "BAND_BYTES", 8 * k * 16)  # bands of 16 columns, K / 32 as at K = 8192
    monkeypatch.setattr(disk_rows, "BAND_BYTES", 8 * k * 16)  # and reads of 16 rows of A, K / 32 as at K = 8192
    disk = DiskRows.of(a)
    peaks = []
    for moments in (a, disk):
        tracemalloc.start()
        gptq_round(w, qt, moments)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    square = 8 * k * k
    assert peaks[0] > 3 * square
    assert peaks[1] < square  # the float32 factor while it is built (half), then a lazy block's rows and the bands
    from bq_onnx.stages.quantize import gptq_bytes

    assert peaks[1] <= gptq_bytes(k, n, 1, on_disk=True)


def test_moments_summed_on_disk_equal_the_in_memory_ones(monkeypatch):
    """MatMul, Gemm and a grouped Conv (two groups), each ``A`` summed on disk band by band over the batches, then
    averaged and shrunk in place: the in-memory sums to rounding in the last bits."""
    import bq_onnx.disk_rows as disk_rows
    import bq_onnx.stages.moments as moments
    from bq_onnx.calibration import load_calibration
    from tests import passkit
    from tests.test_rounding_stage import MODEL, _data

    ctx = passkit.context(bits=3, group_size=8, min_size=32, rounding="gptq")
    model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), ctx), ctx)
    data = _data(20)
    monkeypatch.setattr(moments, "BATCH", 3)
    want = moments.input_moments(model, ctx, load_calibration(data, model))
    monkeypatch.setattr(moments, "DISK_BYTES", 0)
    monkeypatch.setattr(disk_rows, "BAND_BYTES", 8 * 5 * 7)  # bands of 5-7 rows, across the groups' edges
    got = moments.input_moments(model, ctx, load_calibration(data, model))
    assert set(got) == set(want) == {"W", "G", "C"}
    for name in want:
        assert isinstance(got[name], DiskRows) and got[name].shape == want[name].shape
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-12, atol=1e-12)


def test_an_optimize_with_every_moment_on_disk_is_as_close_to_fp32(monkeypatch, tmp_path):
    """The whole run (``--rounding gptq``, 3 bits) with every ``A`` on disk: the output verifies (decodes exactly in
    onnxruntime) and is as close to FP32 on held-out digits as with the moments in memory (within 2 %)."""
    import bq_onnx
    import bq_onnx.stages.moments as moments
    from tests.test_rounding_stage import ROOT, _kl_to_fp32

    model = ROOT / "models" / "digits_mlp.onnx"
    data = np.load(ROOT / "models" / "digits_mlp_data.npz")
    kl = []
    for disk in (False, True):
        if disk:
            monkeypatch.setattr(moments, "DISK_BYTES", 0)
        out = tmp_path / f"{disk}.onnx"
        result = bq_onnx.optimize(str(model), calib={"input": data["calib_input"]}, bits=3, allocator="uniform",
                                  rounding="gptq")
        assert all(isinstance(a, DiskRows) == disk for a in result.context.moments.values())
        result.save(str(out), force=True)
        kl.append(_kl_to_fp32(out, model, data["test_input"]))
    assert abs(kl[1] - kl[0]) <= 0.02 * kl[0]


def test_which_moments_go_to_disk():
    """By what the in-memory metric keeps: the scale benchmark's MLP layers go (320 and 1280 MiB), PP-OCR's recognizer
    convolution (K = 2880, N = 60: 129 MiB, sent to disk by a first threshold) and MiniLM's FFN stay in memory (every
    zoo weight does: ``benchmarks/gptq_paths.md``)."""
    from bq_onnx.stages.moments import on_disk

    assert on_disk(1, 2048, 8192) and on_disk(1, 8192, 2048)
    assert not on_disk(1, 2880, 60) and not on_disk(1, 1536, 384) and not on_disk(1, 384, 1536)
    assert on_disk(4, 2880, 60)  # four groups keep four factors


def test_a_disk_metric_counts_an_importance_held_in_memory_not_one_mapped_from_a_file():
    """The GPTQ metrics kept across spends are bounded by their ``nbytes``: a disk metric holds the importance it
    reads, which costs memory unless it is a mapped file's (the kept views on disk); uncounted, every weight's stayed
    in memory (issue 21: 0.6 GiB of the 1 GiB scale model's with ``--calib``)."""
    from bq_onnx.idle import arrays_to_disk

    rng = np.random.default_rng(9)
    x = rng.standard_normal((200, 48))
    a = x.T @ x / 200
    precision = rng.gamma(1.0, 1.0, (48, 400))
    plain = g.DiskMetric(DiskRows.of(a), None, 400, DAMPING).nbytes
    held = g.DiskMetric(DiskRows.of(a), precision, 400, DAMPING)
    assert held.nbytes == plain + precision.nbytes
    with tempfile.TemporaryDirectory() as folder:
        old = tempfile.tempdir
        tempfile.tempdir = folder
        try:
            mapped = arrays_to_disk({"p": precision, "pad": np.zeros(2 << 20)})["p"]
        finally:
            tempfile.tempdir = old
        assert not mapped.flags.writeable and np.array_equal(mapped, precision)
        assert g.DiskMetric(DiskRows.of(a), mapped, 400, DAMPING).nbytes == plain


def test_a_kept_disk_metric_reads_its_importance_from_a_mapped_file_and_rounds_the_same(monkeypatch):
    """Issue 21: the GPTQ metrics kept across spends (up to ``METRIC_CACHE_BYTES``) held the importance each was built
    with, computed in memory: a float64 ``(K, N)`` array per wide weight, about 1 GiB of the 1 GiB scale model's
    ``--calib`` run through the guard. A disk metric's importance now waits in a mapped file; the codes are the
    same."""
    import onnx_ir as ir

    import bq_onnx
    import bq_onnx.idle as idle
    import bq_onnx.stages.moments as moments
    from bq_onnx.pages import is_mapped
    from bq_onnx.stages.quantize import METRICS
    from tests.test_rounding_stage import ROOT

    model = ROOT / "models" / "digits_mlp.onnx"
    data = np.load(ROOT / "models" / "digits_mlp_data.npz")
    monkeypatch.setattr(moments, "DISK_BYTES", 0)  # every A on disk: disk metrics
    outs = []
    for small_moves in (False, True):
        if small_moves:  # the test's small importances count as big
            monkeypatch.setattr(idle, "IDLE_BYTES", 0)
        result = bq_onnx.optimize(str(model), calib={"input": data["calib_input"][:96]}, bits=3,
                                  allocator="uniform", rounding="gptq", no_guard=True)
        kept = [m for m in result.context.rounded[METRICS].values() if m.precision is not None]
        assert kept and all(isinstance(m, g.DiskMetric) for m in kept)
        assert all(is_mapped(m.precision) == small_moves for m in kept)
        outs.append(ir.to_proto(result.model).SerializeToString())
    assert outs[0] == outs[1]
