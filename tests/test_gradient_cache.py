"""``--cache DIR``: a gradient graph is built once per model and taken from disk after; the cached graph gives the
same gradients, an entry that does not match (other weights, a damaged file) is rebuilt, never trusted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from bq_onnx.autodiff import cache as gradient_cache
from bq_onnx.autodiff import gradient
from bq_onnx.autodiff.gradient import build_gradient_model


def _model(scale: float = 1.0) -> ir.Model:
    rng = np.random.default_rng(0)
    w1 = (scale * rng.standard_normal((4, 3))).astype(np.float32)
    w2 = rng.standard_normal((3, 2)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Tanh", ["h"], ["a"]),
         helper.make_node("MatMul", ["a", "w2"], ["y"]), helper.make_node("Mul", ["y", "y"], ["sq"]),
         helper.make_node("ReduceSum", ["sq"], ["loss"], keepdims=0)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 4])],
        [helper.make_tensor_value_info("loss", TensorProto.FLOAT, [])],
        [helper.make_tensor("w1", TensorProto.FLOAT, w1.shape, w1.ravel()),
         helper.make_tensor("w2", TensorProto.FLOAT, w2.shape, w2.ravel())])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _gradients(graph: gradient.GradientGraph) -> dict[str, np.ndarray]:
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    session = ort.InferenceSession(ir.to_proto(graph.model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {"x": x})))


def _count_builds(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = gradient._backward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(gradient, "_backward", counting)
    return calls


def test_built_once_then_read_back_with_the_same_gradients(tmp_path: Path, monkeypatch) -> None:
    calls = _count_builds(monkeypatch)
    plain = build_gradient_model(_model(), "loss", ["w1", "w2"])
    first = build_gradient_model(_model(), "loss", ["w1", "w2"], cache=tmp_path)
    second = build_gradient_model(_model(), "loss", ["w1", "w2"], cache=tmp_path)
    assert len(calls) == 2  # the plain build and the first cached one; the second came from disk
    files = list(tmp_path.glob("gradient-*.onnx"))
    assert len(files) == 1 and files[0].stat().st_size < 4096  # the weights are not stored in the entry
    assert second.gradients == plain.gradients and second.loss == plain.loss
    want = _gradients(plain)
    for got in (_gradients(first), _gradients(second)):
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_weights_in_any_order_read_back(tmp_path: Path, monkeypatch) -> None:
    calls = _count_builds(monkeypatch)
    first = build_gradient_model(_model(), "loss", ["w2", "w1"], cache=tmp_path)
    second = build_gradient_model(_model(), "loss", ["w2", "w1"], cache=tmp_path)
    assert len(calls) == 1
    assert list(second.gradients) == list(first.gradients) == ["w2", "w1"]
    assert [v.name for v in second.model.graph.outputs] == [first.loss, *first.gradients.values()]


def test_other_weights_or_options_are_another_entry(tmp_path: Path, monkeypatch) -> None:
    calls = _count_builds(monkeypatch)
    build_gradient_model(_model(), "loss", ["w1", "w2"], cache=tmp_path)
    build_gradient_model(_model(scale=2.0), "loss", ["w1", "w2"], cache=tmp_path)  # other weight values
    build_gradient_model(_model(), "loss", ["w1"], cache=tmp_path)  # other wrt
    build_gradient_model(_model(), "loss", ["w1", "w2"], weights_as_inputs=True, cache=tmp_path)
    assert len(calls) == 4
    assert len(list(tmp_path.glob("gradient-*.onnx"))) == 4
    other = build_gradient_model(_model(scale=2.0), "loss", ["w1", "w2"], cache=tmp_path)
    assert len(calls) == 4
    want = _gradients(build_gradient_model(_model(scale=2.0), "loss", ["w1", "w2"]))
    got = _gradients(other)
    for name in want:  # the cached structure carries the given model's weights, not the first model's
        np.testing.assert_array_equal(got[name], want[name])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_damaged_entry_is_rebuilt(tmp_path: Path, monkeypatch, damage: str) -> None:
    calls = _count_builds(monkeypatch)
    build_gradient_model(_model(), "loss", ["w1", "w2"], cache=tmp_path)
    (entry,) = tmp_path.glob("gradient-*.onnx")
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        entry.write_bytes(b"\x00not a model" * 10)
    else:  # a well-formed model whose recorded key is another one
        proto = onnx.ModelProto.FromString(data)
        for p in proto.metadata_props:
            if p.key == gradient_cache.KEY:
                p.value = p.value.replace('"key": "', '"key": "0')
        entry.write_bytes(proto.SerializeToString())
    got = build_gradient_model(_model(), "loss", ["w1", "w2"], cache=tmp_path)
    assert len(calls) == 2  # rebuilt
    want = _gradients(build_gradient_model(_model(), "loss", ["w1", "w2"]))
    for name, value in _gradients(got).items():
        np.testing.assert_array_equal(value, want[name])
    assert gradient_cache._load(entry, gradient_cache.model_key(_model(), "loss", ["w1", "w2"], False),
                                _model(), gradient.GradientGraph) is not None  # and written back whole
    assert not list(tmp_path.glob("*.tmp"))


def test_optimize_with_cache_writes_the_same_bytes(tmp_path: Path) -> None:
    from bq_onnx.cli import main

    root = Path(__file__).resolve().parent.parent / "models"
    outs = []
    for i, extra in enumerate(([], ["--cache", str(tmp_path / "c")], ["--cache", str(tmp_path / "c")])):
        out = tmp_path / f"m{i}.onnx"
        assert main(["optimize", str(root / "lenet.onnx"), "--calib", str(root / "lenet_calib.npz"), "--bits", "6",
                     "--calib-samples", "64", "-o", str(out), "-q", *extra]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] == outs[2]
    assert list((tmp_path / "c").glob("gradient-*.onnx"))
