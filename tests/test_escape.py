"""Names are data (issue 22 item 4): a model whose tensor, node, input and output names hold a newline, a
clear-screen and a set-title escape prints them escaped everywhere people read (errors stay one line), and
intact in JSON."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.cli import main
from bq_onnx.escape import escape
from tests.conftest import make_model

CLEAR, TITLE = "\x1b[2J", "\x1b]0;title\x07"
X = f"x\nerror: forged{CLEAR}"
W = f"W{TITLE}\nerror: forged"
NODE = f"mm{CLEAR}\r\n"
Y = f"y{TITLE}{CLEAR}"
NAMES = (X, W, NODE, Y)


def test_escape_writes_control_characters_as_codes():
    assert escape("a\nb") == "a\\x0ab"
    assert escape(CLEAR) == "\\x1b[2J"
    assert escape(TITLE) == "\\x1b]0;title\\x07"
    assert escape("line\u2028sep\x85\x7f") == "line\\u2028sep\\x85\\x7f"
    assert escape("plain name/with spaces é 中") == "plain name/with spaces é 中"
    assert escape(3) == "3"


def hostile_model() -> onnx.ModelProto:
    w = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    return make_model(
        [helper.make_node("MatMul", [X, W], [Y], name=NODE)],
        [helper.make_tensor_value_info(X, TensorProto.FLOAT, ["b", 64])],
        [helper.make_tensor_value_info(Y, TensorProto.FLOAT, ["b", 32])],
        [numpy_helper.from_array(w, W)],
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    model = tmp / "hostile.onnx"
    onnx.save(hostile_model(), str(model))
    calib = tmp / "calib.npz"
    np.savez(calib, **{X: np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)})
    out = tmp / "hostile.bq.onnx"
    assert main(["optimize", str(model), "-o", str(out), "--calib", str(calib), "--json"]) == 0
    return {"model": model, "calib": calib, "out": out, "tmp": tmp}


def _safe(text: str) -> None:
    """Nothing a terminal would obey: no escape, bell, carriage return or forged line."""
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert "forged" not in "".join(line for line in text.splitlines() if line.startswith("error: forged"))
    assert not any(line.startswith("error: forged") for line in text.splitlines())


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_summary_shows_names_escaped(files, capsys):
    code, out, err = _run(capsys, ["optimize", str(files["model"]), "-o", str(files["tmp"] / "summary.onnx"),
                                   "--calib", str(files["calib"])])
    assert code == 0
    _safe(out + err)
    assert escape(W) in out  # the weight's row, escaped


def test_optimize_json_keeps_names_intact(files, capsys):
    code, out, _ = _run(capsys, ["optimize", str(files["model"]), "-o", str(files["tmp"] / "json.onnx"), "--json"])
    assert code == 0
    report = json.loads(out)
    assert [layer["name"] for layer in report["layers"]] == [W]
    assert "\x1b" not in out  # JSON escapes control characters itself


def test_inspect_float_and_output_show_names_escaped(files, capsys):
    for path in (files["model"], files["out"]):
        code, out, err = _run(capsys, ["inspect", str(path)])
        assert code == 0
        _safe(out + err)
        assert escape(W) in out
        code, out, _ = _run(capsys, ["inspect", str(path), "--json"])
        assert json.loads(out)["layers"][0]["name"] == W


def test_inspect_lists_readers_escaped(files, capsys):
    _, out, _ = _run(capsys, ["inspect", str(files["model"])])
    assert escape(f"MatMul:{NODE}") in out
    _, out, _ = _run(capsys, ["inspect", str(files["model"]), "--json"])
    assert json.loads(out)["candidates"][0]["read_by"] == [f"MatMul:{NODE}"]


def test_verify_shows_output_names_escaped(files, capsys):
    argv = ["verify", str(files["model"]), str(files["out"]), "--calib", str(files["calib"]), "--runtime",
            "onnxruntime"]
    code, out, err = _run(capsys, argv)
    assert code in (0, 6)  # 6: a random 4-bit model may miss the default agreement; the table prints either way
    assert err.count("\n") == (code == 6)
    _safe(out + err)
    assert escape(Y) in out
    code, out, _ = _run(capsys, [*argv, "--json"])
    assert json.loads(out)["runtimes"][0]["outputs"][0]["output"] == Y


def test_bench_shows_names_escaped_and_json_stays_valid(files, capsys):
    argv = ["bench", str(files["model"]), str(files["out"]), "--iterations", "2", "--runtime", "onnxruntime"]
    code, out, err = _run(capsys, argv)
    assert code == 0
    _safe(out + err)
    code, out, _ = _run(capsys, [*argv, "--json"])
    report = json.loads(out)
    assert all(r["status"] == "ok" for r in report["results"])


def test_an_error_naming_a_hostile_tensor_stays_one_line(files, capsys):
    """``load_model`` names the tensor whose data does not match its shape: one escaped line, exit 3."""
    proto = hostile_model()
    proto.graph.initializer[0].dims[0] = 65  # declares more than it holds
    bad = files["tmp"] / "bad.onnx"
    onnx.save(proto, str(bad))
    for argv in (["optimize", str(bad), "-o", str(files["tmp"] / "never.onnx")], ["inspect", str(bad)],
                 ["verify", str(bad), str(files["out"]), "--calib", str(files["calib"])]):
        code, out, err = _run(capsys, argv)
        assert code == 3, argv
        assert err.count("\n") == 1 and err.startswith("error: "), err
        _safe(err)
        assert escape(W) in err
    assert not (files["tmp"] / "never.onnx").exists()


def test_a_runtime_error_naming_a_hostile_output_stays_one_line(files, capsys):
    """Calibration data that misses the hostile input: the message names it, on one line."""
    other = files["tmp"] / "other.npz"
    np.savez(other, unrelated=np.zeros((2, 64), np.float32))
    code, _, err = _run(capsys, ["optimize", str(files["model"]), "-o", str(files["tmp"] / "never2.onnx"),
                                 "--calib", str(other)])
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("error: "), err
    _safe(err)
