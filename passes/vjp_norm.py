"""VJP rules of per-instance normalizations: InstanceNormalization and GroupNormalization (opset 21 form).

Both normalize groups of elements: xhat = (x - mean) inv, inv = 1/sqrt(var + eps) over each group, then
y = xhat scale_c + bias_c per channel. With gs = g scale_c, per group:
dx = inv (gs - mean(gs) - xhat mean(gs xhat)); dscale_c = sum g xhat and dbias_c = sum g over batch and space.
The statistics are recomputed with standard ops.
"""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.passes.vjp_common import Grads, RuleUnavailable, Vjp, register


def _normalized_grads(cx: Vjp, x: ir.Value, g: ir.Value, scale_c: ir.Value, axes: list[int], eps: float
                      ) -> tuple[ir.Value, ir.Value]:
    """(dx, xhat) for xhat normalized over ``axes`` of ``x``; ``scale_c`` broadcasts against x."""
    axes_value = cx.ints_const(*axes)

    def mean(v: ir.Value) -> ir.Value:
        return cx.op("ReduceMean", [v, axes_value], keepdims=1)

    centered = cx.op("Sub", [x, mean(x)])
    var = mean(cx.op("Mul", [centered, centered]))
    inv = cx.op("Reciprocal", [cx.op("Sqrt", [cx.op("Add", [var, cx.scalar(eps, x)])])])
    xhat = cx.op("Mul", [centered, inv])
    gs = cx.op("Mul", [g, scale_c])
    inner = cx.op("Add", [mean(gs), cx.op("Mul", [xhat, mean(cx.op("Mul", [gs, xhat]))])])
    return cx.op("Mul", [inv, cx.op("Sub", [gs, inner])]), xhat


@register("InstanceNormalization")
def instance_norm(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Groups = one (sample, channel) over all spatial axes; scale and B are per channel ``[C]``."""
    x, scale, _ = node.inputs
    g = gy[0]
    r = cx.rank(x)
    if r < 3:
        raise RuleUnavailable("InstanceNormalization of rank < 3")
    eps = float(cx.attr("epsilon", 1e-5))
    per_channel = cx.ints_const(-1, *([1] * (r - 2)))
    dx, xhat = _normalized_grads(cx, x, g, cx.op("Reshape", [scale, per_channel]), list(range(2, r)), eps)
    axes = [0, *range(2, r)]
    dscale = cx.reduce_sum(cx.op("Mul", [g, xhat]), axes, keepdims=0) if cx.needs(1) else None
    dbias = cx.reduce_sum(g, axes, keepdims=0) if cx.needs(2) else None
    return [dx if cx.needs(0) else None, dscale, dbias]


@register("GroupNormalization")
def group_norm(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Groups = one sample's ``C / num_groups`` consecutive channels with their spatial axes (x seen as
    ``[N, G, -1]``); scale and bias are per channel ``[C]`` (opset 21; the per-group opset-18 form is refused)."""
    x, scale, bias = node.inputs
    g = gy[0]
    r = cx.rank(x)
    groups = int(cx.attr("num_groups"))
    eps = float(cx.attr("epsilon", 1e-5))
    channels = cx.static_dims(x, 1)
    scale_dims = cx.static_dims(scale)
    if r < 2 or scale_dims is None or channels is None or scale_dims != channels[:1]:
        raise RuleUnavailable("GroupNormalization scale not known to be per channel")
    per_channel = cx.op("Reshape", [scale, cx.ints_const(-1, *([1] * (r - 2)))])
    grouped = cx.ints_const(0, groups, -1)
    xg = cx.op("Reshape", [x, grouped])
    gs_full = cx.op("Mul", [g, per_channel])
    dxg, xhat_g = _normalized_grads(cx, xg, cx.op("Reshape", [gs_full, grouped]), cx.scalar(1.0, x), [2], eps)
    axes = [0, *range(2, r)]
    dscale = dbias = None
    if cx.needs(1):
        xhat = cx.reshape_like(xhat_g, x)
        dscale = cx.reduce_sum(cx.op("Mul", [g, xhat]), axes, keepdims=0)
    if cx.needs(2):
        dbias = cx.reduce_sum(g, axes, keepdims=0)
    return [cx.reshape_like(dxg, x) if cx.needs(0) else None, dscale, dbias]
