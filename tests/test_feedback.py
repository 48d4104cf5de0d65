"""State a model feeds back: found by name and shape, chained through in order, and what the guard measures
candidates on (a one-call loss misses how a state's error compounds over a stream)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.calibration import Calibration
from bq_onnx.feedback import chained_runs, feedback_pairs, follows
from bq_onnx.stages.guard import split

D_IN, D_STATE = 32, 64


@pytest.mark.parametrize("inp,out", [("state", "stateN"), ("h", "hn"), ("c", "cn"), ("h0", "hn"),
                                     ("state_in", "state_out"), ("cache.prev", "cache.next"),
                                     ("past.0.key", "present.0.key"), ("hidden", "hidden_new")])
def test_names_that_follow(inp, out):
    assert follows(inp, out)


@pytest.mark.parametrize("inp,out", [("x", "y"), ("input", "output"), ("state", "state"), ("image", "recon"),
                                     ("h", "logits"), ("state", "stateful_scores"), ("a_in", "b_out")])
def test_names_that_do_not(inp, out):
    assert not follows(inp, out)


def test_pairs_need_the_same_shape_and_float_type():
    feeds = {"x": np.zeros((1, 4), np.float32), "state": np.zeros((2, 1, 8), np.float32),
             "h": np.zeros((1, 3), np.float32)}
    outs = [np.zeros((1, 1), np.float32), np.zeros((2, 1, 8), np.float32), np.zeros((1, 4), np.float32),
            np.zeros((1, 3), np.int64)]
    assert feedback_pairs(feeds, ["y", "stateN", "hn", "hn"], outs) == [("state", 1)]


def _cell() -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """A recurrent cell: ``h = tanh(x W1 + state W2)``, outputs ``y = h W3`` and ``stateN = h``."""
    rng = np.random.default_rng(3)
    w = {"W1": rng.normal(0, 1 / np.sqrt(D_IN), (D_IN, D_STATE)),
         "W2": rng.normal(0, 0.9 / np.sqrt(D_STATE), (D_STATE, D_STATE)),
         "W3": rng.normal(0, 1 / np.sqrt(D_STATE), (D_STATE, 4))}
    w = {k: v.astype(np.float32) for k, v in w.items()}
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("MatMul", ["state", "W2"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("Tanh", ["s"], ["stateN"]),
             helper.make_node("MatMul", ["stateN", "W3"], ["y"])]
    graph = helper.make_graph(
        nodes, "cell",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D_IN]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", D_STATE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("stateN", TensorProto.FLOAT, ["N", D_STATE])],
        [numpy_helper.from_array(v, k) for k, v in w.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), w


class _Ort:
    def __init__(self, model: onnx.ModelProto | str) -> None:
        src = model if isinstance(model, str) else model.SerializeToString()
        self.s = ort.InferenceSession(src, providers=["CPUExecutionProvider"])

    def run(self, feeds):
        return self.s.run(None, feeds)


def _stream(w: dict[str, np.ndarray], n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` samples of a stream: each input and the FP32 state it arrives with."""
    x = np.random.default_rng(seed).normal(0, 1, (n, D_IN)).astype(np.float32)
    states, s = [], np.zeros(D_STATE, np.float32)
    for t in range(n):
        states.append(s)
        s = np.tanh(x[t] @ w["W1"] + s @ w["W2"]).astype(np.float32)
    return {"x": x, "state": np.stack(states)}


def test_chained_runs_feed_each_run_the_state_the_run_before_returned():
    model, w = _cell()
    steps = [{"x": np.random.default_rng(t).normal(0, 1, (1, D_IN)).astype(np.float32),
              "state": np.full((1, D_STATE), 0.3, np.float32)} for t in range(5)]
    out = chained_runs(_Ort(model), steps, [("state", 1)])
    s = steps[0]["state"].astype(np.float64)
    for t, step in enumerate(steps):  # float64 reference: only the first step reads its own state
        s = np.tanh(step["x"] @ w["W1"] + s @ w["W2"])
        np.testing.assert_allclose(out[t][1], s, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[t][0], s @ w["W3"], rtol=1e-5, atol=1e-5)


