"""Loss terms per output (issue 14 item 2): ``--loss`` parsing, the default rule, each kind's value and gradient
against float64 numpy and finite differences, slices, weights, integer outputs refused, the report."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.autodiff.gradient import build_gradient_model
from bq_onnx.autodiff.loss import LOSS, TARGET, append_loss
from bq_onnx.errors import UsageError
from bq_onnx.estimators.loss_plan import channel_axis, divergence, resolve
from bq_onnx.estimators.loss_targets import targets
from bq_onnx.loss_spec import LossTerm, parse_loss, parse_term
from tests.conftest import ALL_WIDTHS, make_model
from tests.written import run, session

RNG = np.random.default_rng(14)
W = (RNG.standard_normal((6, 8)) * 0.7).astype(np.float32)
X = RNG.standard_normal((5, 6)).astype(np.float32)
V = lambda name, t, shape: helper.make_tensor_value_info(name, t, shape)  # noqa: E731


def _heads() -> ir.Model:
    """``ids`` (int64, first), ``logits = x W`` (a linear head), ``probs = softmax``, ``unit = logits / |logits|``,
    ``act = relu(logits)``."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("ArgMax", ["logits"], ["ids"], axis=-1, keepdims=0),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        helper.make_node("Mul", ["logits", "logits"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "last"], ["sum_squares"], keepdims=1),
        helper.make_node("Sqrt", ["sum_squares"], ["norm"]),
        helper.make_node("Div", ["logits", "norm"], ["unit"]),
        helper.make_node("Relu", ["logits"], ["act"]),
    ]
    proto = make_model(nodes, [V("x", TensorProto.FLOAT, ["b", 6])],
                       [V("ids", TensorProto.INT64, ["b"]), V("logits", TensorProto.FLOAT, ["b", 8]),
                        V("probs", TensorProto.FLOAT, ["b", 8]), V("unit", TensorProto.FLOAT, ["b", 8]),
                        V("act", TensorProto.FLOAT, ["b", 8])],
                       [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([-1], np.int64), "last")])
    return ir.serde.deserialize_model(proto)


def _values(w: np.ndarray = W, x: np.ndarray = X) -> dict[str, np.ndarray]:
    """The outputs in float64 numpy."""
    z = x.astype(np.float64) @ w.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return {"logits": z, "probs": e / e.sum(axis=-1, keepdims=True),
            "unit": z / np.linalg.norm(z, axis=-1, keepdims=True), "act": np.maximum(z, 0)}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _numpy_loss(plan, values: dict[str, np.ndarray], per_term_targets: list[np.ndarray]) -> float:
    """The loss graph's value, written again in float64 numpy from the formulas."""
    total = 0.0
    for t, target in zip(plan.terms, per_term_targets):
        y = values[t.output]
        if t.start is not None:
            y = y[..., t.start:t.stop]
        target = np.asarray(target, np.float64)
        if t.kind in ("kl", "ce"):
            log_q = np.log(y + 1e-12) if t.probabilities else _log_softmax(y)
            part = -np.sum(target * log_q)
        elif t.kind == "mse":
            part = 0.5 * np.sum((y - target) ** 2)
        elif t.kind == "smse":
            s = np.asarray(t.scale).reshape([-1] + [1] * (y.ndim - 1 - t.axis))
            part = 0.5 * np.sum(((y - target) * s) ** 2)
        else:
            cos = np.sum(y * target, -1) / np.sqrt(np.sum(y * y, -1) * np.sum(target * target, -1))
            part = np.sum(1.0 - cos)
        total += t.weight * part
    return float(total)


def _graph_loss_and_grad(model: ir.Model, plan, feeds: dict, target: np.ndarray, wrt: str = "W"):
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    append_loss(copy, plan)
    graph = build_gradient_model(copy, LOSS, [wrt])
    sess = session(graph.model)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {**feeds, TARGET: target})))
    return float(out[graph.loss]), out[graph.gradients[wrt]]


def _finite_difference(f, w: np.ndarray, h: float = 1e-6) -> np.ndarray:
    w = w.astype(np.float64)
    grad = np.zeros_like(w)
    for idx in np.ndindex(w.shape):
        up, down = w.copy(), w.copy()
        up[idx] += h
        down[idx] -= h
        grad[idx] = (f(up) - f(down)) / (2 * h)
    return grad


