"""Bad calibration data through the command line: ``optimize --calib`` and ``posterior --calib`` each answer
with one line naming the problem (and the input), exit 5, write nothing and leave the model untouched.

tests/test_calibration.py checks the same validation through the API; this file checks what a user sees.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import onnx
import pytest

from bq_onnx.cli import main
from tests.conftest import mixed_model

SAMPLES = 3


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    onnx.save(mixed_model(), str(folder / "model.onnx"))
    return folder


def _good(n: int = SAMPLES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"ids": rng.integers(0, 50, size=(n, 5)).astype(np.int64),
            "img": rng.standard_normal((n, 3, 6, 6)).astype(np.float32)}


def _with(**changes) -> dict[str, np.ndarray]:
    data = _good()
    for key, value in changes.items():
        if value is None:
            data.pop(key)
        else:
            data[key] = value
    return data


def _nan(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[1, 0, 2, 2] = np.nan
    return y


def _inf(x: np.ndarray) -> np.ndarray:
    y = x.copy()
    y[0, 1, 0, 0] = -np.inf
    return y


def _npz(arrays):
    def write(path):
        np.savez(path / "calib.npz", **arrays)
        return path / "calib.npz"

    return write


def _raw(content: bytes, name: str = "calib.npz"):
    def write(path):
        (path / name).write_bytes(content)
        return path / name

    return write


def _folder(files: dict[str, bytes | dict]):
    def write(path):
        folder = path / "calib"
        folder.mkdir()
        for name, content in files.items():
            if isinstance(content, dict):
                np.savez(folder / name, **content)
            else:
                (folder / name).write_bytes(content)
        return folder

    return write


CASES = {
    "wrong input name": (_npz(_with(img=None, image=_good()["img"])), ["missing input 'img'"]),
    "extra input": (_npz(_with(extra=np.zeros((SAMPLES, 2), np.float32))), ["unknown input 'extra'"]),
    "float64 instead of float32": (_npz(_with(img=_good()["img"].astype(np.float64))),
                                   ["input 'img' has dtype float64"]),
    "float ids": (_npz(_with(ids=_good()["ids"].astype(np.float32))), ["input 'ids' has dtype float32"]),
    "rank too low": (_npz(_with(img=_good()["img"][:, 0])), ["input 'img' has rank"]),
    "rank too high": (_npz(_with(img=_good()["img"][:, None])), ["input 'img' has rank"]),
    "wrong static dimension": (_npz(_with(img=np.zeros((SAMPLES, 4, 6, 6), np.float32))), ["'img'", "axis 1"]),
    "empty array": (_npz(_with(img=np.zeros((0, 3, 6, 6), np.float32), ids=np.zeros((0, 5), np.int64))),
                    ["is empty"]),
    "NaN": (_npz(_with(img=_nan(_good()["img"]))), ["input 'img' contains 1 NaN/Inf"]),
    "Inf": (_npz(_with(img=_inf(_good()["img"]))), ["input 'img' contains 1 NaN/Inf"]),
    "different sample counts": (_npz(_with(ids=_good(SAMPLES + 2)["ids"])), ["different sample counts"]),
    "empty file": (_raw(b""), ["cannot read calibration data"]),
    "not an npz": (_raw(b"PK\x03\x04 this is no zip archive"), ["cannot read calibration data"]),
    "missing file": (lambda path: path / "absent.npz", ["calibration data not found"]),
    "folder of junk": (_folder({"notes.txt": b"hello", "README": b"x"}), ["no .npz or .npy files"]),
    "folder with a broken npz": (_folder({"a.npz": _good(), "b.npz": b"garbage"}), ["b.npz", "cannot read"]),
    "folder mixing npy and npz": (_folder({"a.npz": _good(), "img.npy": b"\x93NUMPY"}), ["mixes .npy and .npz"]),
}


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("command", ["optimize", "posterior"])
@pytest.mark.parametrize("case", list(CASES))
def test_bad_calibration_is_one_line_exit_5_nothing_written(model_dir, tmp_path, capsys, command, case):
    make, fragments = CASES[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    calib = make(data_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    model = model_dir / "model.onnx"
    before = _sha(model)
    argv = [command, str(model), "--calib", str(calib), "-o", str(out_dir / "result.out"), "--min-size", "64"]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 5, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert list(out_dir.iterdir()) == []
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.onnx"]
    assert _sha(model) == before


@pytest.mark.parametrize("command", ["optimize", "posterior"])
def test_bad_labels_are_one_line_exit_5(model_dir, tmp_path, capsys, command):
    calib = _npz(_good())(tmp_path)
    labels = tmp_path / "labels.npy"
    np.save(labels, np.zeros(SAMPLES + 5, dtype=np.float32))  # class labels must be integers
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [command, str(model_dir / "model.onnx"), "--calib", str(calib), "--labels", str(labels), "--loss", "ce",
            "-o", str(out_dir / "result.out"), "--min-size", "64"]
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 5, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: labels"), err
    assert list(out_dir.iterdir()) == []


def test_calibration_for_a_model_with_external_data(tmp_path, capsys):
    """Calibration sessions are created from temporary copies: an input's external data must travel with them."""
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(mixed_model(), str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    calib = _npz(_good())(tmp_path)
    out = tmp_path / "q.onnx"
    code = main(["optimize", str(src / "m.onnx"), "--calib", str(calib), "-o", str(out), "--min-size", "64",
                 "--method", "activations", "-q", "--bits", "6"])
    _, err = capsys.readouterr()
    assert code == 0, err
    assert sorted(p.name for p in src.iterdir()) == ["m.data", "m.onnx"]
    # the output holds its own tensors: nothing refers back to the input's data file
    loaded = onnx.load(str(out), load_external_data=False)
    locations = {e.value for t in loaded.graph.initializer for e in t.external_data if e.key == "location"}
    assert all(re.fullmatch(r"q\.onnx\.[0-9a-f]{16}\.data", name) for name in locations), locations
