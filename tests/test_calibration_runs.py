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
from bq_onnx.runs import Runs, per_run
from tests.conftest import make_model

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
    assert result.save(tmp_path / "ctc.onnx")["verification"]["passed"]


def test_whole_sequences_beside_a_fixed_state_run_one_per_run(tmp_path):
    h = np.zeros((1, 1, 16), np.float32)
    parts = [{"x": RNG.standard_normal((t, 8)).astype(np.float32), "h": h} for t in (6, 6, 9, 4, 6, 7)]
    calib = load_calibration(iter(parts), sequence_model())
    assert calib.per_run and calib.num_samples == 6  # [T, 8] beside [1, 1, 128]: counts 38 and 6 disagree
    result = bq_onnx.optimize(sequence_model(), calib=parts, bits=4, bits_payload=True, format="compact")
    assert result.report["posterior"]["samples"] + result.report["guard"]["samples"] == 6
    assert result.save(tmp_path / "seq.onnx")["verification"]["passed"]
