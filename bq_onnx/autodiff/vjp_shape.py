"""VJP rules of data-movement and reduction ops: reshapes, Transpose, Concat/Split, Slice, Gather, Expand, Reduce*.

Shape-valued inputs (Reshape's shape, Slice's starts, Gather's indices, ...) are integers and never receive a
gradient. Gradients that scatter (Slice, Gather) use ``ScatterElements``/``ScatterND`` with ``reduction="add"``
so repeated indices accumulate.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, Vjp, const_array, register


@register("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def reshape(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Pure re-indexing of the same elements: dx = reshape(g, shape(x))."""
    return [cx.reshape_like(gy[0], node.inputs[0])]


@register("Transpose")
def transpose(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = transpose(g, inverse(perm)); without ``perm`` the axes were reversed, which is its own inverse."""
    perm = cx.ints("perm")
    if perm is None:
        return [cx.op("Transpose", [gy[0]])]
    return [cx.op("Transpose", [gy[0]], perm=[int(i) for i in np.argsort(perm)])]


@register("Expand")
def expand(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = broadcast(x): dx = g summed over the broadcast axes."""
    return [cx.unbroadcast(gy[0], node.outputs[0].shape, node.inputs[0]), None]


@register("Concat")
def concat(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx_i = the slice of g that x_i filled: one Split by the inputs' lengths along ``axis``."""
    axis = int(cx.attr("axis"))
    inputs = list(node.inputs)
    sizes = cx.op("Concat", [cx.dim(x, axis) for x in inputs], axis=0)
    parts = cx.ops("Split", [gy[0], sizes], len(inputs), axis=axis)
    return [part if cx.needs(i) else None for i, part in enumerate(parts)]


@register("Split")
def split(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = concat of the outputs' gradients along ``axis`` (zeros for outputs that received none)."""
    axis = int(cx.attr("axis", 0))
    parts = [g if g is not None else cx.zeros_like(y) for g, y in zip(gy, node.outputs)]
    return [cx.op("Concat", parts, axis=axis), None]


def _index_map(cx: Vjp, x: ir.Value) -> tuple[ir.Value, ir.Value]:
    """(flat length of x as ``[n]``, x-shaped int64 tensor holding each element's flat position)."""
    size = cx.op("Size", [x])
    positions = cx.op("Range", [cx.em.const(np.array(0, np.int64)), size, cx.em.const(np.array(1, np.int64))])
    return cx.op("Reshape", [size, cx.ints_const(1)]), cx.reshape_like(positions, x)


@register("Slice")
def slice_(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g scattered back to the sliced positions, zero elsewhere.

    The positions come from slicing a map of x's flat element positions with the very same starts, ends, axes
    and steps, so negative, clamped and strided slices need no case analysis.
    """
    x = node.inputs[0]
    length, positions = _index_map(cx, x)
    picked = cx.op("Slice", [positions, *node.inputs[1:]])
    zeros = cx.op("Expand", [cx.scalar(0.0, x), length])
    flat = cx.op(
        "ScatterElements",
        [zeros, cx.op("Reshape", [picked, cx.ints_const(-1)]), cx.op("Reshape", [gy[0], cx.ints_const(-1)])],
        axis=0,
    )
    return [cx.reshape_like(flat, x)]


@register("Gather")
def gather(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = take(data, indices, axis): d data = scatter-add of g at the indices (repeats accumulate).

    The gathered axis is moved to the front so one ``ScatterND(reduction="add")`` does the work; negative
    indices are wrapped first.
    """
    data, indices = node.inputs
    if not cx.needs(0):
        return [None, None]
    r, q = cx.rank(data), cx.rank(indices)
    axis = int(cx.attr("axis", 0))
    axis = axis + r if axis < 0 else axis
    idx = cx.op("Cast", [indices], to=ir.DataType.INT64)
    negative = cx.op("Less", [idx, cx.em.const(np.array(0, np.int64))])
    length = cx.op("Reshape", [cx.dim(data, axis), cx.em.const(np.zeros(0, np.int64))])  # a scalar keeps idx's shape
    idx = cx.op("Where", [negative, cx.op("Add", [idx, length]), idx])
    idx = cx.op("Unsqueeze", [idx, cx.ints_const(-1)])
    g = gy[0]
    if axis == 0:
        zeros = cx.zeros_like(data)
        return [cx.op("ScatterND", [zeros, idx, g], reduction="add"), None]
    # g's axes: data[:axis], indices, data[axis+1:]  ->  indices, data[:axis], data[axis+1:]
    g_perm = [*range(axis, axis + q), *range(axis), *range(axis + q, r + q - 1)]
    data_perm = [axis, *range(axis), *range(axis + 1, r)]
    moved_shape = cx.op("Gather", [cx.shape(data), cx.ints_const(*data_perm)], axis=0)
    zeros = cx.op("Expand", [cx.scalar(0.0, data), moved_shape])
    moved = cx.op("ScatterND", [zeros, idx, cx.op("Transpose", [g], perm=g_perm)], reduction="add")
    return [cx.op("Transpose", [moved], perm=[int(i) for i in np.argsort(data_perm)]), None]


def _reduce_axes(cx: Vjp, node: ir.Node) -> tuple[ir.Value | None, bool]:
    """(axes input or None, whether the node is the identity because of ``noop_with_empty_axes``)."""
    axes = cx.input(1)
    noop = int(cx.attr("noop_with_empty_axes", 0))
    if axes is None:
        return None, bool(noop)
    value = const_array(axes)
    if value is not None and value.size == 0:
        return None, bool(noop)
    return axes, False


def _spread(cx: Vjp, node: ir.Node, g: ir.Value) -> ir.Value | None:
    """g of the reduced shape broadcast back over the reduced axes (``None`` when the reduction is a no-op)."""
    x = node.inputs[0]
    axes, identity = _reduce_axes(cx, node)
    if identity:
        return None
    if axes is not None and not int(cx.attr("keepdims", 1)):
        g = cx.op("Unsqueeze", [g, axes])  # negative axes mean the same here: the output rank is x's rank
    return cx.op("Expand", [g, cx.shape(x)])


@register("ReduceSum")
def reduce_sum(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g broadcast over the reduced axes."""
    spread = _spread(cx, node, gy[0])
    return [gy[0] if spread is None else spread, None]


@register("ReduceMean")
def reduce_mean(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g broadcast over the reduced axes, divided by the number of reduced elements (size(y) / size(x))."""
    spread = _spread(cx, node, gy[0])
    if spread is None:
        return [gy[0], None]
    x = node.inputs[0]
    return [cx.op("Mul", [spread, cx.size_ratio(node.outputs[0], x, x)]), None]
