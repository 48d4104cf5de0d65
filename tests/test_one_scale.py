"""Estimators on one scale (issue 15 item 3): a weight without gradients gets a loss table measured on calibration
data and put on the closed-form (Fisher) scale of the others, and output channels calibration never exercises get
their curvature floored from the ones it does."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.estimators import driver
from bq_onnx.stages import posterior as posterior_stage
from bq_onnx.stages.tables import MC_SAMPLES, _MonteCarlo, interpolate_ratio, measured_widths
from bq_onnx.weights import design, weight_view
from tests import passkit
from tests.conftest import make_model

RNG = np.random.default_rng(15)
D, H, C = 24, 32, 10


def _w(k: int, n: int, rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def asinh_model(differentiable: bool) -> onnx.ModelProto:
    """``logits = relu(asinh(x @ W1) @ W2) @ W3``. ``asinh`` has no gradient rule, so ``W1`` falls back to the
    activations estimator; ``differentiable`` spells it ``log(t + sqrt(t^2 + 1))`` instead (the same function,
    every op with a rule), so ``W1`` gets the Fisher like the others: the reference for its measured table."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(_w(D, H, rng) * 3, "W1"), numpy_helper.from_array(_w(H, H, rng) * 2, "W2"),
             numpy_helper.from_array(_w(H, C, rng) * 4, "W3")]
    if differentiable:
        inits.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
        act = [helper.make_node("Mul", ["t", "t"], ["t2"]), helper.make_node("Add", ["t2", "one"], ["t3"]),
               helper.make_node("Sqrt", ["t3"], ["t4"]), helper.make_node("Add", ["t", "t4"], ["t5"]),
               helper.make_node("Log", ["t5"], ["a"])]
    else:
        act = [helper.make_node("Asinh", ["t"], ["a"])]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["t"]), *act,
             helper.make_node("MatMul", ["a", "W2"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W3"], ["logits"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", C])], inits)


def head_model() -> onnx.ModelProto:
    """A classifier whose classes ``C/2..C-1`` are never predicted on any input (a bias of -30): the calibration
    data never exercise their head columns."""
    rng = np.random.default_rng(1)
    bias = np.zeros(2 * C, np.float32)
    bias[C:] = -30.0
    inits = [numpy_helper.from_array(_w(D, H, rng) * 2, "W1"), numpy_helper.from_array(_w(H, 2 * C, rng) * 4, "Head"),
             numpy_helper.from_array(bias, "bias")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "Head"], ["z"]), helper.make_node("Add", ["z", "bias"], ["logits"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2 * C])], inits)


def _calib(n: int = 96, seed: int = 3) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)}


def _estimated(proto: onnx.ModelProto, calib, **settings):
    ctx = passkit.context(min_size=16, **settings)
    model = passkit.find_weights(passkit.prepare(passkit.load(proto), ctx), ctx)
    ctx.posterior = posterior_stage.estimate(model, ctx.weights, calib, ctx.config.posterior, False)
    ctx.messages.extend(ctx.posterior.notes)
    return model, ctx


def _table(tables, weight: str) -> np.ndarray:
    """A weight's loss per width, summed over its blocks."""
    return np.sum([t.loss for t in tables.blocks if t.weight == weight], axis=0)


SETTINGS = {"bits": 4, "allowed_bits": [2, 3, 4, 5, 6, 7, 8], "granularity": "tensor"}


