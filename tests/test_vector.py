"""Vector codebooks and sparse outliers: k-means against a float64 reference, determinism, cost accounting, and
exact round trips through both storage formats and both runtimes (d = 2, 4, 8, ragged last vectors, outliers)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bq_onnx
from bq_onnx import vector
from bq_onnx.config import OptimizeConfig, parse_outliers
from bq_onnx.context import Context
from bq_onnx.errors import UsageError
from bq_onnx.model_io import load_model, save_model
from bq_onnx.outliers import isolate_outliers, outlier_count
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.prepare import prepare_passes
from bq_onnx.passes.rewrite_compact import RewriteCompactPass
from bq_onnx.passes.rewrite_native import RewriteNativePass
from bq_onnx.qtensor import QuantizedPieces, take_columns
from bq_onnx.quantizers import Spec, candidates, quantization_error, quantize, quantize_spec
from bq_onnx.runtimes import get_runtime
from bq_onnx.sizes import layer_record, metadata_bits
from bq_onnx.stages.weights import find_weights
from tests.conftest import matmul_readout
from tests.written import check_result

RUNTIMES = ("onnxruntime", "openvino")


def _reference_lloyd(x, w, c, iters):
    """Independent float64 weighted k-means: brute-force assignment by explicit distances, weighted means."""
    c = c.copy()
    for _ in range(iters):
        d = np.array([[np.sum(w[i] * (x[i] - c[j]) ** 2) for j in range(len(c))] for i in range(len(x))])
        labels = d.argmin(axis=1)
        for j in range(len(c)):
            for t in range(x.shape[1]):
                sel = labels == j
                den = np.sum(w[sel, t])
                if den > 0:
                    c[j, t] = np.sum(w[sel, t] * x[sel, t]) / den
    d = np.array([[np.sum(w[i] * (x[i] - c[j]) ** 2) for j in range(len(c))] for i in range(len(x))])
    return c, d.argmin(axis=1)


def test_kmeans_matches_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 3))
    w = rng.random((40, 3)) + 0.05
    init = x[:5].copy()
    for iters in (1, 3):
        fit = vector.weighted_kmeans(x, w, 5, init=init, max_iter=iters)
        ref_c, ref_labels = _reference_lloyd(x, w, init, iters)
        if len(fit.history) - 1 == iters:  # did not stop early: same number of updates
            np.testing.assert_allclose(fit.centroids, ref_c, rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(fit.labels, ref_labels)
        assert fit.loss == pytest.approx(vector.weighted_loss(x, w, fit.centroids, fit.labels), rel=1e-12)


@pytest.mark.parametrize("d", [1, 2, 4])
def test_weighted_loss_never_increases(d):
    rng = np.random.default_rng(d)
    x = rng.standard_t(3, size=(600, d))
    w = rng.gamma(0.5, size=(600, d))
    w[:50] = 0.0  # weightless vectors must not matter
    fit = vector.weighted_kmeans(x, w, 16, seed=3)
    h = np.array(fit.history)
    assert (np.diff(h) <= 1e-9 * h[0]).all()
    assert fit.loss <= h[0]


def test_kmeans_pp_with_fewer_distinct_vectors_than_centroids():
    x = np.repeat(np.eye(3), 5, axis=0)
    fit = vector.weighted_kmeans(x, None, 8, seed=0)
    assert fit.loss == pytest.approx(0.0, abs=1e-12)


def test_vector_quantizer_is_deterministic_and_beats_scalar():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    h = rng.random((96, 40)) + 0.1
    a = vector.quantize_vector(w, 2, 4, 32, h, seed=5)
    b = vector.quantize_vector(w, 2, 4, 32, h, seed=5)
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.codebook, b.codebook)
    assert a.codebook.shape == (256, 4) and a.codes.shape == (24, 40)
    np.testing.assert_array_equal(a.codebook, a.codebook.astype(np.float16).astype(np.float32))
    assert quantization_error(w, a, h) < quantization_error(w, quantize(w, 2, "uniform", 32, h), h)


def test_codes_are_the_nearest_decoded_vectors():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((21, 7)).astype(np.float32)  # ragged: 21 = 10 * 2 + 1
    h = rng.random((21, 7))
    qt = vector.quantize_vector(w, 2, 2, 8, h)
    dense = qt.dequantize()
    for v in range(qt.codes.shape[0]):
        rows = slice(2 * v, min(2 * v + 2, 21))
        for n in range(7):
            s = np.float32(qt.scale[(2 * v) // 8, n])
            cands = (qt.codebook[:, : rows.stop - rows.start] * s).astype(np.float64)
            err = ((cands - w[rows, n]) ** 2 * h[rows, n]).sum(axis=1)
            assert err[qt.codes[v, n]] <= err.min() * (1 + 1e-9) + 1e-30
            np.testing.assert_array_equal(dense[rows, n], cands[qt.codes[v, n]].astype(np.float32))


def test_allowed_lengths_and_refusals():
    assert vector.vector_dims(2, 48000) == (2, 4)
    assert vector.vector_dims(2, 4096) == (2,)
    assert vector.vector_dims(8, 10**9) == ()  # 2**16 centroids: over MAX_INDEX_BITS
    with pytest.raises(ValueError, match="centroids"):
        vector.quantize_vector(np.ones((16, 4), np.float32), 2, 8)
    with pytest.raises(ValueError, match="multiple"):
        vector.quantize_vector(np.ones((16, 4), np.float32), 1, 4, block_size=6)
    assert [c.label for c in candidates("auto", "auto", 2, 4096)] == [
        "uniform", "uniform+outliers0.25%", "uniform+outliers1%", "lloyd", "lloyd+outliers0.25%",
        "lloyd+outliers1%", "vq2", "vq2+outliers0.25%", "vq2+outliers1%"]
    assert candidates("vq8", 0.0, 8, 10**6) == [Spec("lloyd")]  # no vector at 8 bits: the scalar codebook
    assert parse_outliers("0.5%") == 0.005 and parse_outliers("auto") == "auto" and parse_outliers(None) == 0.0
    with pytest.raises(UsageError):
        parse_outliers("0.5")


def test_outliers_isolate_the_worst_weights_and_account_for_them():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((64, 20)).astype(np.float32)
    w[5, 3], w[40, 11] = 40.0, -25.0
    plain = quantize(w, 3, "uniform", 32)
    qt = quantize_spec(w, 3, Spec("uniform", outliers=0.01), 32)
    assert qt.num_outliers == outlier_count(w.size, 0.01) == 13
    assert 5 * 20 + 3 in set(qt.outlier_index.tolist())
    assert quantization_error(w, qt) < quantization_error(w, plain) / 2
    assert qt.outlier_bits == 13 * (16 + 16) and qt.payload_bits == w.size * 3 + 13 * 32
    assert metadata_bits(qt, "compact") == metadata_bits(plain, "compact")
    # slices keep their own outliers, remapped to their columns
    parts = [take_columns(qt, a, b) for a, b in ((0, 7), (7, 20))]
    assert sum(p.num_outliers for p in parts) == 13
    np.testing.assert_array_equal(np.concatenate([p.dequantize() for p in parts], axis=1), qt.dequantize())
    # no weights: selection by plain squared error; base design reused
    again = isolate_outliers(w, None, 0.01, lambda x, h: quantize(x, 3, "uniform", 32, h), base=plain)
    np.testing.assert_array_equal(again.outlier_index, qt.outlier_index)


def test_vector_cost_accounting():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((64, 30)).astype(np.float32)
    qt = vector.quantize_vector(w, 2, 2, 32)
    assert qt.index_bits == 4 and qt.payload_bits == 64 * 30 * 2
    assert metadata_bits(qt, "compact") == 16 * 2 * 30 + 16 * 16 * 2  # fp16 scales + 16 x 2 fp16 codebook
    pieces = QuantizedPieces((64, 30), ((0, 10, take_columns(qt, 0, 10)), (10, 30, take_columns(qt, 10, 30))))
    record = layer_record("W", pieces, "compact", {"a": 1}, (64, 30), 64 * 30 * 4)
    assert record["metadata_bits"] == 16 * 2 * 30 + 16 * 16 * 2  # the shared codebook counted once
    assert record["vector_dim"] == 2 and record["outliers"] == 0


def _rewrite(tmp_path, w, qt, fmt):
    ctx = Context(OptimizeConfig.from_options(min_size=1, format=fmt))
    model = run_passes(load_model(matmul_readout(w)), prepare_passes(ctx.config.weights))
    ctx.weights = find_weights(model, ctx.config.weights).weights
    ctx.quantized["W"] = qt
    model = run_passes(model, [(RewriteNativePass if fmt == "native" else RewriteCompactPass)(ctx)])
    path = tmp_path / f"{fmt}.onnx"
    save_model(model, path)
    onnx.checker.check_model(str(path))
    return path, ctx


@pytest.mark.parametrize(("bits", "d", "k", "block", "outliers"), [
    (2, 2, 37, 16, 0.0),  # ragged last vector (37 = 18 * 2 + 1), ragged last block
    (1, 4, 38, 8, 0.0),  # ragged last vector of 2 of 4
    (1, 8, 45, 16, 0.03),  # 8-vectors, ragged (45 = 5 * 8 + 5), with outliers
    (5, 2, 33, 0, 0.0),  # 10-bit indices: two packed streams / uint16, one block per column
    (2, 2, 40, 16, 0.05),
])
@pytest.mark.parametrize("fmt", ["native", "compact"])
def test_vector_and_outliers_round_trip_both_runtimes(tmp_path, bits, d, k, block, outliers, fmt):
    rng = np.random.default_rng(bits * 10 + d)
    w = (rng.standard_normal((k, 9)) * 0.1).astype(np.float32)
    qt = quantize_spec(w, bits, Spec("vq", d, outliers), block or k, rng.random((k, 9)), seed=1)
    assert qt.kind == "vector" and qt.vector_dim == d and (qt.num_outliers > 0) == (outliers > 0)
    path, _ = _rewrite(tmp_path, w, qt, fmt)
    eye = np.eye(k, dtype=np.float32)
    for rt in RUNTIMES:
        decoded = get_runtime(rt).session(path, exact=True).run({"x": eye})[0]
        np.testing.assert_array_equal(decoded, qt.dequantize())
    tensors = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    if outliers:
        np.testing.assert_array_equal(tensors["W.bq_outlier_index"].astype(np.int64), qt.outlier_index)
    if fmt == "native":
        np.testing.assert_array_equal(tensors["W.bq_codes"].astype(np.int64), qt.codes)


@pytest.mark.parametrize("fmt", ["native", "compact"])
@pytest.mark.parametrize("method", ["uniform", "lloyd"])
def test_scalar_outliers_round_trip_both_runtimes(tmp_path, fmt, method):
    rng = np.random.default_rng(7)
    w = (rng.standard_t(2, size=(37, 6)) * 0.1).astype(np.float32)
    qt = quantize_spec(w, 3, Spec(method, outliers=0.05), 16)
    path, _ = _rewrite(tmp_path, w, qt, fmt)
    for rt in RUNTIMES:
        decoded = get_runtime(rt).session(path, exact=True).run({"x": np.eye(37, dtype=np.float32)})[0]
        np.testing.assert_array_equal(decoded, qt.dequantize())


def test_auto_quantizer_end_to_end(tmp_path):
    """The tables choose per tensor and width; pieces share one stored codebook; the written model is verified
    in onnxruntime and decodes exactly in OpenVINO."""
    rng = np.random.default_rng(8)
    w = (rng.standard_t(3, size=(128, 48)) * 0.05).astype(np.float32)
    result = bq_onnx.optimize(matmul_readout(w), bits=2.0, quantizer="auto", granularity="rows:16", min_size=1,
                              format="compact", allowed_bits=[1, 2, 3, 4], bits_payload=True)
    report = result.save(tmp_path / "auto.onnx")
    check_result(result, tmp_path / "auto.onnx", report, domain="bq")
    assert result.report["totals"]["bits_per_weight"] <= 2.0
    qt = result.context.quantized["W"]
    decoded = get_runtime("openvino").session(tmp_path / "auto.onnx", exact=True).run(
        {"x": np.eye(128, dtype=np.float32)})[0]
    np.testing.assert_array_equal(decoded, qt.dequantize())
    chosen = {spec.label for spec in result.context.designs.values()}
    assert chosen and all(isinstance(label, str) for label in chosen)
    info = bq_onnx.inspect(tmp_path / "auto.onnx")
    assert info["layers"][0]["payload_bits"] == result.report["layers"][0]["payload_bits"]


def test_vector_codebooks_are_refused_on_targets_without_codebooks():
    w = np.random.default_rng(9).standard_normal((64, 64)).astype(np.float32)
    for kwargs in ({"quantizer": "vq"}, {"quantizer": "auto"}, {"outliers": 0.01, "quantizer": "uniform-sym"}):
        with pytest.raises(UsageError):
            bq_onnx.optimize(matmul_readout(w), bits=4, target="tensorrt", min_size=1, **kwargs)
