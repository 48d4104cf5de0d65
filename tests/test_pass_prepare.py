"""UpgradeOpsetPass, SetIrVersionPass, constant lifting and UniqueInitializerNamesPass (passes/prepare.py): the graph
the rewrite needs, numbers unchanged."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.errors import ModelError
from tests import passkit
from tests.conftest import make_model
from tests.written import run

RNG = np.random.default_rng(0)
W = RNG.standard_normal((6, 4)).astype(np.float32)
X = RNG.standard_normal((3, 6)).astype(np.float32)


def _model(opset: int, ir_version: int):
    """MatMul then ReduceMean with ``axes`` as an attribute (opset < 18) or as an input (opset >= 18)."""
    if opset < 18:
        reduce = helper.make_node("ReduceMean", ["h"], ["y"], axes=[1], keepdims=0)
        inits = [numpy_helper.from_array(W, "W")]
    else:
        reduce = helper.make_node("ReduceMean", ["h", "axes"], ["y"], keepdims=0)
        inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(np.array([1], np.int64), "axes")]
    return make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), reduce],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b"])], inits,
                      opset=opset, ir_version=ir_version)


def _reference() -> np.ndarray:
    return (X.astype(np.float64) @ W.astype(np.float64)).mean(axis=1)


def test_upgrade_converts_old_opsets_and_keeps_the_numbers():
    """Opset 13's ReduceMean ``axes`` attribute becomes the input opset 18+ needs; outputs stay the same."""
    model, modified = passkit.upgrade_opset(passkit.load(_model(13, 7)))
    assert modified and model.opset_imports[""] == 21
    reduce = next(n for n in model.graph if n.op_type == "ReduceMean")
    assert len(reduce.inputs) == 2 and "axes" not in reduce.attributes
    model, _ = passkit.set_ir_version(model)
    np.testing.assert_allclose(run(model, {"x": X})[0], _reference(), rtol=1e-6)


def test_upgrade_leaves_a_new_enough_model_alone():
    model, modified = passkit.upgrade_opset(passkit.load(_model(21, 10)))
    assert not modified and model.opset_imports[""] == 21
    assert [n.op_type for n in model.graph] == ["MatMul", "ReduceMean"]


def test_upgrade_skips_the_converter_where_no_op_changes(monkeypatch):
    """Opset 18 -> 21 of MatMul and ReduceMean (the same schemas at both): the opset number changes, the graph is
    the same one (no serialized round trip: linear time and one copy on a large graph); an op whose schema
    changed (Flatten, 21) still goes through onnx's converter."""
    import onnx.version_converter

    calls = []
    real = onnx.version_converter.convert_version
    monkeypatch.setattr(onnx.version_converter, "convert_version", lambda p, t: calls.append(t) or real(p, t))
    loaded = passkit.load(_model(18, 8))
    model, modified = passkit.upgrade_opset(loaded)
    assert modified and model.opset_imports[""] == 21 and not calls
    assert model.graph is loaded.graph
    model, _ = passkit.set_ir_version(model)
    np.testing.assert_allclose(run(model, {"x": X})[0], _reference(), rtol=1e-6)
    flat = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Flatten", ["h"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
                      [numpy_helper.from_array(W, "W")], opset=18, ir_version=8)
    model, modified = passkit.upgrade_opset(passkit.load(flat))
    assert modified and model.opset_imports[""] == 21 and calls == [21]


def test_upgrade_refuses_opsets_onnx_does_not_know():
    proto = _model(21, 10)
    proto.opset_import[0].version = 99
    with pytest.raises((ModelError, ir.passes.PreconditionError)):
        passkit.upgrade_opset(passkit.load(proto))


@pytest.mark.parametrize(("before", "after"), [(14, 10), (7, 10), (10, 10)])
def test_ir_version_is_what_the_opset_needs_and_onnxruntime_reads(before, after):
    """onnx 1.23 writes IR 14 that onnxruntime refuses; opset 21 needs at least IR 10."""
    model, modified = passkit.set_ir_version(passkit.load(_model(21, before)))
    assert model.ir_version == after and modified == (before != after)
    np.testing.assert_allclose(run(model, {"x": X})[0], _reference(), rtol=1e-6)


def test_subgraph_constants_become_that_subgraph_initializers_with_unique_names():
    """LiftConstantsToInitializersPass registers a branch's Constant in the branch; two branches' ``W`` become
    ``W`` and ``W.1`` (UniqueInitializerNamesPass), and both branches compute what they did."""
    w = {True: RNG.standard_normal((6, 4)).astype(np.float32), False: RNG.standard_normal((6, 4)).astype(np.float32)}

    def branch(taken: bool):
        const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w[taken], "W"))
        return helper.make_graph([const, helper.make_node("MatMul", ["x", "W"], [f"y{int(taken)}"])], "b", [],
                                 [helper.make_tensor_value_info(f"y{int(taken)}", TensorProto.FLOAT, ["b", 4])])

    proto = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=branch(True), else_branch=branch(False))],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 6]),
                        helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])], [])
    model = passkit.prepare(passkit.load(proto), passkit.context(min_size=16))
    subgraphs = list(model.graph.subgraphs())
    assert sorted(name for g in subgraphs for name in g.initializers) == ["W", "W.1"]
    assert not model.graph.initializers and not any(n.op_type == "Constant" for g in subgraphs for n in g)
    for taken in (True, False):
        got = run(model, {"x": X, "cond": np.array(taken)})[0]
        np.testing.assert_allclose(got, X @ w[taken], rtol=1e-5, atol=1e-5)
