"""The command line: reports, exit codes, and every kind of bad input answered on one line with no output."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.cli import main
from bq_onnx.model_io import load_model
from bq_onnx.samples import random_feeds
from tests.conftest import make_model, mixed_model
from tests.written import check_result, check_written, quantization_rtol


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(mixed_model(), str(path))
    return path


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, expected_code, fragment):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


def _no_output_left(folder, keep):
    leftovers = sorted(p.name for p in folder.iterdir() if p.name not in keep)
    assert leftovers == [], leftovers


def test_optimize_writes_verified_model_and_json_report(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, _ = _run(["optimize", model_file, "-o", out, "--bits", "3", "--bits-payload", "--min-size", "64",
                                "--json"], capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["output"]["path"] == str(out)
    check_written(out, model_file, random_feeds(load_model(out), seed=11), report=report, rtol=quantization_rtol(3),
                  ops=["DequantizeLinear"])
    assert report["totals"]["bits_per_weight"] == 3.0
    assert {r["name"] for r in report["layers"]} == {"C", "D", "E", "W1", "W2"}
    code, stdout, _ = _run(["inspect", out, "--json"], capsys)
    info = json.loads(stdout)
    assert code == 0 and info["quantized_by"] == "bq-onnx" and info["totals"]["bits_per_weight"] == 3.0
    assert sum(r["stored_bytes"] for r in info["layers"]) == report["totals"]["stored_bytes"]


def test_human_summary_and_inspect_table(model_file, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    code, stdout, _ = _run(["optimize", model_file, "-o", out, "--min-size", "64", "--format", "compact"], capsys)
    assert code == 0 and "total (5 layers)" in stdout and "verified in onnxruntime" in stdout
    code, stdout, _ = _run(["inspect", model_file], capsys)
    assert code == 0 and "not quantized by bq-onnx" in stdout


def test_default_output_name_and_force(model_file, capsys):
    default = model_file.with_name("model.bq.onnx")
    assert _run(["optimize", model_file, "-q", "--bits", "6"], capsys)[0] == 0 and default.exists()
    code, _, err = _run(["optimize", model_file, "-q", "--bits", "6"], capsys)
    _assert_one_line_error(code, err, 7, "pass --force")
    assert _run(["optimize", model_file, "-q", "--force", "--bits", "6"], capsys)[0] == 0


def test_same_input_gives_byte_identical_output(model_file, tmp_path, capsys):
    for name in ("a.onnx", "b.onnx"):
        assert _run(["optimize", model_file, "-o", tmp_path / name, "-q", "--quantizer", "lloyd", "--bits", "6"],
                    capsys)[0] == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_help_lists_exit_codes():
    commands = ["optimize", "inspect", "posterior", "verify", "bench", "validate"]
    for argv in (["--help"], *([c, "--help"] for c in commands)):
        proc = subprocess.run([sys.executable, "-m", "bq_onnx", *argv], capture_output=True, text=True)
        assert proc.returncode == 0 and "exit codes:" in proc.stdout and "verification failed" in proc.stdout


def test_usage_error_exit_code(model_file, capsys):
    code, _, err = _run(["optimize", model_file, "--bits", "9"], capsys)
    _assert_one_line_error(code, err, 2, "--bits must be a number in 0..8")


# --- bad input: one line, non-zero exit, nothing written, input untouched -------------------------------------


def _bad(tmp_path, capsys, model_path, expected_code, fragment, extra=()):
    before = {p.name: _sha(p) for p in tmp_path.iterdir() if p.is_file()}
    out = tmp_path / "out.onnx"
    code, _, err = _run(["optimize", model_path, "-o", out, *extra], capsys)
    _assert_one_line_error(code, err, expected_code, fragment)
    assert not out.exists()
    after = {p.name: _sha(p) for p in tmp_path.iterdir() if p.is_file()}
    assert after == before  # input untouched, no temporary files left


def test_not_an_onnx_file(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model\n" * 10)
    _bad(tmp_path, capsys, path, 3, "not a valid ONNX model")


@pytest.mark.parametrize("fraction", [0.02, 0.3, 0.5, 0.9, 0.999])
def test_truncated_protobuf(tmp_path, capsys, fraction):
    data = mixed_model().SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    _bad(tmp_path, capsys, path, 3, "cut.onnx")


def test_missing_file(tmp_path, capsys):
    _bad(tmp_path, capsys, tmp_path / "absent.onnx", 3, "no such file")


def _external_model(tmp_path, location: str) -> os.PathLike:
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    tensor = numpy_helper.from_array(w, "W")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(w.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
        [tensor],
    )
    path = tmp_path / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_missing_external_data(tmp_path, capsys):
    _bad(tmp_path, capsys, _external_model(tmp_path, "weights.bin"), 3, "external data file 'weights.bin' is missing")


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_model_folder(tmp_path, capsys, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 64 * 32 * 4)
    _bad(inner, capsys, _external_model(inner, location), 3, "escapes the model's folder")


def test_external_data_shorter_than_declared(tmp_path, capsys):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 100)
    _bad(tmp_path, capsys, _external_model(tmp_path, "weights.bin"), 3, "shorter than declared")


def test_valid_external_data_is_read(tmp_path, capsys):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    (tmp_path / "weights.bin").write_bytes(w.tobytes())
    path = _external_model(tmp_path, "weights.bin")
    code, _, err = _run(["optimize", path, "-o", tmp_path / "out.onnx", "-q", "--bits", "6"], capsys)
    assert code == 0, err


def test_no_quantizable_weights(tmp_path, capsys):
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [],
    )
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    _bad(tmp_path, capsys, path, 4, "no quantizable weights")


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weight(tmp_path, capsys, bad_value):
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    w[3, 4] = bad_value
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
        [numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    _bad(tmp_path, capsys, path, 5, "weight 'W' contains 1 NaN/Inf value(s)")


def test_output_equal_to_input(model_file, tmp_path, capsys):
    before = _sha(model_file)
    for target in (model_file, tmp_path / "." / "model.onnx"):
        code, _, err = _run(["optimize", model_file, "-o", target, "--force"], capsys)
        _assert_one_line_error(code, err, 7, "output path is the input model")
    assert _sha(model_file) == before


def test_declared_size_larger_than_data(tmp_path, capsys):
    model = mixed_model()
    init = model.graph.initializer[0]
    init.raw_data = init.raw_data[:-4]
    path = tmp_path / "short.onnx"
    path.write_bytes(model.SerializeToString())
    _bad(tmp_path, capsys, path, 3, "holds")


def test_external_data_model_through_opset_conversion_and_external_output(tmp_path, monkeypatch):
    """Lazy external weights survive the opset 18 -> 21 conversion; a big output gets external data beside it."""
    import bq_onnx
    from bq_onnx import model_io

    model = mixed_model(opset=18)
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(model, str(src / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "out" / "q.onnx"
    out.parent.mkdir()
    result = bq_onnx.optimize(src / "m.onnx", bits=4, min_size=64, bits_payload=True)
    report = result.save(out)
    check_result(result, out, report, ops=["DequantizeLinear"], float_rtol=quantization_rtol(4))
    assert [DATA_NAME.sub("<hash>", p.name) for p in sorted(out.parent.iterdir())] == ["q.onnx", "q.onnx.<hash>.data"]
    loaded = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in loaded.graph.initializer)


#: The hash part of an output's external data file name (``q.onnx.<16 hex>.data``).
DATA_NAME = re.compile(r"(?<=\.onnx\.)[0-9a-f]{16}(?=\.data$)")


def _external_locations(path) -> set[str]:
    proto = onnx.load(str(path), load_external_data=False)
    return {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}


@pytest.fixture
def big_output(tmp_path, monkeypatch):
    """An input folder and an empty output folder; outputs over 2 kB count as big (external data)."""
    monkeypatch.setenv("BQ_ONNX_EXTERNAL_DATA_THRESHOLD", "2000")
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(mixed_model(), str(src / "model.onnx"))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return src / "model.onnx", out_dir


def test_big_output_gets_external_data_under_a_safe_name_and_loads_back(big_output, capsys):
    import onnxruntime as ort

    src, out_dir = big_output
    before = _sha(src)
    out = out_dir / "q.onnx"
    code, _, err = _run(["optimize", src, "-o", out, "--min-size", "64", "-q", "--bits", "6"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out_dir.iterdir())
    assert [DATA_NAME.sub("<hash>", n) for n in names] == ["q.onnx", "q.onnx.<hash>.data"]  # no staging leftovers
    assert _external_locations(out) == {names[1]}  # relative, beside the model, no folder part
    onnx.checker.check_model(str(out))
    loaded = onnx.load(str(out))  # external data read back
    assert all(t.data_location != TensorProto.EXTERNAL for t in loaded.graph.initializer)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    ids = np.zeros((2, 5), dtype=np.int64)
    img = np.ones((2, 3, 6, 6), dtype=np.float32)
    assert all(np.isfinite(o).all() for o in session.run(None, {"ids": ids, "img": img}))
    assert _sha(src) == before and sorted(p.name for p in src.parent.iterdir()) == ["model.onnx"]


def test_failed_write_of_big_output_changes_nothing(big_output, capsys, monkeypatch):
    """A write that dies half-way (disk full) leaves the previous output and its data exactly as they were."""
    from bq_onnx import model_io

    src, out_dir = big_output
    out = out_dir / "q.onnx"
    assert _run(["optimize", src, "-o", out, "--min-size", "64", "-q", "--bits", "6"], capsys)[0] == 0
    before = {p.name: _sha(p) for p in out_dir.iterdir()}
    real_save = model_io.ir.save

    def dies_half_way(model, path, **kwargs):
        if not os.fspath(path).startswith(str(out_dir)):  # the guard's temporary sessions write elsewhere
            return real_save(model, path, **kwargs)
        data = os.path.join(os.path.dirname(path), kwargs["external_data"])
        with open(data, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_io.ir, "save", dies_half_way)
    code, _, err = _run(["optimize", src, "-o", out, "--min-size", "64", "--bits", "7", "--force", "-q"], capsys)
    monkeypatch.setattr(model_io.ir, "save", real_save)
    _assert_one_line_error(code, err, 7, "No space left on device")
    assert {p.name: _sha(p) for p in out_dir.iterdir()} == before


def test_failed_verification_removes_the_output_and_its_data(big_output, capsys, monkeypatch):
    from bq_onnx import verify

    src, out_dir = big_output
    monkeypatch.setattr(verify, "compare",
                        lambda ref, out, names, *rest: [verify.OutputCheck(names[0], 1.0, 1.0, False)])
    code, _, err = _run(["optimize", src, "-o", out_dir / "q.onnx", "--min-size", "64", "-q", "--bits", "6"],
                        capsys)
    _assert_one_line_error(code, err, 6, "differs from the numpy-dequantized reference")
    assert list(out_dir.iterdir()) == []


def test_segmented_reference_equals_the_whole_reference(tmp_path):
    """Big models are verified segment by segment; the segments compute exactly what the whole graph does."""
    import bq_onnx
    from bq_onnx import verify
    from bq_onnx.runtimes import get_runtime

    path = tmp_path / "model.onnx"
    onnx.save(mixed_model(), str(path))
    result = bq_onnx.optimize(path, bits=6, min_size=64)
    feeds = result.sample_feeds()
    rt = get_runtime("onnxruntime")
    whole = verify.reference_outputs(path, result.context, feeds, rt, tmp_path, segment_bytes=1 << 40)
    model = verify.run_passes(verify.load_model(path), verify.prepare_passes(result.context.config.weights))
    assert len(verify.segments(model, 1000)) > 3
    parts = verify.reference_outputs(path, result.context, feeds, rt, tmp_path, segment_bytes=1000)
    for a, b in zip(whole, parts, strict=True):
        np.testing.assert_array_equal(a, b)


def test_external_weights_are_read_without_staying_mapped(tmp_path):
    """Reading a weight of an external-data model leaves no mapping behind: resident memory holds one weight."""
    from bq_onnx.model_io import StreamedExternalTensor, load_model

    onnx.save(mixed_model(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data",
              size_threshold=0)
    model = load_model(tmp_path / "m.onnx")
    tensor = model.graph.initializers["W1"].const_value
    assert isinstance(tensor, StreamedExternalTensor)
    a, b = tensor.numpy(), tensor.numpy()
    assert tensor.raw is None and a is not b
    w1 = next(t for t in mixed_model().graph.initializer if t.name == "W1")
    np.testing.assert_array_equal(a, numpy_helper.to_array(w1))


def test_optimize_says_which_estimator_each_weight_used(tmp_path, capsys):
    """The summary names the estimators and, for the less used ones, their weights (issue 14, item 4)."""
    from bq_onnx.cli import _estimators_text

    layers = [{"name": n, "source": s} for n, s in (("a", "laplace"), ("b", "laplace"), ("c", "mean"))]
    assert _estimators_text(layers) == "laplace 2 weights; mean 1 weight (c)"
    out = tmp_path / "lenet.bq.onnx"
    code, stdout, _ = _run(["optimize", "models/lenet.onnx", "--calib", "models/lenet_calib.npz", "-o", out,
                            "--format", "compact", "--bits", "4", "--calib-samples", "32"], capsys)
    assert code == 0 and "estimators: laplace 5 weights" in stdout
