"""``--rounding gptq`` in the pipeline: the layer-input second moments it measures (bq_onnx/stages/moments.py, checked
against explicit numpy loops), the quantize stage's use of them, and the end-to-end option (both formats, the
data-free fallback)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.calibration import load_calibration
from bq_onnx.rounding import output_error
from bq_onnx.stages.moments import input_moments
from tests import passkit
from tests.conftest import make_model

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
RNG = np.random.default_rng(4)
W = RNG.standard_normal((16, 24)).astype(np.float32)
G = RNG.standard_normal((12, 24)).astype(np.float32)  # Gemm transB: view (24, 12)
C = RNG.standard_normal((8, 2, 3, 3)).astype(np.float32)  # Conv, 2 groups of 2 input channels
MODEL = make_model(
    [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Gemm", ["h", "G"], ["y"], transB=1),
     helper.make_node("Conv", ["img", "C"], ["z"], group=2, pads=[1, 1, 1, 1], strides=[2, 1])],
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 16]),
     helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 4, 5, 6])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 12]),
     helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 8, 3, 6])],
    [numpy_helper.from_array(W, "W"), numpy_helper.from_array(G, "G"), numpy_helper.from_array(C, "C")],
)


def _data(n: int = 10) -> dict[str, np.ndarray]:
    mix = RNG.standard_normal((16, 16))
    return {"x": (RNG.standard_normal((n, 16)) @ mix).astype(np.float32),
            "img": RNG.standard_normal((n, 4, 5, 6)).astype(np.float32)}


def _conv_moment(img: np.ndarray) -> np.ndarray:
    """Explicit loops: per group, the mean over samples and output positions of patch patch^T."""
    n, _, h, w = img.shape
    pad = np.pad(img.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((2, 18, 18))
    count = 0
    for s in range(n):
        for i in range(0, h + 2 - 3 + 1, 2):
            for j in range(0, w + 2 - 3 + 1):
                count += 1
                for g in range(2):
                    p = pad[s, 2 * g : 2 * g + 2, i : i + 3, j : j + 3].reshape(-1)  # (c, kh, kw) order
                    out[g] += np.outer(p, p)
    return out / (count // 1)


def test_moments_match_explicit_loops():
    ctx = passkit.context(bits=3, group_size=8, min_size=32, rounding="gptq")
    model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), ctx), ctx)
    data = _data()
    a = input_moments(model, ctx, load_calibration(data, model))
    x = data["x"].astype(np.float64)
    h = x @ W.astype(np.float64)
    np.testing.assert_allclose(a["W"][0], _shrunk(x.T @ x / len(x), len(x)), rtol=1e-10)
    np.testing.assert_allclose(a["G"][0], _shrunk(h.T @ h / len(h), len(h)), rtol=1e-5, atol=1e-4)  # float32 runs
    np.testing.assert_allclose(a["C"], _shrunk(_conv_moment(data["img"]), 10 * 3 * 6), rtol=1e-10, atol=1e-12)


def _shrunk(a: np.ndarray, rows: int) -> np.ndarray:
    """Explicitly: ``(1 - alpha) A + alpha diag(A)`` with ``alpha = K / (K + rows)``, per group."""
    k = a.shape[-1]
    alpha = k / (k + rows)
    if a.ndim == 2:
        return (1 - alpha) * a + alpha * np.diag(np.diag(a))
    return np.stack([_shrunk(g, rows) for g in a])


def test_quantize_stage_compensates_and_keeps_the_grid():
    near_ctx = passkit.context(bits=3, group_size=8, min_size=32)
    gptq_ctx = passkit.context(bits=3, group_size=8, min_size=32, rounding="gptq")
    from bq_onnx.stages.quantize import quantize_weights

    model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), gptq_ctx), gptq_ctx)
    near_ctx.weights = gptq_ctx.weights
    calib = load_calibration(_data(), model)
    near = quantize_weights(near_ctx, model, calib)
    comp = quantize_weights(gptq_ctx, model, calib)
    for info in gptq_ctx.weights:
        a = gptq_ctx.moments[info.name]
        view = info.layout.to_view(info.value.const_value.numpy())
        q0, q1 = near[info.name], comp[info.name]
        assert np.array_equal(q0.scale, q1.scale) and np.array_equal(q0.zero_point, q1.zero_point)
        assert output_error(view, q1.dequantize(), a) < output_error(view, q0.dequantize(), a)


def _kl_to_fp32(path, ref_path, x):
    import onnxruntime as ort

    def run(p):
        opts = ort.SessionOptions()
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]

    def logp(z):
        z = z.astype(np.float64) - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    lp, lq = logp(run(ref_path)), logp(run(path))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


@pytest.mark.parametrize(("name", "rounding", "fmt"), [("digits_mlp", "gptq-plain", "compact"),
                                                      ("digits_mlp", "gptq-plain", "native"),
                                                      ("lenet", "gptq", "compact")])
def test_gptq_measures_better_than_nearest_on_held_out_digits(tmp_path, name, rounding, fmt):
    """Same uniform 3-bit grid, evaluation inputs disjoint from calibration: compensated rounding is closer to FP32
    (numbers of ``python -m benchmarks.gptq``: the posterior-weighted form wins on LeNet, the plain one on the MLP)."""
    model = ROOT / "models" / f"{name}.onnx"
    data = np.load(ROOT / "models" / f"{name}_data.npz")
    calib = {"input": data["calib_input"]}
    kl = {}
    for how in ("nearest", rounding):
        out = tmp_path / f"{how}.onnx"
        result = bq_onnx.optimize(str(model), calib=calib, bits=3, allocator="uniform", format=fmt, rounding=how)
        result.save(str(out), force=True)  # verified: decodes exactly to the numpy reference in onnxruntime
        kl[how] = _kl_to_fp32(out, model, data["test_input"])
    assert kl[rounding] < 0.9 * kl["nearest"]  # 0.82 on the MLP since A is shrunk toward its diagonal (moments.shrink)


def test_data_free_falls_back_to_nearest_with_a_note(tmp_path):
    model = ROOT / "models" / "digits_mlp.onnx"
    outs = {}
    for rounding in ("nearest", "gptq"):
        result = bq_onnx.optimize(str(model), bits=4, allocator="uniform", format="compact", rounding=rounding)
        outs[rounding] = tmp_path / f"{rounding}.onnx"
        result.save(str(outs[rounding]), force=True, verify=False)
        if rounding == "gptq":
            assert any("no calibration data" in m for m in result.context.messages)
    # the graphs (every weight) are the same; the metadata differ by the recipe each records (provenance)
    graphs = {k: onnx.load(str(v)).graph.SerializeToString() for k, v in outs.items()}
    assert graphs["gptq"] == graphs["nearest"]


def test_a_convolution_im2col_does_not_cover_gets_no_moment():
    same = make_model(
        [helper.make_node("Conv", ["img", "C"], ["z"], group=2, auto_pad="SAME_UPPER")],
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["b", 4, 5, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 8, 5, 6])],
        [numpy_helper.from_array(C, "C")],
    )
    ctx = passkit.context(bits=3, group_size=8, min_size=32, rounding="gptq")
    model = passkit.find_weights(passkit.prepare(passkit.load(same), ctx), ctx)
    assert input_moments(model, ctx, load_calibration({"img": _data()["img"]}, model)) == {}


@pytest.mark.parametrize("rounding", ["gptq-plain", "gptq"])
def test_tables_price_each_width_after_compensation(rounding):
    """Under ``--rounding gptq`` a block's loss at each width is the nearest-rounding loss times what GPTQ leaves of
    nearest's layer-output error (recomputed here from the rounding module directly), never more than nearest's."""
    from bq_onnx.rounding import gptq_round
    from bq_onnx.weights import design, weight_view

    def tables(how):
        ctx = passkit.context(bits=3, group_size=8, min_size=32, granularity="tensor", allowed_bits=[2, 3, 4],
                              rounding=how)
        model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), ctx), ctx)
        return ctx, passkit.tables(model, ctx, load_calibration(data, model))

    data = _data(40)  # fewer than 2 x CHOICE_SAMPLES: priced by the metric alone
    _, near = tables("nearest")
    ctx, comp = tables(rounding)
    near_loss = {t.weight: t.loss for t in near.blocks}
    assert {t.weight for t in comp.blocks} == {"W", "G", "C"}
    for t in comp.blocks:
        info = next(w for w in ctx.weights if w.name == t.weight)
        view, importance = weight_view(ctx, info)
        want = []
        for j, bits in enumerate(t.bits):
            qt = design(ctx, view, importance, bits, t.weight)
            got = gptq_round(view, qt, ctx.moments[t.weight], None if rounding == "gptq-plain" else importance)
            a = ctx.moments[t.weight]
            ratio = output_error(view, got.dequantize(), a, importance) / output_error(view, qt.dequantize(), a,
                                                                                       importance)
            want.append(near_loss[t.weight][j] * ratio)
        np.testing.assert_allclose(t.loss, np.minimum.accumulate(want), rtol=1e-9)
        assert np.all(t.loss <= near_loss[t.weight]) and (t.loss < near_loss[t.weight]).any()
        if t.weight == "W":  # correlated inputs (the data mix them): compensation recovers much of the error
            assert t.loss[0] < 0.9 * near_loss[t.weight][0]


def test_a_measured_choice_keeps_nearest_codes_and_a_never_sees_the_choice_samples(monkeypatch):
    """With 2 x CHOICE_SAMPLES or more samples, ``A`` comes from all but the last CHOICE_SAMPLES; a width whose
    measured GPTQ loss is not below nearest's keeps nearest's codes in the quantize stage and nearest's loss in the
    tables; a measured gain prices the width no lower than the layer-output metric does."""
    import bq_onnx.stages.tables as tables_stage
    from bq_onnx.stages.quantize import quantize_weights

    measured = {("W", 2): 1.3, ("W", 3): 0.01}
    monkeypatch.setattr(tables_stage._Compensation, "_measured_ratio",
                        lambda self, info, view, qt, rounded: measured.get((info.name, qt.bits)))
    n = 2 * tables_stage.CHOICE_SAMPLES + 8
    data = _data(n)

    def run(how, allowed):
        ctx = passkit.context(bits=3, group_size=8, min_size=32, granularity="tensor", allowed_bits=allowed,
                              rounding=how)
        model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), ctx), ctx)
        calib = load_calibration(data, model)
        return ctx, model, calib, passkit.tables(model, ctx, calib)

    _, _, _, near = run("nearest", [2, 3, 4])
    ctx, model, calib, comp = run("gptq", [2, 3, 4])
    head = {k: v[: n - tables_stage.CHOICE_SAMPLES] for k, v in data.items()}
    np.testing.assert_allclose(ctx.moments["W"], input_moments(model, ctx, load_calibration(head, model))["W"])
    t_near = next(t for t in near.blocks if t.weight == "W")
    t_comp = next(t for t in comp.blocks if t.weight == "W")
    assert t_comp.loss[0] == pytest.approx(t_near.loss[0], rel=1e-12)  # measured worse: nearest's loss
    # a measured gain larger than the metric's is priced at the metric's ratio (32 samples are noisy)
    from bq_onnx.rounding import gptq_round
    from bq_onnx.weights import design, weight_view

    info = next(w for w in ctx.weights if w.name == "W")
    view, importance = weight_view(ctx, info)
    qt = design(ctx, view, importance, 3, "W")
    a = ctx.moments["W"]
    metric_ratio = output_error(view, gptq_round(view, qt, a, importance).dequantize(), a, importance) / output_error(
        view, qt.dequantize(), a, importance)
    assert t_comp.loss[1] == pytest.approx(metric_ratio * t_near.loss[1], rel=1e-9)
    assert ctx.rounded[("nearest", "W", 2)] and ("nearest", "W", 3) not in ctx.rounded
    # the quantize stage at a fixed 2 bits: W keeps nearest's codes, the others are compensated
    ctx.pieces_for = lambda name, n_cols: [(0, n_cols, 2)]
    got = quantize_weights(ctx, model, calib)

    for info in ctx.weights:
        view, importance = weight_view(ctx, info)
        same = np.array_equal(got[info.name].codes, design(ctx, view, importance, 2, info.name).codes)
        assert same == (info.name == "W")


def test_filled_uniform_gptq_baseline_spends_the_budget_uniform_leaves(tmp_path):
    """``benchmarks/gptq.py``'s equal-size GPTQ baseline (uniform + whole layers raised, ``filled gptq-plain``):
    one width stores well under a 4-bit stored budget (4 bits with scales cost more than 4), the filled one spends
    what it leaves, never more, counted on the written model, and measures closer to FP32 on held-out inputs.
    (``bits_include_metadata``, as the benchmark passes it: with ``allocator="uniform"`` a whole ``bits`` is
    otherwise the fixed grid width, 4.29 stored bits here.)"""
    from benchmarks.peers import stored_size

    model = ROOT / "models" / "digits_mlp.onnx"
    data = np.load(ROOT / "models" / "digits_mlp_data.npz")
    bpw, kl = {}, {}
    for name, extra in (("uniform", {}), ("filled", {"allocator_options": {"fill": True}})):
        out = tmp_path / f"{name}.onnx"
        result = bq_onnx.optimize(str(model), calib={"input": data["calib_input"]}, bits=4, allocator="uniform",
                                  rounding="gptq-plain", format="compact", group_size=64,
                                  bits_include_metadata=True, **extra)  # a stored budget, not the fixed 4-bit grid
        result.save(str(out), force=True)  # verified: decodes exactly to the numpy reference in onnxruntime
        bpw[name] = stored_size(model, out)["bpw"]
        kl[name] = _kl_to_fp32(out, model, data["test_input"])
    assert bpw["uniform"] < 3.5 < bpw["filled"] <= 4.0
    assert kl["filled"] < kl["uniform"]


def test_the_gptq_metrics_kept_are_bounded_and_recomputing_them_changes_nothing(monkeypatch, tmp_path):
    """Every weight's GPTQ metric (two (K, K) and two (K, N) float64 arrays) was kept all run; now at most
    METRIC_CACHE_BYTES (the least recently used go first) and one evicted is computed again, the same."""
    import bq_onnx.stages.quantize as quantize
    from tests.conftest import MODELS

    calib = {"input": np.load(MODELS / "lenet_calib.npz")["input"][:96]}
    kept = bq_onnx.optimize(MODELS / "lenet.onnx", calib=calib, bits=4, format="compact")
    assert len(kept.context.rounded[quantize.METRICS]) > 1  # several weights' metrics under the default bound
    monkeypatch.setattr(quantize, "METRIC_CACHE_BYTES", 1)
    bounded = bq_onnx.optimize(MODELS / "lenet.onnx", calib=calib, bits=4, format="compact")
    assert len(bounded.context.rounded[quantize.METRICS]) == 1
    kept.save(str(tmp_path / "kept.onnx"))
    bounded.save(str(tmp_path / "bounded.onnx"))
    assert (tmp_path / "kept.onnx").read_bytes() == (tmp_path / "bounded.onnx").read_bytes()


def test_gptq_moments_wait_on_disk_with_the_same_values():
    """The input moments GPTQ reads when a weight's metric is built are kept in a mapped file between (read-only
    views), the values unchanged."""
    from bq_onnx.idle import IDLE_BYTES, arrays_to_disk

    rng = np.random.default_rng(0)
    k = int(np.sqrt(IDLE_BYTES / 8)) + 8
    arrays = {"big": rng.standard_normal((k, k)), "small": rng.standard_normal((4, 4))}
    moved = arrays_to_disk(arrays)
    assert not moved["big"].flags.writeable and moved["small"] is arrays["small"]
    np.testing.assert_array_equal(moved["big"], arrays["big"])


def test_gptq_metric_memory_is_estimated_and_checked_against_the_budget(monkeypatch):
    """What building a GPTQ metric allocates is computed first (float64 ``(K, K)`` arrays: 2.8 GiB at K = 8192) and
    compared with the memory budget: a 0.125 GiB MLP with ``--max-memory 2G`` ran to 3.06 GiB before; now one line."""
    import tracemalloc

    import bq_onnx.stages.quantize as quantize
    from bq_onnx.errors import ModelError
    from bq_onnx.rounding.gptq import DAMPING, Metric
    from tests.conftest import MODELS

    k, n = 384, 96
    x = np.random.default_rng(0).standard_normal((512, k))
    a = (x.T @ x / 512)[None]
    tracemalloc.start()
    Metric(a, None, n, DAMPING)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert 0.5 * quantize.gptq_bytes(k, n) <= peak <= quantize.gptq_bytes(k, n)
    monkeypatch.setattr(quantize, "gptq_bytes", lambda k, n, groups=1, on_disk=False: 1 << 60)
    calib = {"input": np.load(MODELS / "lenet_calib.npz")["input"][:96]}
    with pytest.raises(ModelError, match=r"GPTQ rounding of '.*' .* needs [0-9.]+ TiB, more than the memory budget"):
        bq_onnx.optimize(MODELS / "lenet.onnx", calib=calib, bits=4, format="compact")


def test_kept_gptq_results_wait_on_disk_with_the_same_codes(monkeypatch):
    """Each GPTQ result is kept for the run (per weight and width); where big, its codes wait in a mapped temporary
    file (read-only, the same values) instead of memory, and the design it was made from is kept as a digest."""
    import bq_onnx.idle as idle
    from bq_onnx.stages.quantize import METRICS, quantize_weights

    data = _data()
    runs = []
    for on_disk in (False, True):
        if on_disk:  # every array counts as big
            monkeypatch.setattr(idle, "IDLE_BYTES", 0)
            monkeypatch.setattr(idle, "MIN_ARRAY_BYTES", 0)
        ctx = passkit.context(bits=3, group_size=8, min_size=32, rounding="gptq")
        model = passkit.find_weights(passkit.prepare(passkit.load(MODEL), ctx), ctx)
        runs.append((ctx, quantize_weights(ctx, model, load_calibration(data, model))))
    (memory, q0), (disk, q1) = runs
    for name in q0:
        np.testing.assert_array_equal(q0[name].codes, q1[name].codes)
    for ctx, writeable in ((memory, True), (disk, False)):
        kept = [v for k, v in ctx.rounded.items() if k != METRICS and len(k) == 2]
        assert len(kept) == 3
        assert all(v[1].codes.flags.writeable == writeable for v in kept)
        assert all(isinstance(v[0], tuple) for v in kept)  # the design's digest, not the design
