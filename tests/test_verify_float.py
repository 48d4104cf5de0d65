"""Verification against the original float model too, structural tensors never quantized, tolerances that grow
with the reduction length; and the smaller breaks of issue 22 (sparse initializers, custom ops, --plot without
matplotlib)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.cli import main


def _save(tmp_path, name, nodes, inputs, outputs, inits, opsets=(("", 21),)) -> str:
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    m.ir_version = 10
    path = tmp_path / name
    onnx.save(m, str(path))
    return str(path)


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    _, err = capsys.readouterr()
    return code, err


def resize_scales_also_weight(tmp_path) -> str:
    """The issue's model: ``S`` is a MatMul weight and, through Reshape and Mul, Resize's scales; ``W`` is an
    ordinary weight. Quantizing ``S`` would make the Resize return 7x7 instead of 8x8."""
    rng = np.random.default_rng(0)
    s = np.array([1, 1, 2, 2], np.float32).reshape(4, 1)
    return _save(
        tmp_path, "resize.onnx",
        [helper.make_node("MatMul", ["v", "S"], ["y2"]),
         helper.make_node("Reshape", ["S", "shp"], ["S1"]),
         helper.make_node("Mul", ["S1", "one"], ["S2"]),
         helper.make_node("Resize", ["img", "", "S2"], ["r"], mode="nearest"),
         helper.make_node("MatMul", ["v", "W"], ["y3"])],
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 1, 4, 4]),
         helper.make_tensor_value_info("v", TensorProto.FLOAT, [3, 4])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 1, 8, 8]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [3, 1]),
         helper.make_tensor_value_info("y3", TensorProto.FLOAT, [3, 64])],
        [numpy_helper.from_array(s, "S"), numpy_helper.from_array(np.array([4], np.int64), "shp"),
         numpy_helper.from_array(np.array(1.0, np.float32), "one"),
         numpy_helper.from_array(rng.standard_normal((4, 64)).astype(np.float32), "W")])


def test_a_tensor_reaching_resize_scales_is_never_quantized(tmp_path, capsys):
    import onnxruntime as ort

    from bq_onnx.inspect import inspect

    src = resize_scales_also_weight(tmp_path)
    import onnx_ir as ir

    from bq_onnx.reads import structural_sources

    status = {c["name"]: c for c in inspect(src, min_size=1)["candidates"]}
    assert not status["S"]["weight"] and status["W"]["weight"]
    model = ir.load(src)
    cone = structural_sources(list(model.graph))
    assert cone[id(model.graph.initializers["S"])] == "scales by Resize:?"  # through Reshape and Mul
    assert id(model.graph.initializers["W"]) not in cone
    out = tmp_path / "q.onnx"
    code, err = _run(["optimize", src, "-o", out, "--min-size", "1", "--bits", "3", "--bits-payload", "-q"],
                     capsys)
    assert code == 0, err
    stored = {t.name: t for t in onnx.load(str(out)).graph.initializer}
    np.testing.assert_array_equal(numpy_helper.to_array(stored["S"]).ravel(), [1, 1, 2, 2])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    r = session.run(["r"], {"img": np.ones((1, 1, 4, 4), np.float32), "v": np.ones((3, 4), np.float32)})[0]
    assert r.shape == (1, 1, 8, 8)


def test_a_rewrite_that_changes_the_computation_fails_against_the_float_model(tmp_path, capsys, monkeypatch):
    """The dequantized reference shares a broken rewrite; the float model does not: the check against it fails
    (here the float model's Resize output is made 8x8 while the written model's is 7x7), nothing is written."""
    from bq_onnx import verify

    src = resize_scales_also_weight(tmp_path)
    real = verify.reference_runs

    def float_model_differs(source, ctx, runs, rt, folder, segment_bytes=None, dequantized=True):
        outs = real(source, ctx, runs, rt, folder, segment_bytes, dequantized)
        if not dequantized:  # as if the written model had lost a row and a column of the Resize output
            outs = [[np.pad(o, ((0, 0), (0, 0), (0, 1), (0, 1))) if o.ndim == 4 else o for o in run]
                    for run in outs]
        return outs

    monkeypatch.setattr(verify, "reference_runs", float_model_differs)
    out = tmp_path / "q.onnx"
    code, err = _run(["optimize", src, "-o", out, "--min-size", "1", "--bits", "8", "--bits-payload", "-q"], capsys)
    assert code == 6, err
    assert len(err.strip().splitlines()) == 1 and "does not compute what the float model does" in err
    assert "float32[1, 1, 8, 8]" in err
    assert not out.exists()


def test_float_fidelity_floor_and_report(tmp_path, capsys):
    from bq_onnx import verify

    a = np.linspace(-1, 1, 50, dtype=np.float32)
    assert verify.float_fidelity([a], [a + 0.01], ["y"]) == []
    assert "cosine" in verify.float_fidelity([a], [-a], ["y"])[0]
    assert "non-finite" in verify.float_fidelity([a], [np.full_like(a, np.nan)], ["y"])[0]
    assert "int64" in verify.float_fidelity([a], [a.astype(np.int64)], ["y"])[0]
    src = resize_scales_also_weight(tmp_path)
    code = main(["optimize", src, "-o", str(tmp_path / "q.onnx"), "--min-size", "1", "--bits", "8", "--bits-payload",
                   "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    checks = {c["name"]: c for c in json.loads(out)["verification"]["outputs"]}
    assert checks["r"]["float_cosine"] == pytest.approx(1.0) and checks["y3"]["float_cosine"] > 0.99


def test_a_2_22_long_reduction_passes_verification(tmp_path, capsys):
    """A [2^22, 1] weight: its single output sums 4M products, whose rounding differs between MatMulNBits and
    MatMul by far more than a fixed 1e-4 (5e-3 measured); the tolerance scales with the reduction length."""
    rng = np.random.default_rng(0)
    src = _save(tmp_path, "tall.onnx", [helper.make_node("MatMul", ["x", "W"], ["y"])],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2**22])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])],
                [numpy_helper.from_array(rng.standard_normal((2**22, 1)).astype(np.float32), "W")])
    code, err = _run(["optimize", src, "-o", tmp_path / "q.onnx", "--allocator", "uniform", "--bits", "8", "-q"],
                     capsys)
    assert code == 0, err


def test_sparse_initializers_are_refused_in_one_line(tmp_path, capsys):
    rng = np.random.default_rng(0)
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.ones(4, np.float32), "B"),
                                       numpy_helper.from_array(np.array([0, 5, 9, 31], np.int64), "B_idx"), [32])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "B"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                          [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")],
                          sparse_initializer=[sparse])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    src = tmp_path / "sparse.onnx"
    onnx.save(m, str(src))
    code, err = _run(["optimize", src, "-o", tmp_path / "q.onnx", "-q"], capsys)
    assert code == 4 and len(err.strip().splitlines()) == 1 and "sparse initializer 'B'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sparse.onnx"]


def test_custom_ops_exit_4(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = _save(tmp_path, "custom.onnx",
                [helper.make_node("MatMul", ["x", "W"], ["h"]),
                 helper.make_node("MyOp", ["h"], ["y"], domain="my.dom")],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
                [numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "W")],
                opsets=(("", 21), ("my.dom", 1)))
    out = tmp_path / "q.onnx"
    code, err = _run(["optimize", src, "-o", out, "-q", "--bits", "8"], capsys)
    assert code == 4 and len(err.strip().splitlines()) == 1 and "my.dom:MyOp" in err, err
    assert str(out) in err and ".bq-tmp-" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


def test_plot_without_matplotlib_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    from tests.conftest import mixed_model

    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    code, err = _run(["optimize", src, "-o", tmp_path / "q.onnx", "--plot", tmp_path / "p.png", "--min-size", "64",
                      "-q"], capsys)
    assert code == 4 and "--plot needs matplotlib" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_plot_is_written_by_the_protocol(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from tests.conftest import mixed_model

    src = tmp_path / "m.onnx"
    onnx.save(mixed_model(), str(src))
    code, err = _run(["optimize", src, "-o", tmp_path / "q.onnx", "--plot", tmp_path / "p.png", "--min-size", "64",
                      "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "p.png", "q.onnx"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    code, err = _run(["optimize", src, "-o", tmp_path / "q2.onnx", "--plot", src, "--min-size", "64", "-q"], capsys)
    assert code == 7 and "input model" in err, err
