"""VJP rules of MatMul (batched, broadcast, 1-D operands) and Gemm (alpha, beta, transA, transB, broadcast C)."""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, Vjp, register


@register("MatMul")
def matmul(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = a @ b: da = g @ b^T, db = a^T @ g, summed over broadcast batch axes.

    1-D operands follow numpy: a vector ``a`` is a row ``[1, k]`` and a vector ``b`` a column ``[k, 1]``; the
    gradient is computed for those matrices and reshaped back.
    """
    a, b = node.inputs
    g = gy[0]
    ra, rb = cx.rank(a), cx.rank(b)
    a2 = cx.op("Unsqueeze", [a, cx.ints_const(0)]) if ra == 1 else a
    b2 = cx.op("Unsqueeze", [b, cx.ints_const(1)]) if rb == 1 else b
    if ra == 1 and rb == 1:
        g2 = cx.op("Reshape", [g, cx.ints_const(1, 1)])
    elif ra == 1:
        g2 = cx.op("Unsqueeze", [g, cx.ints_const(-2)])
    elif rb == 1:
        g2 = cx.op("Unsqueeze", [g, cx.ints_const(-1)])
    else:
        g2 = g
    a2_shape = _matrix_shape(a.shape, row=True)
    b2_shape = _matrix_shape(b.shape, row=False)
    batch = _batch_dims(node.outputs[0].shape, ra, rb)
    da = db = None
    if cx.needs(0):
        da = cx.op("MatMul", [g2, cx.transpose_last2(cx.own_copy(b2), max(rb, 2))])
        da_shape = None if batch is None or a2_shape is None else ir.Shape([*batch, *list(a2_shape)[-2:]])
        da = cx.unbroadcast(da, da_shape, a2, a2_shape)
        if ra == 1:
            da = cx.reshape_like(da, a)
    if cx.needs(1):
        db = cx.op("MatMul", [cx.transpose_last2(cx.own_copy(a2), max(ra, 2)), g2])
        db_shape = None if batch is None or b2_shape is None else ir.Shape([*batch, *list(b2_shape)[-2:]])
        db = cx.unbroadcast(db, db_shape, b2, b2_shape)
        if rb == 1:
            db = cx.reshape_like(db, b)
    return [da, db]


def _matrix_shape(shape: ir.Shape | None, *, row: bool) -> ir.Shape | None:
    """The operand's shape after a 1-D vector became a row (``a``) or a column (``b``)."""
    if shape is None:
        return None
    dims = list(shape)
    if len(dims) == 1:
        dims = [1, dims[0]] if row else [dims[0], 1]
    return ir.Shape(dims)


def _batch_dims(y_shape: ir.Shape | None, ra: int, rb: int) -> list | None:
    """The output's broadcast batch dims (the output drops the matrix axis of each 1-D operand)."""
    if y_shape is None:
        return None
    dims = list(y_shape)
    matrix_axes = (ra != 1) + (rb != 1)
    return dims[: len(dims) - matrix_axes]


@register("Gemm")
def gemm(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = alpha A' B' + beta C with A' = A^T if transA, B' = B^T if transB.

    dA' = alpha g B'^T and dB' = alpha A'^T g, transposed back when the operand was transposed; each is one Gemm.
    dC = beta g summed over C's broadcast axes.
    """
    a, b = node.inputs[0], node.inputs[1]
    c = cx.input(2)
    g = gy[0]
    alpha, beta = float(cx.attr("alpha", 1.0)), float(cx.attr("beta", 1.0))
    ta, tb = int(cx.attr("transA", 0)), int(cx.attr("transB", 0))
    da = db = dc = None
    if cx.needs(0):
        b = cx.own_copy(b)
        if ta:
            da = cx.op("Gemm", [b, g], alpha=alpha, transA=tb, transB=1)
        else:
            da = cx.op("Gemm", [g, b], alpha=alpha, transB=1 - tb)
    if cx.needs(1):
        a = cx.own_copy(a)
        if tb:
            db = cx.op("Gemm", [g, a], alpha=alpha, transA=1, transB=ta)
        else:
            db = cx.op("Gemm", [a, g], alpha=alpha, transA=1 - ta)
    if c is not None and cx.needs(2):
        scaled = g if beta == 1.0 else cx.op("Mul", [g, cx.scalar(beta, c)])
        dc = cx.unbroadcast(scaled, node.outputs[0].shape, c)
    return [da, db, dc]