def test_a_weight_behind_an_op_without_gradient_rule_gets_a_measured_table_on_the_fisher_scale():
    calib = _calib()
    model, ctx = _estimated(asinh_model(False), calib, **SETTINGS)
    sources = {k: w.source for k, w in ctx.posterior.weights.items()}
    assert sources["W1"] == "activations" and sources["W2"] == sources["W3"] == "laplace"
    closed_old = _table(passkit.tables(model, ctx), "W1")  # without calibration: E[x^2], the old scale
    assert not any("measured on calibration" in m for m in ctx.messages)
    tables = passkit.tables(model, ctx, calib)
    measured = _table(tables, "W1")
    assert any(m.startswith("1 weight(s) without gradients got loss tables measured") for m in ctx.messages)
    for name in ("W2", "W3"):  # the gradient-covered weights keep their closed form
        np.testing.assert_array_equal(_table(tables, name), _table(passkit.tables(model, ctx), name))

    ref_model, ref_ctx = _estimated(asinh_model(True), calib, **SETTINGS)
    assert ref_ctx.posterior.weights["W1"].source == "laplace"
    reference = _table(passkit.tables(ref_model, ref_ctx), "W1")  # the same tensor's closed form from gradients
    ratio = measured / reference
    assert np.all(ratio > 1 / 4) and np.all(ratio < 4), ratio
    old = closed_old / reference
    assert np.all((old > 20) | (old < 1 / 20)), old  # what it replaced was off by more than an order of magnitude
    assert np.all(np.diff(measured) <= 0)

    bits = passkit.allocate(model, ctx).bits
    ref_bits = passkit.allocate(ref_model, ref_ctx).bits
    assert abs(bits["W1"] - ref_bits["W1"]) <= 1, (bits, ref_bits)
    assert min(SETTINGS["allowed_bits"]) < bits["W1"] < max(SETTINGS["allowed_bits"])  # neither free nor precious


def test_the_interpolated_widths_match_a_measurement_at_a_width_not_measured():
    calib = _calib()
    model, ctx = _estimated(asinh_model(False), calib, **SETTINGS)
    allowed = tuple(SETTINGS["allowed_bits"])
    assert measured_widths(allowed) == (2, 5, 8)
    table = _table(passkit.tables(model, ctx, calib), "W1")
    info = next(w for w in ctx.weights if w.name == "W1")
    view, importance = weight_view(ctx, info)
    mc = _MonteCarlo(ctx, model, calib, MC_SAMPLES, None, None)
    try:
        kl = {b: mc.block_losses(info, view, design(ctx, view, importance, b, "W1").dequantize(),
                                 [(0, view.shape[1])])[0] for b in (2, 3, 4, 6, 7)}
    finally:
        mc.close()
    # the table's calibration factor cancels in ratios between its own widths. A single measurement jitters about
    # the 4^-bits curve by up to ~2x (one rounding pattern is luckier than another: on this model 6 bits measures
    # 2.1x below the curve), which no interpolation can predict; together the widths must be unbiased
    errors = []
    for b in (3, 4, 6, 7):
        predicted = table[allowed.index(b)] / table[allowed.index(2)]
        actual = kl[b] / kl[2]
        errors.append(predicted / actual)
        assert 1 / 2.5 < predicted / actual < 2.5, (b, predicted, actual)
        assert actual < 0.5 ** (b - 2)  # and the interpolation is informative: each width is worth a factor ~4
    assert 1 / 1.6 < np.exp(np.mean(np.log(errors))) < 1.6, errors


def test_interpolate_ratio_is_log_linear_in_bits_between_the_measured_widths():
    bits = (0, 2, 3, 4, 5, 6, 7, 8)
    closed = 4.0 ** -np.array(bits, dtype=np.float64)
    measured = {0: 5.0, 2: 3 * closed[1], 5: 12 * closed[4], 8: 3 * closed[7]}
    ratio = interpolate_ratio(bits, measured, closed)
    np.testing.assert_allclose(ratio[[0, 1, 4, 7]], [5.0, 3, 12, 3])
    # log-linear between the knots: 3 -> 12 over three widths is a factor 4^(1/3) per width
    np.testing.assert_allclose(ratio[2:4], 3 * 4 ** (np.array([1, 2]) / 3))
    np.testing.assert_allclose(ratio[5:7], 12 * 4 ** (-np.array([1, 2]) / 3))