def test_the_guard_measures_candidates_chained_through_the_state(tmp_path):
    model, w = _cell()
    path = tmp_path / "cell.onnx"
    onnx.save(model, path)
    calib = _stream(w, 96)
    result = bq_onnx.optimize(str(path), calib=calib, bits=3, loss="mse", allowed_bits=(2, 3, 4, 8))
    g = result.report["guard"]
    assert g["chained"] == {"state": "stateN"}
    out = tmp_path / "cell.bq.onnx"
    result.save(str(out))
    # independently: the held-out samples in order, each fed the state the same model returned before
    _, held = split(Calibration(dict(calib), "<test>"), 0.25, 0)
    steps = list(held.batches(1))
    ref = np.concatenate([r[0] for r in chained_runs(_Ort(model), steps, [("state", 1)])])
    got = np.concatenate([r[0] for r in chained_runs(_Ort(str(out)), steps, [("state", 1)])])
    chained = float(np.mean(0.5 * np.sum((got.astype(np.float64) - ref) ** 2, axis=1)))
    one_call = np.concatenate([_Ort(str(out)).run(s)[0] for s in steps])
    fp32_one = np.concatenate([_Ort(model).run(s)[0] for s in steps])
    single = float(np.mean(0.5 * np.sum((one_call.astype(np.float64) - fp32_one) ** 2, axis=1)))
    assert g["measured_loss"] == pytest.approx(chained, rel=1e-4)
    assert abs(chained - single) > 1e-3 * chained  # the chain measures something a single call does not


def test_a_model_without_state_is_measured_one_call_at_a_time():
    from tests.conftest import MODELS

    calib = {"input": np.load(MODELS / "lenet_calib.npz")["input"][:64]}
    result = bq_onnx.optimize(MODELS / "lenet.onnx", calib=calib, bits=4)
    assert "chained" not in result.report["guard"]


def test_samples_that_are_whole_sequences_are_not_chained():
    """A sample kept per run (a sequence of its own length beside the state that starts it, as silero-vad's
    sequence export) carries its recurrence inside the call: the guard measures it one call at a time."""
    from bq_onnx.runs import Runs
    from bq_onnx.stages.guard import _held

    rng = np.random.default_rng(0)
    seqs = Runs([rng.normal(0, 1, (t, D_IN)).astype(np.float32) for t in (5, 7, 6)])
    starts = Runs([np.zeros((1, D_STATE), np.float32) for _ in range(3)])
    held = _held(Calibration({"x": seqs, "state": starts}, "<test>", fixed_batch=1), "held-out")
    assert held.data is None and list(held.steps()) == [] and len(held.runs) == 3
    rows = _held(Calibration(_stream(_cell()[1], 6), "<test>"), "held-out")
    assert [s["x"].shape for s in rows.steps()] == [(1, D_IN)] * 6


def test_the_summary_says_what_the_candidates_were_chained_through(tmp_path):
    import subprocess
    import sys

    model, w = _cell()
    onnx.save(model, tmp_path / "cell.onnx")
    np.savez(tmp_path / "stream.npz", **_stream(w, 64))
    proc = subprocess.run([sys.executable, "-m", "bq_onnx", "optimize", str(tmp_path / "cell.onnx"), "--calib",
                           str(tmp_path / "stream.npz"), "--bits", "4", "-o", str(tmp_path / "out.onnx")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    line = next(s for s in proc.stdout.splitlines() if s.startswith("guard: loss measured"))
    assert "held-out samples chained through the state fed back (stateN -> state)" in line


def test_a_state_the_samples_always_give_the_same_is_not_chained(tmp_path):
    """A model always called with one state (zeros: not streamed) is measured one call at a time."""
    model, w = _cell()
    path = tmp_path / "cell.onnx"
    onnx.save(model, path)
    calib = _stream(w, 64)
    calib["state"] = np.zeros_like(calib["state"])
    result = bq_onnx.optimize(str(path), calib=calib, bits=4, loss="mse")
    assert "chained" not in result.report["guard"]


def test_no_chain_measures_one_call_at_a_time(tmp_path):
    model, w = _cell()
    path = tmp_path / "cell.onnx"
    onnx.save(model, path)
    result = bq_onnx.optimize(str(path), calib=_stream(w, 64), bits=4, loss="mse", no_chain=True)
    assert "chained" not in result.report["guard"]
