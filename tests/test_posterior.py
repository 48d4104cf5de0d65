"""Posterior numerics: sharded accumulation, file round trips, the activations estimator against numpy."""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx.errors import DataError
from bq_onnx.estimators import estimate_posterior
from bq_onnx.estimators.kfac import KfacStats
from bq_onnx.posterior import Posterior, SumAccumulator, posterior_from_curvature
from tests.conftest import MODELS
from tests.written import check_written, quantization_rtol


def test_sharded_accumulation_equals_one_pass():
    rng = np.random.default_rng(0)
    batches = [{"w": rng.standard_normal((4, 3)), "v": rng.standard_normal(5)} for _ in range(9)]
    whole = SumAccumulator()
    for b in batches:
        whole.update(b)
    shards = [SumAccumulator() for _ in range(3)]
    for i, b in enumerate(batches):
        shards[i % 3].update(b)
    merged = shards[0].merge(shards[1]).merge(shards[2])
    assert merged.count == whole.count == 9
    for name in ("w", "v"):
        np.testing.assert_allclose(merged.mean()[name], whole.mean()[name], rtol=1e-12)
        np.testing.assert_allclose(whole.mean()[name], np.mean([b[name] for b in batches], axis=0), rtol=1e-12)


def test_kfac_stats_merge_and_diagonal():
    """The estimator's K-FAC sums: two shards merged equal one pass over both samples, and the diagonal it hands
    the tables is diag(A kron G) in the (K, N) view (element (k, n) at k * N + n)."""
    rng = np.random.default_rng(1)
    a_rows, g_rows = rng.standard_normal((1, 50, 4)), rng.standard_normal((50, 3))
    first, second, whole = KfacStats(), KfacStats(), KfacStats()
    for stats, rows in ((first, slice(0, 20)), (second, slice(20, 50))):
        stats.add_inputs("w", a_rows[:, rows])
        stats.add_gradients("w", g_rows[rows])
        stats.count = 1  # one sample each
        whole.add_inputs("w", a_rows[:, rows])
        whole.add_gradients("w", g_rows[rows])
    whole.count = 2
    a, g, diagonal = first.merge(second).result("w")
    ref_a, ref_g, _ = whole.result("w")
    np.testing.assert_allclose(a, ref_a, rtol=1e-12)
    np.testing.assert_allclose(g, ref_g, rtol=1e-12)
    np.testing.assert_allclose(a, a_rows[0].T @ a_rows[0] / 2)
    np.testing.assert_allclose(g, (g_rows[:20].T @ g_rows[:20] / 20 + g_rows[20:].T @ g_rows[20:] / 30) / 2)
    np.testing.assert_allclose(diagonal.reshape(-1), np.diag(np.kron(a, g)))


def test_precision_is_n_times_curvature_plus_prior_and_never_negative():
    wp = posterior_from_curvature(np.ones(3), np.array([2.0, 0.0, -5.0]), samples=10, prior_precision=0.5,
                                  source="laplace")
    np.testing.assert_allclose(wp.precision, [20.5, 0.5, 0.5])
    np.testing.assert_allclose(wp.variance, 1 / np.array([20.5, 0.5, 0.5]))


def test_save_load_and_external_posteriors(tmp_path):
    rng = np.random.default_rng(2)
    mean = rng.standard_normal((6, 4)).astype(np.float32)
    wp = posterior_from_curvature(mean, rng.random((6, 4)), samples=7, prior_precision=1e-3, source="laplace")
    Posterior("laplace", 7, 1e-3, {"W": wp}, ["a note"]).save(tmp_path / "p.npz")
    back = Posterior.load(tmp_path / "p.npz")
    assert back.method == "laplace" and back.samples == 7 and back.notes == ["a note"]
    np.testing.assert_array_equal(back.weights["W"].precision, wp.precision)
    std = rng.random((6, 4)) + 0.1
    np.savez(tmp_path / "bnn.npz", **{"mean/W": mean, "std/W": std})
    ext = Posterior.load(tmp_path / "bnn.npz")
    np.testing.assert_allclose(ext.weights["W"].std, std)
    assert ext.weights["W"].source == "external"
    np.savez(tmp_path / "bad.npz", **{"mean/W": mean, "std/W": -std})
    with pytest.raises(DataError, match="finite and positive"):
        Posterior.load(tmp_path / "bad.npz")
    np.savez(tmp_path / "nostd.npz", **{"mean/W": mean})
    with pytest.raises(DataError, match="neither"):
        Posterior.load(tmp_path / "nostd.npz")