def _per_term_targets(plan, outs, seed: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    per = []
    for t, y in zip(plan.terms, outs):
        if t.kind in ("kl", "ce"):
            p = rng.random(y.shape) + 0.1
            per.append((p / p.sum(axis=-1, keepdims=True)).astype(np.float32))
        else:
            per.append((y + 0.3 * rng.standard_normal(y.shape)).astype(np.float32))
    return per


def _pack(plan, per):
    return np.concatenate([p.reshape(len(p), -1) for p in per], axis=1) if plan.packed else per[0]


# --- parsing ---------------------------------------------------------------------------------------------------


def test_parse_forms():
    assert parse_loss(None) is None
    assert parse_loss("kl") == (LossTerm("kl"),)
    assert parse_term("scores@4:=kl") == LossTerm("kl", "scores", 4, None)
    assert parse_term("scores@:-2=smse:0.5") == LossTerm("smse", "scores", None, -2, 0.5)
    assert parse_term("emb=cosine:2") == LossTerm("cosine", "emb", weight=2.0)
    assert parse_term("a=b@0:3=mse") == LossTerm("mse", "a=b", 0, 3)  # the last '=' separates the kind
    assert str(parse_term("scores@4:=kl")) == "scores@4:=kl"
    assert parse_loss(["a=kl", "b=mse:0.1"]) == (LossTerm("kl", "a"), LossTerm("mse", "b", weight=0.1))


@pytest.mark.parametrize("text,match", [
    ("hinge", "kind must be one of"), ("out=hinge", "kind must be one of"), ("=kl", "no output name"),
    ("out=kl:0", "positive"), ("out=kl:x", "must be a number"), ("out@x=kl", "last-axis slice"),
    ("out@1:2:3=kl", "last-axis slice"), ("out@-:2=kl", "bad slice bound"), ("@1:=kl", "last-axis slice"),
])
def test_parse_rejects_with_one_line(text, match):
    with pytest.raises(UsageError, match=match) as err:
        parse_term(text)
    assert "\n" not in str(err.value)


def test_plain_kind_stands_alone_and_options_check_labels():
    with pytest.raises(UsageError, match="plain KIND"):
        parse_loss(["kl", "a=mse"])
    with pytest.raises(UsageError, match="needs labels"):
        bq_onnx.config.PosteriorConfig(loss="out=ce")
    with pytest.raises(UsageError, match="one --loss term"):
        bq_onnx.config.PosteriorConfig(loss=["a=mse", "b=mse"], labels=np.zeros(3))


# --- the default rule ---------------------------------------------------------------------------------------


def test_default_rule_on_each_kind_of_output():
    model = _heads()
    values = {k: v.astype(np.float32) for k, v in _values().items()}
    plan, outs = resolve(model, None, None, values)
    assert plan.terms[0].output == "logits" and plan.terms[0].kind == "kl"  # ids (int64) is skipped
    assert not plan.terms[0].probabilities and "linear" in plan.terms[0].why
    auto = {t.output: t for t in resolve(model, parse_loss(["probs=auto", "unit=auto", "act=auto"]), None,
                                          values)[0].terms}
    assert auto["probs"].kind == "kl" and auto["probs"].probabilities
    assert auto["unit"].kind == "cosine"
    assert auto["act"].kind == "smse"  # not a linear layer's output, not a distribution
    explicit = resolve(model, parse_loss("probs=kl"), None, values)[0].terms[0]
    assert explicit.probabilities  # an explicit kl on probabilities reads them with Log, not LogSoftmax


def test_an_integer_output_named_explicitly_is_a_usage_error():
    model = _heads()
    values = {k: v.astype(np.float32) for k, v in _values().items()}
    for spec, output in ((parse_loss("ids=kl"), None), (None, "ids"), (parse_loss("kl"), "ids")):
        with pytest.raises(UsageError, match="'ids' is int64, not float") as err:
            resolve(model, spec, output, values)
        assert "\n" not in str(err.value)


def test_channel_axis_is_the_smallest_non_batch_axis():
    assert channel_axis((4, 22, 2100)) == 1
    assert channel_axis((4, 2100, 22)) == 2
    assert channel_axis((4, 10)) == 1
    assert channel_axis((4, 8, 8)) == 2
    assert channel_axis((4, 1)) is None


# --- each kind's value and gradient -----------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["logits=kl", "probs=kl", "logits=ce", "logits=mse", "logits=smse",
                                  "logits=cosine", "logits@2:=kl", "logits@:3=smse:0.5",
                                  "logits@:4=kl,logits@4:=smse:0.25", "logits=mse:2,probs=kl:0.5,unit=cosine"])