def test_unexercised_classifier_columns_get_a_floored_curvature_and_no_longer_zero_bits(monkeypatch):
    calib = _calib()
    settings = {"bits": 4, "format": "compact", "allowed_bits": [0, 1, 2, 3, 4, 5, 6, 7, 8], "granularity": "rows:5"}
    model, ctx = _estimated(head_model(), calib, **settings)
    info = next(w for w in ctx.weights if w.name == "Head")
    means = info.layout.to_view(np.asarray(ctx.posterior.weights["Head"].curvature)).mean(axis=0)
    assert means.shape == (2 * C,)
    seen, silent = means[:C], means[C:]
    level = driver.weighted_median(np.concatenate([seen, np.zeros(C)]))  # the silent ones' raw means are ~0
    assert np.median(seen) / 10 < level < np.max(seen)  # the level of the columns the data exercise
    np.testing.assert_allclose(silent, driver.CHANNEL_FLOOR * level, rtol=1e-6)
    assert any("'Head': 10 output channel(s)" in n for n in ctx.posterior.notes)
    passkit.tables(model, ctx, calib)
    bits = passkit.allocate(model, ctx).bits
    silent_blocks = [b for name, b in bits.items() if name.startswith("Head[") and int(name[5:].split(":")[0]) >= C]
    seen_blocks = [b for name, b in bits.items() if name.startswith("Head[") and int(name[5:].split(":")[0]) < C]
    assert len(silent_blocks) == 2 and min(silent_blocks) >= 2, bits
    assert max(seen_blocks) - min(silent_blocks) <= 2, bits  # below the exercised columns, not far below

    monkeypatch.setattr(driver, "CHANNEL_FLOOR", 0.0)  # what it was: the silent columns nearly free
    model, ctx = _estimated(head_model(), calib, **settings)
    raw = info.layout.to_view(np.asarray(ctx.posterior.weights["Head"].curvature)).mean(axis=0)
    assert np.all(raw[C:] < 1e-6 * np.median(raw[:C]))
    passkit.tables(model, ctx, calib)
    bits = passkit.allocate(model, ctx).bits
    assert max(b for name, b in bits.items() if name.startswith("Head[") and int(name[5:].split(":")[0]) >= C) == 0


