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
