"""The one emitter: node names and the three ways of storing constants, which are part of every written model."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest

from bq_onnx.emitter import Emitter, FunctionEmitter, GradientEmitter, GraphEmitter, i64


def _digest(array: np.ndarray, length: int) -> str:
    return hashlib.sha1(repr((array.dtype.str, array.shape, array.tobytes())).encode()).hexdigest()[:length]


def test_nodes_are_named_by_label_or_op_type_and_counted():
    em = GraphEmitter("w.bq/")
    x = ir.Value(name="x")
    a = em.op("Relu", [x])
    b = em.op("Cast", [a], "rows", to=ir.DataType.FLOAT)
    c, d = em.ops("Split", [b], 2, axis=0)
    assert [a.name, b.name, c.name, d.name] == ["w.bq/Relu_1", "w.bq/rows_2", "w.bq/Split_3.0", "w.bq/Split_3.1"]
    assert [n.name for n in em.tape.nodes] == ["w.bq/Relu_1", "w.bq/rows_2", "w.bq/Split_3"]


def test_none_attributes_are_left_out():
    em = GradientEmitter("grad/")
    out = em.op("Shape", [ir.Value(name="x")], start=1, end=None)
    assert set(out.producer().attributes) == {"start"}


def test_gradient_constants_are_typed_own_initializers_deduplicated():
    em = GradientEmitter("grad/")
    one = em.const(np.array(1.0, np.float32))
    assert em.const(np.array(1.0, np.float32)) is one
    assert one.name == f"grad/const.{_digest(np.array(1.0, np.float32), 8)}"
    assert one.dtype == ir.DataType.FLOAT and one.shape == ir.Shape([])
    assert em.initializers == [one] and not em.tape.nodes


def test_graph_constants_are_untyped_and_shared_between_emitters():
    shared: dict = {}
    first, second = GraphEmitter("a.bq/", shared), GraphEmitter("b.bq/", shared)
    shape = first.const(i64(2, 3), "shape")
    assert second.const(i64(2, 3), "shape") is shape
    assert shape.name == f"bq.const.shape.{_digest(i64(2, 3), 10)}"
    assert shape.dtype is None and shape.shape is None  # no value_info is written for it
    assert list(shared.values()) == [shape] and not first.tape.initializers


def test_graph_tensors_are_the_weights_own_and_reused_only_when_asked():
    em = GraphEmitter("w.bq/")
    table = np.arange(4, dtype=np.float16)
    a = em.tensor(table, "w.p0.bq_codebook", reuse=True)
    assert em.tensor(table.copy(), "w.p1.bq_codebook", reuse=True) is a
    b = em.tensor(table, "w.bq_scale")
    assert b is not a and [v.name for v in em.tape.initializers] == ["w.p0.bq_codebook", "w.bq_scale"]


def test_function_constants_are_constant_nodes_named_like_nodes():
    em = FunctionEmitter("")
    k = em.const(i64(4), "k")
    z = em.const(np.float32(0))
    assert (k.name, z.name) == ("k_1", "const_2")
    assert [n.op_type for n in em.tape.nodes] == ["Constant", "Constant"]


def test_the_base_does_not_guess_where_constants_go():
    with pytest.raises(NotImplementedError):
        Emitter("x/").const(i64(1))
