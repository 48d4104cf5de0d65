"""Calibration parts that do not stack are kept one per run (``bq_onnx.runs``): a fixed-batch recognizer fed text
lines of different widths whose file declares its output with the wrong rank (ddddocr's ``[1, seqlen]`` for a
``[T, 1, C]`` CTC head), and a sequence model fed whole sequences of different lengths beside a fixed state
(silero-vad's sequence export)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.calibration import load_calibration
from bq_onnx.runs import Runs, per_run, sample_axis, samples_first
from tests.conftest import assert_written, make_model

RNG = np.random.default_rng(7)


def ctc_model() -> ir.Model:
    """``x [1, W, 8]`` (fixed batch 1) -> MatMul, Tanh, MatMul -> ``[W, 1, 12]`` logits, declared ``[1, seqlen]``."""
    w1 = (RNG.standard_normal((8, 32)) * 0.4).astype(np.float32)
    w2 = (RNG.standard_normal((32, 12)) * 0.4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("MatMul", ["t", "W2"], ["z"]),
             helper.make_node("Transpose", ["z"], ["logits"], perm=[1, 0, 2])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "W", 8])],
                       [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "seqlen"])],
                       [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    return ir.serde.deserialize_model(proto)


def sequence_model() -> ir.Model:
    """``x [T, 8]`` (no batch axis) and a state ``h [1, 1, 16]``: ``y = tanh(x @ W + mean(h)) @ V`` ``[T, 4]``."""
    w = (RNG.standard_normal((8, 16)) * 0.4).astype(np.float32)
    v = (RNG.standard_normal((16, 4)) * 0.4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("ReduceMean", ["h"], ["m"], keepdims=0),
             helper.make_node("Add", ["a", "m"], ["b"]), helper.make_node("Tanh", ["b"], ["t"]),
             helper.make_node("MatMul", ["t", "V"], ["y"])]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 8]),
                               helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 4])],
                       [numpy_helper.from_array(w, "W"), numpy_helper.from_array(v, "V")])
    return ir.serde.deserialize_model(proto)


def _lines(widths: list[int]) -> list[dict[str, np.ndarray]]:
    return [{"x": RNG.standard_normal((1, w, 8)).astype(np.float32)} for w in widths]


def test_parts_of_different_widths_are_kept_one_per_run(tmp_path):
    parts = _lines([3, 5, 7, 4])
    calib = load_calibration(iter(parts), ctc_model())
    assert calib.per_run and calib.num_samples == 4 and calib.fixed_batch == 1
    assert isinstance(calib.arrays["x"], Runs)
    assert [b["x"].shape for b in calib.batches(8)] == [(1, 3, 8), (1, 5, 8), (1, 7, 8), (1, 4, 8)]
    assert calib.run_shapes() == {"x": (1, None, 8)}
    first = calib.take(2)
    assert first.per_run and first.num_samples == 2
    again = load_calibration(first, ctc_model())  # a loaded Calibration passes through, still per run
    np.testing.assert_array_equal(again.feeds(slice(1, 2))["x"], parts[1]["x"])
    stacked = load_calibration(iter(_lines([5, 5])), ctc_model())  # parts that stack still stack
    assert not stacked.per_run and stacked.arrays["x"].shape == (2, 5, 8)
    for i, part in enumerate(parts):  # a folder of per-sample .npz files, without the sample axis
        np.savez(tmp_path / f"{i:02d}.npz", x=part["x"][0])
    folder = load_calibration(tmp_path, ctc_model())
    assert folder.per_run and [b["x"].shape[1] for b in folder.batches(1)] == [3, 5, 7, 4]


def test_outputs_whose_first_axis_is_not_the_samples_are_kept_per_run():
    same = [np.zeros((2, 3)), np.zeros((1, 3))]
    assert isinstance(per_run(same, [2, 1]), np.ndarray)
    kept = per_run([np.zeros((5, 1, 3)), np.zeros((7, 1, 3))], [1, 1])
    assert isinstance(kept, Runs) and kept[slice(1, 2)].shape == (7, 1, 3) and kept.stacked().shape == (12, 1, 3)


@pytest.mark.parametrize("method", ["fisher-mc", "laplace", "hutchinson"])
def test_a_ctc_head_declared_with_the_wrong_rank_calibrates_on_lines_of_different_widths(tmp_path, method):
    result = bq_onnx.optimize(ctc_model(), calib=_lines([3, 5, 7, 4, 6, 9, 2, 8]), bits=4, bits_payload=True,
                              format="compact", method=method)
    assert {w.name for w in result.context.weights} == {"W1", "W2"}
    assert result.report["posterior"]["samples"] + result.report["guard"]["samples"] == 8
    assert {result.context.posterior.weights[n].source for n in ("W1", "W2")} == {method}
    result.save(tmp_path / "ctc.onnx")
    assert_written(result, tmp_path / "ctc.onnx")


def test_whole_sequences_beside_a_fixed_state_run_one_per_run(tmp_path):
    h = np.zeros((1, 1, 16), np.float32)
    parts = [{"x": RNG.standard_normal((t, 8)).astype(np.float32), "h": h} for t in (6, 6, 9, 4, 6, 7)]
    calib = load_calibration(iter(parts), sequence_model())
    assert calib.per_run and calib.num_samples == 6  # [T, 8] beside [1, 1, 128]: counts 38 and 6 disagree
    result = bq_onnx.optimize(sequence_model(), calib=parts, bits=4, bits_payload=True, format="compact")
    assert result.report["posterior"]["samples"] + result.report["guard"]["samples"] == 6
    result.save(tmp_path / "seq.onnx")
    assert_written(result, tmp_path / "seq.onnx")


def two_output_ctc_model() -> ir.Model:
    """:func:`ctc_model` plus ``pooled [1, 12]``, the logits averaged over the line (first axis: the sample)."""
    model = ir.to_proto(ctc_model())
    model.graph.node.append(helper.make_node("ReduceMean", ["z", "ax1"], ["pooled"], keepdims=0))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "ax1"))
    model.graph.output.append(helper.make_tensor_value_info("pooled", TensorProto.FLOAT, [1, 12]))
    return ir.serde.deserialize_model(model)


def test_several_loss_terms_on_outputs_kept_per_run_cut_each_runs_target_at_its_outputs_sizes():
    """Two runs of different widths: the loss graph reads each run's ``[1, L]`` target row back as the terms'
    own targets (checked against numpy), and optimize estimates a posterior with both terms."""
    import onnxruntime as ort

    from bq_onnx.autodiff.loss import LOSS, TARGET, LossPlan, Term, append_loss
    from bq_onnx.probabilities import softmax

    model = two_output_ctc_model()  # (each call draws new weights: one model, copied)
    forward = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    plan = LossPlan((Term("kl", "logits", dims=(1, 12)), Term("mse", "pooled", weight=0.5, dims=(12,))),
                    per_run=True)
    append_loss(model, plan)
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    for width in (3, 7):
        x = RNG.standard_normal((1, width, 8)).astype(np.float32)
        logits, pooled = forward.run(None, {"x": x})
        t_kl = softmax(RNG.standard_normal(logits.shape)).astype(np.float32)
        t_mse = RNG.standard_normal(pooled.shape).astype(np.float32)
        row = np.concatenate([t_kl.reshape(-1), t_mse.reshape(-1)])[None]
        got = session.run([LOSS], {"x": x, TARGET: row})[0]
        z = logits.astype(np.float64)
        log_q = z - z.max(-1, keepdims=True) - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
        want = -np.sum(t_kl * log_q) + 0.5 * 0.5 * np.sum(np.square(pooled - t_mse))
        np.testing.assert_allclose(got, want, rtol=1e-5)
    result = bq_onnx.optimize(two_output_ctc_model(), calib=_lines([3, 5, 7, 4, 6, 9, 2, 8]), bits=4,
                              bits_payload=True, format="compact", method="fisher-mc",
                              loss=["logits=kl", "pooled=mse"])
    assert [t["output"] for t in result.report["posterior"]["loss"]] == ["logits", "pooled"]
    assert {result.context.posterior.weights[n].source for n in ("W1", "W2")} == {"fisher-mc"}


def test_labels_of_an_output_kept_per_run_are_given_per_run_or_stacked():
    """Class labels for a ``[W, 1, 12]`` CTC head: one ``[W, 1]`` array per line, or the lines' rows stacked;
    both give the same posterior; a run whose labels do not fit its output is named."""
    from bq_onnx.errors import DataError

    lines = _lines([3, 5, 7, 4, 6, 9, 2, 8])
    labels = [RNG.integers(0, 12, size=(line["x"].shape[1], 1)) for line in lines]
    options = {"bits": 4, "bits_payload": True, "format": "compact", "method": "laplace", "loss": "ce",
               "no_guard": True}
    model = ctc_model()  # (each call draws new weights)
    per_run_labels = bq_onnx.optimize(model, calib=lines, labels=labels, **options).context.posterior
    stacked = bq_onnx.optimize(model, calib=lines, labels=np.concatenate(labels), **options).context.posterior
    for name in ("W1", "W2"):
        assert per_run_labels.weights[name].source == "laplace"
        np.testing.assert_array_equal(per_run_labels.weights[name].precision, stacked.weights[name].precision)
    unlabelled = bq_onnx.optimize(model, calib=lines, **{**options, "loss": "kl"}).context.posterior
    assert not np.array_equal(unlabelled.weights["W2"].precision, per_run_labels.weights["W2"].precision)
    bad = labels[:2] + [labels[2][:-1]] + labels[3:]
    with pytest.raises(DataError, match=r"run 2"):
        bq_onnx.optimize(model, calib=lines, labels=bad, **options)


# --- outputs whose samples are not on the first axis (a fed-back state) -------------------------------------------


def test_the_sample_axis_of_an_output_is_the_one_that_follows_the_runs_sizes():
    runs = [RNG.standard_normal((2, n, 4)) for n in (3, 2)]
    assert sample_axis(runs, [3, 2]) == 1
    stacked, axis = samples_first(runs, [3, 2])
    assert axis == 1 and stacked.shape == (5, 2, 4)
    np.testing.assert_array_equal(stacked, np.concatenate([np.moveaxis(r, 1, 0) for r in runs]))
    assert sample_axis([np.zeros((3, 2)), np.zeros((2, 2))], [3, 2]) == 0  # the first axis first
    assert sample_axis([np.zeros((2, 3, 3))], [3]) is None  # two axes of the run's size: not guessed
    assert sample_axis([np.zeros((5, 1, 3)), np.zeros((7, 1, 3))], [1, 1]) is None  # one sample says nothing
    kept, axis = samples_first([np.zeros((5, 1, 3)), np.zeros((7, 1, 3))], [1, 1])
    assert isinstance(kept, Runs) and axis == 0


def state_model(state_first: bool) -> ir.Model:
    """``x [N, 8]``, a state ``s [2, N, 16]`` -> ``y [N, 4] = tanh(x @ W + mean(s, 0)) @ V`` and the next state
    ``s_next = [tanh(x @ A), tanh(x @ B)]``, ``[2, N, 16]`` (silero-vad's layout), or ``[N, 2, 16]`` with
    ``state_first`` (the same values, samples first: the reference layout)."""
    rng = np.random.default_rng(11)
    ws = {k: (rng.standard_normal(shape) * 0.4).astype(np.float32)
          for k, shape in (("W", (8, 16)), ("V", (16, 4)), ("A", (8, 16)), ("B", (8, 16)))}
    axis = 1 if state_first else 0
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("ReduceMean", ["s", "ax0"], ["m"],
                                                                            keepdims=0),
             helper.make_node("Add", ["a", "m"], ["b"]), helper.make_node("Tanh", ["b"], ["t"]),
             helper.make_node("MatMul", ["t", "V"], ["y"]),
             helper.make_node("MatMul", ["x", "A"], ["pa"]), helper.make_node("Tanh", ["pa"], ["ta"]),
             helper.make_node("MatMul", ["x", "B"], ["pb"]), helper.make_node("Tanh", ["pb"], ["tb"]),
             helper.make_node("Unsqueeze", ["ta", "axs"], ["ua"]), helper.make_node("Unsqueeze", ["tb", "axs"], ["ub"]),
             helper.make_node("Concat", ["ua", "ub"], ["s_next"], axis=axis)]
    inits = [numpy_helper.from_array(v, k) for k, v in ws.items()]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "ax0"),
              numpy_helper.from_array(np.array([axis], np.int64), "axs")]
    state_shape = ["N", 2, 16] if state_first else [2, "N", 16]
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
                               helper.make_tensor_value_info("s", TensorProto.FLOAT, [2, "N", 16])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                        helper.make_tensor_value_info("s_next", TensorProto.FLOAT, state_shape)], inits)
    return ir.serde.deserialize_model(proto)


def test_a_loss_on_a_state_whose_samples_are_its_second_axis_equals_the_samples_first_layout():
    """``--loss s_next=mse`` on a ``[2, N, 16]`` state (calibrated in runs of 64 and 36 samples) used to be
    refused ("outputs whose first axis is not the samples, from runs of [36, 64] samples"); the samples are now
    found on axis 1 and moved first, so the posterior and the guard's measured losses equal those of the same
    model returning ``[N, 2, 16]``."""
    x = RNG.standard_normal((100, 8)).astype(np.float32)
    s = (RNG.standard_normal((2, 100, 16)) * 0.5).astype(np.float32)
    options = dict(bits=3, bits_payload=True, format="compact", loss=["y=mse", "s_next=mse:0.5"], holdout=0.25)
    got = bq_onnx.optimize(state_model(False), calib={"x": x, "s": s}, batch_axis={"s": 1}, **options)
    want = bq_onnx.optimize(state_model(True), calib={"x": x, "s": s}, batch_axis={"s": 1}, **options)
    terms = got.report["posterior"]["loss"]
    assert [t.get("sample_axis", 0) for t in terms] == [0, 1], terms
    assert {"W", "A", "B"} <= set(got.context.posterior.weights) == set(want.context.posterior.weights)
    for name in got.context.posterior.weights:
        np.testing.assert_allclose(got.context.posterior.weights[name].precision,
                                   want.context.posterior.weights[name].precision, rtol=1e-4)
    assert got.context.posterior.weights["A"].curvature.max() > 0  # the state term reaches A and B
    losses = [[c["measured_loss"] for c in r.report["guard"]["candidates"]] for r in (got, want)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