def test_value_and_gradient_match_float64_numpy(spec):
    model = _heads()
    plan, outs = resolve(model, parse_loss(spec.split(",")), None,
                         {k: v.astype(np.float32) for k, v in _values().items()})
    per = _per_term_targets(plan, outs)
    value, grad = _graph_loss_and_grad(model, plan, {"x": X}, _pack(plan, per))
    expected = _numpy_loss(plan, _values(), per)
    assert value == pytest.approx(expected, rel=2e-5, abs=1e-5)
    numeric = _finite_difference(lambda w: _numpy_loss(plan, _values(w), per), W)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4 * np.abs(numeric).max())


def test_weights_sum_the_terms():
    model = _heads()
    values = {k: v.astype(np.float32) for k, v in _values().items()}
    both, outs = resolve(model, parse_loss(["logits=mse:2", "probs=kl:0.5"]), None, values)
    per = _per_term_targets(both, outs)
    total, grad = _graph_loss_and_grad(model, both, {"x": X}, _pack(both, per))
    parts = []
    for i, spec in enumerate(["logits=mse", "probs=kl"]):
        alone = resolve(model, parse_loss(spec), None, values)[0]
        parts.append(_graph_loss_and_grad(model, alone, {"x": X}, per[i]))
    assert total == pytest.approx(2 * parts[0][0] + 0.5 * parts[1][0], rel=1e-5)
    np.testing.assert_allclose(grad, 2 * parts[0][1] + 0.5 * parts[1][1], rtol=1e-4, atol=1e-6)


def _sliced(plan, values: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [values[t.output][..., t.start:t.stop] if t.start is not None else values[t.output] for t in plan.terms]


def test_divergence_is_zero_at_the_reference_and_matches_the_graph_fed_reference_targets():
    model = _heads()
    spec = parse_loss(["logits@:4=smse", "unit=cosine:3", "logits=mse:0.1"])
    plan, outs = resolve(model, spec, None, {k: v.astype(np.float32) for k, v in _values().items()})
    np.testing.assert_allclose(divergence(plan, outs, outs), 0.0, atol=1e-9)
    moved = _sliced(plan, {k: v.astype(np.float32) for k, v in _values(W * 1.1).items()})
    target = targets("reference", plan, moved, None, np.random.default_rng(0))
    value, _ = _graph_loss_and_grad(model, plan, {"x": X}, target)  # the model at W, the FP32 of W * 1.1
    assert value == pytest.approx(float(divergence(plan, moved, outs).sum()), rel=1e-4)


# --- a detector-like output: the scale-free MSE ------------------------------------------------------------

UNITS = np.array([300.0, 300.0, 50.0, 1.0, 0.02, 0.02], np.float32)  # pixels ... class scores


def _detector() -> ir.Model:
    w = (RNG.standard_normal((8, 300)) * 0.5).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["flat"]), helper.make_node("Reshape", ["flat", "shape"], ["raw"]),
         helper.make_node("Mul", ["raw", "units"], ["det"])],
        [V("x", TensorProto.FLOAT, ["b", 8])], [V("det", TensorProto.FLOAT, ["b", 6, 50])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array([-1, 6, 50], np.int64), "shape"),
         numpy_helper.from_array(UNITS.reshape(1, 6, 1), "units")])
    return ir.serde.deserialize_model(proto)


def test_detector_default_is_the_per_channel_scale_free_mse():
    model = _detector()
    x = RNG.standard_normal((12, 8)).astype(np.float32)
    det = run(ir.serde.serialize_model(model), {"x": x})[0]
    plan, outs = resolve(model, None, None, {"det": det})
    term = plan.terms[0]
    assert (term.kind, term.axis, term.dims) == ("smse", 1, (6, 50))
    spread = det.astype(np.float64).transpose(1, 0, 2).reshape(6, -1).std(axis=1)
    np.testing.assert_allclose(term.scale, 1.0 / spread, rtol=1e-6)
    # every channel weighs the same: a perturbation of one spread in any channel costs the same
    for c in range(6):
        moved = det.copy()
        moved[:, c] += spread[c]
        assert divergence(plan, [det], [moved]).mean() == pytest.approx(0.5 * 50, rel=1e-4)
    # the graph: 0.5 * sum(((y - t) / s_c)^2), with its gradient
    target = (det + 0.1 * UNITS.reshape(1, 6, 1) * RNG.standard_normal(det.shape)).astype(np.float32)
    value, grad = _graph_loss_and_grad(model, plan, {"x": x}, target)
    w64 = model.graph.initializers["W"].const_value.numpy().astype(np.float64)

    def numpy_loss(w):
        y = (x.astype(np.float64) @ w).reshape(-1, 6, 50) * UNITS.reshape(1, 6, 1)
        return 0.5 * np.sum(((y - target) / spread.reshape(1, 6, 1)) ** 2)

    assert value == pytest.approx(numpy_loss(w64), rel=1e-5)
    numeric = _finite_difference(numpy_loss, w64)
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=1e-3 * np.abs(numeric).max())