def branch_model() -> onnx.ModelProto:
    """``logits = If(sum(x) > 0, asinh(x @ W_then), asinh(x @ W_else)) @ Wout``: the branch weights cannot be fed
    to a session (inside a subgraph) and have no gradient (no rule for Asinh); ``Wout`` has one. The branch
    weights are small, so ``h`` and the Fisher of ``Wout`` are too, while their own ``E[x^2]`` is 1: the two
    scales differ."""
    rng = np.random.default_rng(2)

    def branch(name: str) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("MatMul", ["x", name], [f"m_{name}"]),
                                  helper.make_node("Asinh", [f"m_{name}"], [f"y_{name}"])], name, [],
                                 [helper.make_tensor_value_info(f"y_{name}", TensorProto.FLOAT, ["b", H])],
                                 initializer=[numpy_helper.from_array(_w(D, H, rng) * 0.2, name)])

    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["h"], then_branch=branch("W_then"), else_branch=branch("W_else")),
             helper.make_node("MatMul", ["h", "Wout"], ["logits"])]
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(_w(H, C, rng) * 4, "Wout")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", D])],
                      [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", C])], inits)


def test_weights_that_cannot_be_fed_keep_the_closed_form_rescaled_to_the_gradient_level():
    calib = _calib()
    model, ctx = _estimated(branch_model(), calib, **SETTINGS)
    post = ctx.posterior
    sources = {k: w.source for k, w in post.weights.items()}
    assert sources["Wout"] == "laplace" and {sources["W_then"], sources["W_else"]} <= {"activations", "mean"}
    inside = [w.name for w in ctx.weights if w.scope]
    assert sorted(inside) == ["W_else", "W_then"]
    closed = {name: _table(passkit.tables(model, ctx), name) for name in inside}
    tables = passkit.tables(model, ctx, calib)
    level = float(np.mean(post.weights["Wout"].curvature))
    n, prior = post.samples, post.prior_precision
    for name in inside:
        mean = float(np.mean(post.weights[name].curvature))
        factor = (n * level + prior) / (n * mean + prior)
        assert not 0.5 < factor < 2  # E[x^2] is not the Fisher's level: the rescale does something here
        np.testing.assert_allclose(_table(tables, name), closed[name] * factor, rtol=1e-9)
    np.testing.assert_array_equal(_table(tables, "Wout"), _table(passkit.tables(model, ctx), "Wout"))
    assert ctx.unpriced == {"W_then", "W_else"}  # kept at the uniform width by the allocation (test below)


def test_weights_that_cannot_be_priced_are_kept_at_the_uniform_width(monkeypatch):
    """No gradient and not feedable (an If branch's weights): the data say nothing of their effect, so they keep
    the width a uniform allocation of the budget gives, neither less nor more; the rest of the budget goes to the
    weights the posterior prices. Before, their curvature was rescaled to the mean level of the others and the
    allocation spent on them like on any weight (silero-vad: its untaken 8 kHz branch's LSTM got 4-4.25 bits at
    ``--bits 4`` while the 16 kHz branch the data run got about 3)."""
    from bq_onnx import pipeline
    from bq_onnx.stages import allocate

    def widths_at(bits: int) -> tuple[dict[str, list[int]], list[str]]:
        result = bq_onnx.optimize(branch_model(), calib=_calib(), bits=bits, bits_payload=True, format="compact",
                                  granularity="tensor", min_size=16, no_guard=True)
        got = {w: sorted({b for name, b in result.context.allocation.bits.items() if name.split("[")[0] == w})
               for w in ("W_then", "W_else", "Wout")}
        return got, [m for m in result.report["messages"] if "cannot measure" in m]

    pinned = {}
    for bits in (3, 4, 5):
        widths, said = widths_at(bits)
        assert len(said) == 1 and "2 weights" in said[0], said
        uniform = int(said[0].split("kept at ")[1].split()[0])
        assert widths["W_then"] == widths["W_else"] == [uniform], (bits, widths, uniform)
        pinned[bits] = widths
    for module in (allocate, pipeline):  # what it did before: unpriced weights priced like the others
        monkeypatch.setattr(module, "head_floors", _unpinned(allocate.head_floors))
    monkeypatch.setattr(allocate, "allocation_blocks", _unpinned(allocate.allocation_blocks))
    assert any(widths_at(bits)[0] != pinned[bits] for bits in (3, 4, 5))


def _unpinned(fn):
    def without(ctx_or_model, *args, **kwargs):
        ctx = args[0] if not hasattr(ctx_or_model, "unpriced") else ctx_or_model
        kept, ctx.unpriced = ctx.unpriced, set()
        try:
            return fn(ctx_or_model, *args, **kwargs)
        finally:
            ctx.unpriced = kept
    return without


def test_twice_n_times_the_measured_kl_is_the_closed_form_under_the_true_fisher():
    """The conversion the measured tables use (``KL_TO_CLOSED_FORM``): on gradient-covered weights with the
    true Fisher (``fisher-mc``), ``2 N`` times the measured mean KL matches the closed form, in the mean over
    tensors and widths; single measurements scatter (the diagonal misses correlated errors)."""
    from bq_onnx.stages.tables import KL_TO_CLOSED_FORM

    calib = _calib(128)
    model, ctx = _estimated(asinh_model(True), calib, method="fisher-mc", mc_samples=8, **SETTINGS)
    tables = passkit.tables(model, ctx)
    mc = _MonteCarlo(ctx, model, calib, MC_SAMPLES, None, None)
    ratios = []
    try:
        for info in ctx.weights:
            view, importance = weight_view(ctx, info)
            closed = _table(tables, info.name)
            for j, b in enumerate(SETTINGS["allowed_bits"]):
                kl = mc.block_losses(info, view, design(ctx, view, importance, b, info.name).dequantize(),
                                     [(0, view.shape[1])])[0]
                ratios.append(KL_TO_CLOSED_FORM * ctx.posterior.samples * kl / closed[j])
    finally:
        mc.close()
    assert len(ratios) == 3 * 7 and KL_TO_CLOSED_FORM == 2.0
    assert 1 / 1.6 < np.exp(np.mean(np.log(ratios))) < 1.6, ratios
    assert min(ratios) > 1 / 10 and max(ratios) < 10, ratios
