"""VJP rules of the non-linear sum reductions: ReduceL1, ReduceL2, ReduceSumSquare, ReduceLogSum,
ReduceLogSumExp.

With s the output gradient (and y the output) given back their reduced axes (``keepdims=0`` undone), all are
elementwise in x: dx = s f'(x, y). ``noop_with_empty_axes`` with empty axes is refused (the runtimes disagree on
what the op then computes).
"""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, const_array, register


def _kept(cx: Vjp, node: ir.Node, value: ir.Value) -> ir.Value:
    """``value`` (reduced shape) with length-1 reduced axes, so it broadcasts against x."""
    axes = cx.input(1)
    if axes is not None:
        array = const_array(axes)
        if array is not None and array.size == 0:
            axes = None
    if axes is None and int(cx.attr("noop_with_empty_axes", 0)):
        raise RuleUnavailable(f"{node.op_type} with noop_with_empty_axes")
    if axes is not None and not int(cx.attr("keepdims", 1)):
        return cx.op("Unsqueeze", [value, axes])
    return value  # all axes reduced: a scalar or all-ones shape broadcasts as it is


@register("ReduceL1")
def reduce_l1(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = sum |x|: dx = s sign(x)."""
    return [cx.op("Mul", [_kept(cx, node, gy[0]), cx.op("Sign", [node.inputs[0]])]), None]


@register("ReduceL2")
def reduce_l2(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = sqrt(sum x^2): dx = s x / y (0 where y = 0)."""
    x = node.inputs[0]
    s, y = _kept(cx, node, gy[0]), _kept(cx, node, node.outputs[0])
    zero = cx.scalar(0.0, x)
    is_zero = cx.op("Equal", [y, zero])
    safe = cx.op("Where", [is_zero, cx.scalar(1.0, x), y])
    ratio = cx.op("Where", [is_zero, zero, cx.op("Div", [s, safe])])
    return [cx.op("Mul", [x, ratio]), None]


@register("ReduceSumSquare")
def reduce_sum_square(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = sum x^2: dx = 2 s x."""
    x = node.inputs[0]
    return [cx.op("Mul", [cx.op("Mul", [_kept(cx, node, gy[0]), cx.scalar(2.0, x)]), x]), None]


@register("ReduceLogSum")
def reduce_log_sum(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = log(sum x): dx = s / sum x = s exp(-y)."""
    s, y = _kept(cx, node, gy[0]), _kept(cx, node, node.outputs[0])
    spread = cx.op("Div", [s, cx.op("Exp", [y])])
    return [cx.op("Expand", [spread, cx.shape(node.inputs[0])]), None]


@register("ReduceLogSumExp")
def reduce_log_sum_exp(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = log(sum exp(x)): dx = s exp(x - y) (the softmax over the reduced axes)."""
    x = node.inputs[0]
    s, y = _kept(cx, node, gy[0]), _kept(cx, node, node.outputs[0])
    return [cx.op("Mul", [s, cx.op("Exp", [cx.op("Sub", [x, y])])]), None]