def test_activation_estimator_matches_numpy_forward_pass():
    """digits MLP: curvature of fc_i.weight[k, n] = E[x_k^2] of that layer's input, computed here in numpy."""
    import onnx
    from onnx import numpy_helper

    with np.load(MODELS / "digits_mlp_calib.npz") as f:
        x = f["input"].astype(np.float64)
    graph = onnx.load(MODELS / "digits_mlp.onnx").graph
    weights = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    posterior = estimate_posterior(MODELS / "digits_mlp.onnx", MODELS / "digits_mlp_calib.npz", "activations")
    h = x
    for i in (1, 2, 3):
        w = weights[f"fc{i}.weight"]
        expected = np.broadcast_to(np.mean(h**2, axis=0)[:, None], w.shape)
        got = posterior.weights[f"fc{i}.weight"].curvature
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-9)
        h = np.maximum(h @ w + weights[f"fc{i}.bias"], 0)
    assert posterior.samples == len(x)


def test_posterior_command_and_optimize_with_it(tmp_path, capsys):
    import json

    from bq_onnx.cli import main

    post = tmp_path / "p.npz"
    code = main(["posterior", str(MODELS / "lenet.onnx"), "--calib", str(MODELS / "lenet_calib.npz"),
                 "--method", "activations", "-o", str(post), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and post.exists() and out["samples"] == 500 and len(out["layers"]) == 5
    code = main(["optimize", str(MODELS / "lenet.onnx"), "--posterior", str(post), "-o", str(tmp_path / "q.onnx"),
                 "--bits", "3", "--bits-payload", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["posterior"]["method"] == "activations"
    with np.load(MODELS / "lenet_data.npz") as data:  # real digits: the float model's outputs are meaningful
        feeds = {"input": data["test_input"][:64]}
    check_written(tmp_path / "q.onnx", MODELS / "lenet.onnx", feeds, report=report, rtol=quantization_rtol(3),
                  ops=["Cast", "Sub", "Mul"])  # LeNet's Conv/Gemm weights: the fast layout's decode
    # a posterior of another model is refused on one line
    other = tmp_path / "other.npz"
    assert main(["posterior", str(MODELS / "digits_mlp.onnx"), "--calib", str(MODELS / "digits_mlp_calib.npz"),
                 "--method", "activations", "-o", str(other), "-q"]) == 0
    code = main(["optimize", str(MODELS / "lenet.onnx"), "--posterior", str(other), "-o", str(tmp_path / "r.onnx")])
    err = capsys.readouterr().err
    assert code == 5 and "no posterior for weight 'conv1.weight'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.onnx").exists()


def test_wrong_calibration_for_the_model_is_one_line(tmp_path, capsys):
    from bq_onnx.cli import main

    code = main(["posterior", str(MODELS / "lenet.onnx"), "--calib", str(MODELS / "digits_mlp_calib.npz"),
                 "--method", "activations", "-o", str(tmp_path / "p.npz")])
    err = capsys.readouterr().err
    assert code == 5 and "input 'input' has rank 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.npz").exists()


def test_optimize_with_calibration_uses_the_posterior():
    import bq_onnx

    plain = bq_onnx.optimize(MODELS / "lenet.onnx", bits=2, bits_payload=True)
    weighted = bq_onnx.optimize(MODELS / "lenet.onnx", bits=2, bits_payload=True, calib=MODELS / "lenet_calib.npz",
                                posterior_options={"method": "activations"})
    assert weighted.report["posterior"]["samples"] == 500 - weighted.report["guard"]["samples"] == 375
    # the posterior-weighted quantizer designs differ from the unweighted ones
    assert any(
        not np.array_equal(plain.context.quantized[n].scale, weighted.context.quantized[n].scale)
        for n in plain.context.quantized
    )


def test_allocation_report_and_plot(tmp_path, capsys):
    import json

    from bq_onnx.cli import main

    plot = tmp_path / "alloc.png"
    code = main(["optimize", str(MODELS / "lenet.onnx"), "--bits", "3", "--format", "compact", "--calib",
                 str(MODELS / "lenet_calib.npz"),
                 "--method", "activations", "-o", str(tmp_path / "q.onnx"), "--plot", str(plot), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    alloc = report["allocation"]
    assert alloc["method"] == "greedy" and 2.95 <= alloc["achieved_bits"] <= 3.0  # within a block step or so
    assert set(alloc["layers"]) == {r["name"] for r in report["layers"]}
    for row in alloc["layers"].values():
        assert row["loss_one_bit_less"] >= row["loss"] >= row["loss_one_bit_more"] >= 0


# --- memory: posteriors that are read back one weight at a time ----------------------------------------------


def test_spilled_posterior_reads_what_the_eager_one_holds_and_frees_its_folder(tmp_path):
    import gc

    from bq_onnx.posterior import Spill
    from bq_onnx.spilling import spilled_posterior

    rng = np.random.default_rng(5)
    mean = rng.standard_normal((7, 5)).astype(np.float32)
    curvature = rng.random((7, 5)) - 0.2  # some negative: clipped as in posterior_from_curvature
    eager = posterior_from_curvature(mean, curvature, samples=13, prior_precision=1e-3, source="laplace")

    class Tensor:  # what the estimator hands over: the model's tensor, read on access
        def numpy(self):
            return mean

    spill = Spill()
    folder = spill.folder
    lazy = spilled_posterior(Tensor(), curvature, 13, 1e-3, "laplace", spill)
    del spill
    assert lazy.lazy and not eager.lazy
    for field in ("mean", "precision", "curvature", "variance", "std"):
        got, want = getattr(lazy, field), getattr(eager, field)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    a = lazy.precision
    a += 1  # a fresh array per access: changing one changes nothing stored
    np.testing.assert_array_equal(lazy.precision, eager.precision)
    post = Posterior("laplace", 13, 1e-3, {"W": lazy})
    post.save(tmp_path / "p.npz")
    assert post.summary() == Posterior("laplace", 13, 1e-3, {"W": eager}).summary()
    assert folder.exists()
    del lazy, post
    gc.collect()
    assert not folder.exists()


def test_streamed_save_writes_what_np_savez_writes(tmp_path):
    rng = np.random.default_rng(6)
    weights = {name: posterior_from_curvature(rng.standard_normal(shape).astype(np.float32), rng.random(shape), 9,
                                              1e-4, "kfac" if name == "a" else "laplace")
               for name, shape in (("a", (4, 3)), ("b/c", (2, 5, 3)))}
    weights["a"].kfac = (rng.random((4, 4)), rng.random((3, 3)))
    Posterior("kfac", 9, 1e-4, weights, ["n"]).save(tmp_path / "p.npz")
    with np.load(tmp_path / "p.npz") as data:
        keys = list(data.files)
        header = data["__header__"]
    assert keys == ["mean/a", "precision/a", "curvature/a", "kfac_a/a", "kfac_g/a", "mean/b/c", "precision/b/c",
                    "curvature/b/c", "__header__"]
    assert header.dtype == np.uint8
    back = Posterior.load(tmp_path / "p.npz")
    for name, wp in weights.items():
        for field in ("mean", "precision", "curvature"):
            np.testing.assert_array_equal(getattr(back.weights[name], field), getattr(wp, field))
    np.testing.assert_array_equal(back.weights["a"].kfac[1], weights["a"].kfac[1])


@pytest.mark.parametrize("kind", ["ours", "std", "precision"])
def test_big_posterior_files_are_read_weight_by_weight_with_the_same_numbers(tmp_path, monkeypatch, kind):
    import bq_onnx.posterior as posterior_module

    rng = np.random.default_rng(7)
    mean = rng.standard_normal((6, 4)).astype(np.float32)
    path = tmp_path / "p.npz"
    if kind == "ours":
        wp = posterior_from_curvature(mean, rng.random((6, 4)), samples=7, prior_precision=1e-3, source="laplace")
        Posterior("laplace", 7, 1e-3, {"W": wp}).save(path)
    elif kind == "std":
        np.savez(path, **{"mean/W": mean, "std/W": rng.random((6, 4)) + 0.1})
    else:
        np.savez(path, **{"mean/W": mean, "precision/W": (rng.random((6, 4)) + 0.1).astype(np.float32)})
    eager = Posterior.load(path)
    monkeypatch.setattr(posterior_module, "LAZY_LOAD_BYTES", 0)
    lazy = Posterior.load(path)
    assert lazy.weights["W"].lazy and not eager.weights["W"].lazy
    for field in ("mean", "precision", "curvature", "std"):
        got, want = getattr(lazy.weights["W"], field), getattr(eager.weights["W"], field)
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    np.savez(tmp_path / "bad.npz", **{"mean/W": mean, "std/W": -np.ones((6, 4))})
    with pytest.raises(DataError, match="finite and positive"):  # checked at load, lazy or not
        Posterior.load(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="cannot read posterior"):
        np.save(tmp_path / "one.npy", mean)
        Posterior.load(tmp_path / "one.npy")


def test_summary_taken_band_by_band_is_the_whole_arrays_summary(monkeypatch):
    """Per layer, the means of the curvature, the standard deviation and |mu|/sigma as numpy takes them over the
    whole arrays (the bands change the summation order only)."""
    import bq_onnx.posterior as posterior

    rng = np.random.default_rng(3)
    mean = rng.standard_normal((37, 29)).astype(np.float32)
    wp = posterior_from_curvature(mean, rng.random((37, 29)), 11, 1e-3, "laplace")
    monkeypatch.setattr(posterior, "SUMMARY_BAND", 100)  # 11 bands, the last one short
    (row,) = Posterior("laplace", 11, 1e-3, {"W": wp}).summary()
    std = 1.0 / np.sqrt(wp.precision)
    assert row["numel"] == 37 * 29 and row["name"] == "W" and row["source"] == "laplace"
    assert row["mean_curvature"] == float(np.mean(wp.curvature))
    np.testing.assert_allclose(row["mean_std"], np.mean(std), rtol=1e-12)
    np.testing.assert_allclose(row["mean_informativeness"], np.mean(np.abs(mean) / std), rtol=1e-12)