def test_smse_fisher_targets_carry_each_channels_spread():
    model = _detector()
    x = RNG.standard_normal((400, 8)).astype(np.float32)
    det = run(ir.serde.serialize_model(model), {"x": x})[0]
    plan, outs = resolve(model, None, None, {"det": det})
    drawn = targets("fisher-mc", plan, outs, None, np.random.default_rng(1))
    noise = (drawn - det).astype(np.float64).transpose(1, 0, 2).reshape(6, -1).std(axis=1)
    np.testing.assert_allclose(noise * np.asarray(plan.terms[0].scale), 1.0, rtol=0.05)


# --- through the pipeline ---------------------------------------------------------------------------------


def _ids_and_embedding() -> bytes:
    """A token-id output (int64, first) beside a float embedding (the useful one), two 512-weight layers."""
    rng = np.random.default_rng(7)
    w1 = (rng.standard_normal((16, 32)) * 0.3).astype(np.float32)
    w2 = (rng.standard_normal((32, 24)) * 0.3).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["a"]),
         helper.make_node("MatMul", ["a", "W2"], ["z"]), helper.make_node("Tanh", ["z"], ["embedding"]),
         helper.make_node("ArgMax", ["embedding"], ["ids"], axis=-1, keepdims=0)],
        [V("x", TensorProto.FLOAT, ["b", 16])],
        [V("ids", TensorProto.INT64, ["b"]), V("embedding", TensorProto.FLOAT, ["b", 24])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return proto.SerializeToString()


@pytest.mark.parametrize("method", ["laplace", "fisher-mc", "hutchinson", "kfac"])
def test_two_outputs_default_fits_the_float_output_without_output_name(method):
    import onnx

    proto = onnx.load_from_string(_ids_and_embedding())
    calib = {"x": np.random.default_rng(1).standard_normal((24, 16)).astype(np.float32)}
    result = bq_onnx.optimize(proto, calib=calib, bits=4, bits_payload=True, method=method)
    loss = result.report["posterior"]["loss"]
    assert [(t["output"], t["kind"]) for t in loss] == [("embedding", "smse")]
    assert loss[0]["channel_axis"] == 1
    curvature = [r["trace_curvature"] for r in result.report["posterior"]["layers"]]
    assert all(np.isfinite(curvature)) and min(curvature) > 0


def test_several_terms_through_estimators_tables_and_distillation(tmp_path):
    import onnx

    proto = onnx.load_from_string(_ids_and_embedding())
    calib = {"x": np.random.default_rng(2).standard_normal((20, 16)).astype(np.float32)}
    spec = ["embedding@:8=cosine", "embedding@8:=smse:0.5"]
    result = bq_onnx.optimize(proto, calib=calib, bits=3, bits_payload=True, loss=spec, tables="mc", distill_steps=2,
                              allowed_bits=(2, 3, 4))
    loss = result.report["posterior"]["loss"]
    assert [(t["kind"], t.get("last_axis_slice"), t["weight"]) for t in loss] == [("cosine", "0:8", 1.0),
                                                                                  ("smse", "8:24", 0.5)]
    d = result.report["distillation"]
    assert d["loss_after"] <= d["loss_before"] and [t["kind"] for t in d["loss"]] == ["cosine", "smse"]
    assert result.report["settings"]["posterior"]["loss"] == spec


def test_cli_prints_the_loss_and_refuses_an_integer_output(tmp_path, capsys):
    from bq_onnx.cli import main

    model = tmp_path / "two.onnx"
    model.write_bytes(_ids_and_embedding())
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(3).standard_normal((16, 16)).astype(np.float32))
    out = tmp_path / "two.bq.onnx"
    assert main(["optimize", str(model), "--calib", str(calib), "--bits", "4", "--bits-payload", "-o", str(out),
                 "--no-verify"]) == 0
    printed = capsys.readouterr().out
    assert "loss: embedding=smse (channel axis 1; no distribution" in printed
    code = main(["optimize", str(model), "--calib", str(calib), "--loss", "ids=kl", "-o", str(out), "--force"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "'ids' is int64, not float" in err
    code = main(["posterior", str(model), "--calib", str(calib), "--json", "-o", str(tmp_path / "p.npz")])
    assert code == 0
    assert json.loads(capsys.readouterr().out)["loss"][0]["output"] == "embedding"


def test_gradients_api_takes_a_loss_spec():
    import onnx

    proto = onnx.load_from_string(_ids_and_embedding())
    x = np.random.default_rng(4).standard_normal((6, 16)).astype(np.float32)
    w1 = onnx.numpy_helper.to_array(proto.graph.initializer[0]).astype(np.float64)
    w2 = onnx.numpy_helper.to_array(proto.graph.initializer[1]).astype(np.float64)
    a = np.tanh(x.astype(np.float64) @ w1)
    y = np.tanh(a @ w2)
    labels = (y + 0.2 * np.random.default_rng(5).standard_normal(y.shape)).astype(np.float32)
    grads = bq_onnx.gradients(proto, {"x": x}, loss="embedding=mse", labels=labels, wrt=["W2"])
    np.testing.assert_allclose(grads["W2"], a.T @ ((y - labels) * (1 - y**2)), rtol=1e-4, atol=1e-6)
    at_minimum = bq_onnx.gradients(proto, {"x": x}, loss="embedding=cosine", wrt=["W2"])
    assert np.abs(at_minimum["W2"]).max() < 1e-5  # the target is the model's own FP32 output
    with pytest.raises(UsageError, match="'ids' is int64"):
        bq_onnx.gradients(proto, {"x": x}, loss="ids=mse")


def test_scale_free_default_keeps_every_detector_channel_where_plain_mse_loses_the_small_units(tmp_path,
                                                                                                monkeypatch):
    """Box channels in pixels beside class scores near 0.02: plain mse spends the bits on the pixels and leaves
    the scores as noise (relative error ~1); the default's smse keeps every channel's error alike. The loss alone
    is measured: W2 feeds the output, and the head floor (tests/test_safe_defaults.py) and the guard would mask
    mse's choice. (The floor on output channels' curvature, ``driver.CHANNEL_FLOOR``, keeps plain mse from losing
    them outright: it is switched off for plain mse here, to show what the loss alone does.)"""
    import bq_onnx.pipeline
    from bq_onnx.estimators import driver

    monkeypatch.setattr(bq_onnx.pipeline, "head_floors", lambda *args, **kwargs: {})
    rng = np.random.default_rng(0)
    units = np.array([300, 300, 50, 1, 0.02, 0.02], np.float32).reshape(1, 6, 1)
    w1 = (rng.standard_normal((32, 64)) / np.sqrt(32)).astype(np.float32)
    w2 = (rng.standard_normal((64, 300)) / np.sqrt(64)).astype(np.float32)
    proto = make_model(
        [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["a"]),
         helper.make_node("MatMul", ["a", "W2"], ["f"]), helper.make_node("Reshape", ["f", "s"], ["r"]),
         helper.make_node("Mul", ["r", "u"], ["det"])],
        [V("x", TensorProto.FLOAT, ["b", 32])], [V("det", TensorProto.FLOAT, ["b", 6, 50])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2"),
         numpy_helper.from_array(np.array([-1, 6, 50], np.int64), "s"), numpy_helper.from_array(units, "u")])
    calib = {"x": rng.standard_normal((64, 32)).astype(np.float32)}
    test = rng.standard_normal((256, 32)).astype(np.float32)
    ref = run(proto, {"x": test})[0]
    errors = {}
    floor = driver.CHANNEL_FLOOR
    for name, loss in (("mse", "det=mse"), ("default", None), ("mse-floored", "det=mse")):
        monkeypatch.setattr(driver, "CHANNEL_FLOOR", 0.0 if name == "mse" else floor)
        # 0 bits allowed: plain mse drops the score blocks, which the 2-bit default floor would keep
        result = bq_onnx.optimize(proto, calib=calib, bits=2.5, bits_payload=True, loss=loss, allowed_bits=ALL_WIDTHS,
                                  no_guard=True)
        path = tmp_path / f"{name}.onnx"
        result.save(path)
        got = run(path, {"x": test})[0]
        errors[name] = np.sqrt(((got - ref) ** 2).mean(axis=(0, 2))) / ref.std(axis=(0, 2))
    assert errors["mse"][4:].min() > 0.7  # the class scores are lost
    assert errors["default"].max() < 0.5 and errors["default"].max() < 2 * errors["default"].min()
    assert errors["mse-floored"][4:].max() < 0.7 and errors["mse-floored"][4:].min() > errors["default"].max()
