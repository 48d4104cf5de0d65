"""VJP rules of selecting and scanning ops: Max/Min (n-ary), ReduceMax/ReduceMin, GlobalMaxPool, CumSum.

Ties follow one rule everywhere, the one MaxPool's gradient follows (its ``Indices``, ArgMax): the whole gradient
goes to the *first* maximum (minimum). For n-ary Max/Min that is the operand of lowest index whose value equals
the output; for reductions the first element in row-major order over the reduced axes. Every other element gets
zero, so the gradient is exact for finite inputs without ties and a valid subgradient with them.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, const_array, register


@register("Max", "Min")
def max_min(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = max(x_0, ..., x_{n-1}) (numpy broadcasting): dx_i = g where x_i == y and no x_j (j < i) == y,
    summed over x_i's broadcast axes. One input: dx = g."""
    g, y = gy[0], node.outputs[0]
    inputs = list(node.inputs)
    if len(inputs) == 1:
        return [g]
    zero = cx.scalar(0.0, y)
    taken = None
    grads: list[ir.Value | None] = []
    last = max((i for i in range(len(inputs)) if cx.needs(i)), default=-1)
    for i, x in enumerate(inputs):
        if i > last:
            grads.append(None)
            continue
        equal = cx.op("Equal", [x, y])
        first = equal if taken is None else cx.op("And", [equal, cx.op("Not", [taken])])
        taken = equal if taken is None else cx.op("Or", [taken, equal])
        if cx.needs(i):
            grads.append(cx.unbroadcast(cx.op("Where", [first, g, zero]), y.shape, x))
        else:
            grads.append(None)
    return grads


def first_extremum(cx: Vjp, x: ir.Value, y_kept: ir.Value, axes: list[int]) -> ir.Value:
    """Boolean mask (x's shape) of the first element equal to ``y_kept`` in row-major order over ``axes``
    (sorted, non-negative; ``y_kept`` has length 1 along them).

    Contiguous reduced axes (GlobalMaxPool's) are merged into one; along a single axis the first equal element
    is the one at the smallest position (ReduceMin of the positions where x == y). Otherwise position p is
    first when x[p] == y and, for every reduced axis a (outer to inner), no slice along a before p's (with the
    same indices on the outer reduced axes) holds an equal element: an exclusive CumSum along a of "some equal
    element in this slice" (ReduceMax over the inner reduced axes) must be zero.
    """
    equal = cx.op("Equal", [x, y_kept])
    shape, merged_axes = None, axes
    if len(axes) > 1 and axes == list(range(axes[0], axes[-1] + 1)):  # contiguous: one merged axis
        shape = cx.shape(x)
        merged = cx.op("Concat", [cx.shape(x, 0, axes[0]), cx.ints_const(-1), cx.shape(x, axes[-1] + 1)], axis=0)
        equal = cx.op("Reshape", [equal, merged])
        merged_axes, axes = axes, [axes[0]]
    if len(axes) == 1:  # the smallest position along the axis among the equal elements
        axis, rank = axes[0], cx.rank(x) - len(merged_axes) + 1
        n = cx.op("Reshape", [cx.dim(equal, axis), cx.em.const(np.zeros(0, np.int64))])
        positions = cx.op("Range", [cx.em.const(np.array(0, np.int64)), n, cx.em.const(np.array(1, np.int64))])
        positions = cx.op("Reshape", [positions, cx.ints_const(-1, *([1] * (rank - axis - 1)))])
        candidates = cx.op("Where", [equal, positions, n])
        first = cx.op("ReduceMin", [candidates, cx.ints_const(axis)], keepdims=1)
        mask = cx.op("Equal", [positions, first])
        return mask if shape is None else cx.op("Reshape", [mask, shape])
    flag = cx.op("Cast", [equal], to=ir.DataType.FLOAT)
    zero = cx.scalar(0.0, flag)
    mask = equal
    for m, axis in enumerate(axes):
        inner = axes[m + 1 :]
        slices = cx.op("ReduceMax", [flag, cx.ints_const(*inner)], keepdims=1) if inner else flag
        before = cx.op("CumSum", [slices, cx.ints_const(axis)], exclusive=1)
        mask = cx.op("And", [mask, cx.op("Equal", [before, zero])])
    return mask if shape is None else cx.op("Reshape", [mask, shape])


def _route(cx: Vjp, x: ir.Value, y: ir.Value, g: ir.Value, axes: list[int], keepdims: bool) -> ir.Value:
    """dx = g at the first extremum of each reduced slice, 0 elsewhere."""
    if not keepdims:
        axes_value = cx.ints_const(*axes)
        y = cx.op("Unsqueeze", [y, axes_value])
        g = cx.op("Unsqueeze", [g, axes_value])
    first = first_extremum(cx, x, y, axes)
    return cx.op("Where", [first, g, cx.scalar(0.0, x)])


@register("ReduceMax", "ReduceMin")
def reduce_max_min(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = max of x over ``axes``: dx = g at the first maximum (row-major over the reduced axes) of each slice.

    The axes must be constant (or absent: all axes); ``noop_with_empty_axes`` with empty axes is the identity.
    """
    x = node.inputs[0]
    axes_in = cx.input(1)
    rank = cx.rank(x)
    noop = int(cx.attr("noop_with_empty_axes", 0))
    if axes_in is None:
        axes = None
    else:
        value = const_array(axes_in)
        if value is None:
            raise RuleUnavailable(f"{node.op_type} axes computed at run time")
        axes = [int(a) for a in value.reshape(-1)]
    if not axes:
        if noop:
            return [gy[0], None]
        axes = list(range(rank))
    axes = sorted({a + rank if a < 0 else a for a in axes})
    keepdims = bool(int(cx.attr("keepdims", 1)))
    return [_route(cx, x, node.outputs[0], gy[0], axes, keepdims), None]


@register("GlobalMaxPool")
def global_max_pool(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y[n, c] = max over the spatial axes: dx = g at the first maximum (row-major) of each channel."""
    x = node.inputs[0]
    rank = cx.rank(x)
    return [_route(cx, x, node.outputs[0], gy[0], list(range(2, rank)), True)]


@register("CumSum")
def cumsum(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y_i = sum_{j <= i} x_j (``exclusive``: j < i; ``reverse``: from the end): dx = the same cumulative sum of
    g in the other direction (dx_j = sum_{i >= j} g_i), with the same ``exclusive``."""
    exclusive = int(cx.attr("exclusive", 0))
    reverse = int(cx.attr("reverse", 0))
    return [cx.op("CumSum", [gy[0], node.inputs[1]], exclusive=exclusive, reverse=1 - reverse), None]


@register("GatherElements")
def gather_elements(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y[..., i, ...] = data[..., index[..., i, ...], ...] along ``axis``: d data = ScatterElements-add of g at
    the indices (repeats accumulate; negative indices wrapped first)."""
    data, indices = node.inputs
    if not cx.needs(0):
        return [None, None]
    axis = int(cx.attr("axis", 0))
    idx = cx.op("Cast", [indices], to=ir.DataType.INT64)
    negative = cx.op("Less", [idx, cx.ints_const(0)])
    idx = cx.op("Where", [negative, cx.op("Add", [idx, cx.dim(data, axis)]), idx])
    return [cx.op("ScatterElements", [cx.zeros_like(data), idx, gy[0]], axis=axis, reduction="add"), None]
