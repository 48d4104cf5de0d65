"""Calibration sources and their validation: every bad input gets one line naming the input."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from bq_onnx.calibration import load_calibration
from bq_onnx.errors import DataError
from tests.conftest import MODELS


@pytest.fixture(scope="module")
def lenet() -> ir.Model:
    return ir.load(MODELS / "lenet.onnx")


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    with np.load(MODELS / "lenet_calib.npz") as f:
        return f["input"][:20]


class Reader:
    """Quacks like onnxruntime.quantization.CalibrationDataReader."""

    def __init__(self, data):
        self.batches = iter([{"input": data[i : i + 7]} for i in range(0, len(data), 7)])

    def get_next(self):
        return next(self.batches, None)


def test_every_source_gives_the_same_samples(tmp_path, lenet, images):
    np.savez(tmp_path / "calib.npz", input=images)
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "a.npz", input=images[:12])
    np.savez(folder / "b.npz", input=images[12:])
    npy = tmp_path / "npy"
    npy.mkdir()
    np.save(npy / "input.npy", images)
    sources = [tmp_path / "calib.npz", folder, npy, {"input": images},
               [{"input": images[:5]}, {"input": images[5:]}], Reader(images)]
    for source in sources:
        calib = load_calibration(source, lenet)
        assert calib.num_samples == 20
        np.testing.assert_array_equal(calib.arrays["input"], images)
    assert load_calibration({"input": images}, lenet, max_samples=3).num_samples == 3
    assert [b["input"].shape[0] for b in load_calibration({"input": images}, lenet).batches(8)] == [8, 8, 4]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda x: {"image": x}, "missing input 'input'"),
        (lambda x: {"input": x, "extra": x}, "unknown input 'extra'"),
        (lambda x: {"input": x.astype(np.float64)}, "input 'input' has dtype float64, the model expects float32"),
        (lambda x: {"input": x[:, 0]}, "input 'input' has rank 3"),
        (lambda x: {"input": x[:, :, :20]}, "(axis 2)"),
        (lambda x: {"input": x[:0]}, "input 'input' is empty"),
        (lambda x: {"input": np.where(x > 0.5, np.nan, x).astype(np.float32)}, "contains"),
    ],
)
def test_bad_calibration_names_the_input(lenet, images, make, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_calibration(make(images), lenet)


def test_bad_files(tmp_path, lenet):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read calibration data"):
        load_calibration(tmp_path / "junk.npz", lenet)
    with pytest.raises(DataError, match="not found"):
        load_calibration(tmp_path / "absent.npz", lenet)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .npz or .npy files"):
        load_calibration(empty, lenet)
    with pytest.raises(DataError, match="no calibration samples"):
        load_calibration([], lenet)


def _state_model() -> ir.Model:
    """A recurrent-style signature: a state whose batch is axis 1, a scalar rate, a batch-major feature."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["state"], ["s"], keepdims=0, axes=None)],
        "state",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))


def test_sample_axes_follow_the_graph():
    from bq_onnx.calibration import input_specs, sample_axes

    model = _state_model()
    assert sample_axes(input_specs(model)) == {"state": 1, "sr": None, "x": 0}
    assert sample_axes(input_specs(model), {"state": 2})["state"] == 2
    with pytest.raises(DataError, match="unknown input 'nope'"):
        sample_axes(input_specs(model), {"nope": 0})
    with pytest.raises(DataError, match="sample axis 5 is outside its rank 3"):
        sample_axes(input_specs(model), {"state": 5})


def test_samples_are_taken_along_each_inputs_axis():
    rng = np.random.default_rng(0)
    state = rng.normal(size=(2, 10, 4)).astype(np.float32)
    x = rng.normal(size=(10, 3)).astype(np.float32)
    sr = np.array(16000, dtype=np.int64)
    model = _state_model()
    calib = load_calibration({"state": state, "sr": sr, "x": x}, model)
    assert calib.num_samples == 10 and calib.sample_shape("state") == (2, 4) and calib.sample_shape("sr") == ()
    rows = np.array([7, 2, 2])
    feeds = calib.select(rows)
    np.testing.assert_array_equal(feeds["state"], state[:, rows])
    np.testing.assert_array_equal(feeds["x"], x[rows])
    assert feeds["sr"] is sr or np.array_equal(feeds["sr"], sr)
    assert [b["state"].shape for b in calib.batches(4)] == [(2, 4, 4), (2, 4, 4), (2, 2, 4)]
    first = calib.take(3)
    assert first.num_samples == 3 and first.arrays["state"].shape == (2, 3, 4)
    # batches from a reader stack along the sample axis; the shared scalar must agree across batches
    batches = [{"state": state[:, :6], "sr": sr, "x": x[:6]}, {"state": state[:, 6:], "sr": sr, "x": x[6:]}]
    again = load_calibration(iter(batches), model)
    np.testing.assert_array_equal(again.arrays["state"], state)
    assert again.num_samples == 10
    # a loaded Calibration passes through unchanged, axes kept
    assert load_calibration(again, model, max_samples=4).arrays["state"].shape == (2, 4, 4)
    bad = [batches[0], {**batches[1], "sr": np.array(8000, dtype=np.int64)}]
    with pytest.raises(DataError, match="input 'sr' has no sample axis, yet batches give different values"):
        load_calibration(iter(bad), model)
    with pytest.raises(DataError, match="different sample counts"):
        load_calibration({"state": state, "sr": sr, "x": x[:9]}, model)
    with pytest.raises(DataError, match=r"input 'state' has shape \[3, 10, 4\].*\(axis 0\)"):
        load_calibration({"state": np.zeros((3, 10, 4), np.float32), "sr": sr, "x": x}, model)


def test_a_negative_dimension_is_symbolic():
    """paddle2onnx writes an unknown batch as -1: it is the sample axis, and random inputs give it a size."""
    import onnx
    from onnx import TensorProto, helper

    from bq_onnx.calibration import input_specs, sample_axes
    from bq_onnx.samples import random_feeds

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "neg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 3, "h", "w"])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)]))
    assert sample_axes(input_specs(model)) == {"x": 0}
    images = np.zeros((5, 3, 8, 6), np.float32)
    assert load_calibration({"x": images}, model).num_samples == 5
    feeds = random_feeds(model, seed=0)
    assert feeds["x"].shape[1] == 3 and min(feeds["x"].shape) > 0
