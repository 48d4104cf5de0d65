"""VJP rules of per-instance normalizations: InstanceNormalization, GroupNormalization (opset 21 form), LRN.

InstanceNormalization and GroupNormalization normalize groups of elements: xhat = (x - mean) inv,
inv = 1/sqrt(var + eps) over each group, then y = xhat scale_c + bias_c per channel. With gs = g scale_c, per group:
dx = inv (gs - mean(gs) - xhat mean(gs xhat)); dscale_c = sum g xhat and dbias_c = sum g over batch and space.
The statistics are recomputed with standard ops. LRN's channel-window sums are Convs with a ones kernel.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, register


@dataclasses.dataclass(frozen=True)
class Normalized:
    """``x`` normalized over some axes (``xhat = (x - mean) inv``, ``inv = 1/sqrt(var + eps)``), recomputed with
    standard ops; LayerNormalization's rule (:mod:`bq_onnx.autodiff.vjp_nn`) and the ones here share it."""

    xhat: ir.Value
    inv: ir.Value
    axes: ir.Value

    def dx(self, cx: Vjp, gs: ir.Value) -> ir.Value:
        """``inv (gs - mean(gs) - xhat mean(gs xhat))``, ``gs`` the output gradient times the scale."""
        mean_gs = _mean(cx, gs, self.axes)  # emitted first: the order of ops is the graph's (golden hashes)
        spread = _mean(cx, cx.op("Mul", [gs, self.xhat]), self.axes)
        inner = cx.op("Add", [mean_gs, cx.op("Mul", [self.xhat, spread])])
        return cx.op("Mul", [self.inv, cx.op("Sub", [gs, inner])])


def _mean(cx: Vjp, v: ir.Value, axes: ir.Value) -> ir.Value:
    return cx.op("ReduceMean", [v, axes], keepdims=1)


def normalize(cx: Vjp, x: ir.Value, axes: list[int], eps: float) -> Normalized:
    """The statistics of ``x`` over ``axes``, emitted in one fixed order (golden outputs depend on it)."""
    axes_value = cx.ints_const(*axes)
    centered = cx.op("Sub", [x, _mean(cx, x, axes_value)])
    var = _mean(cx, cx.op("Mul", [centered, centered]), axes_value)
    inv = cx.op("Reciprocal", [cx.op("Sqrt", [cx.op("Add", [var, cx.scalar(eps, x)])])])
    return Normalized(cx.op("Mul", [centered, inv]), inv, axes_value)


def _normalized_grads(cx: Vjp, x: ir.Value, g: ir.Value, scale_c: ir.Value, axes: list[int], eps: float
                      ) -> tuple[ir.Value, ir.Value]:
    """(dx, xhat) for xhat normalized over ``axes`` of ``x``; ``scale_c`` broadcasts against x."""
    stats = normalize(cx, x, axes, eps)
    return stats.dx(cx, cx.op("Mul", [g, scale_c])), stats.xhat


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
    channels = list(x.shape)[1] if r >= 2 else None
    scale_dims = cx.static_dims(scale)
    if not isinstance(channels, int) or scale_dims != [channels]:
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


def _channel_window_sum(cx: Vjp, v: ir.Value, size: int, before: int) -> ir.Value:
    """out[n, c] = sum of v[n, c - before : c - before + size] over channels (zero outside), as a Conv of v seen
    as ``[N, 1, C, rest]`` with a constant ones kernel ``[size, 1]``."""
    folded = cx.op("Concat", [cx.shape(v, 0, 1), cx.ints_const(1), cx.shape(v, 1, 2), cx.ints_const(-1)], axis=0)
    ones = cx.em.const(np.ones((1, 1, size, 1), np.float32), v.dtype) if v.dtype is not None else None
    ones = ones if ones is not None else cx.op("CastLike", [cx.em.const(np.ones((1, 1, size, 1), np.float32)), v])
    summed = cx.op("Conv", [cx.op("Reshape", [v, folded]), ones], pads=[before, 0, size - 1 - before, 0])
    return cx.reshape_like(summed, v)


@register("LRN")
def lrn(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x d^-beta, d = bias + alpha/size S, S_c = sum of x^2 over the channel window [c - lo, c + hi]
    (lo = floor((size-1)/2), hi = size-1-lo; odd sizes only):
    dx = g d^-beta - 2 alpha beta/size x W'(g x d^(-beta-1)), W' the transposed window [c - hi, c + lo]."""
    x, g = node.inputs[0], gy[0]
    size = int(cx.attr("size"))
    if size % 2 == 0:
        raise RuleUnavailable("LRN with an even size (onnxruntime refuses it; unchecked)")
    alpha, beta, bias = float(cx.attr("alpha", 1e-4)), float(cx.attr("beta", 0.75)), float(cx.attr("bias", 1.0))
    lo = (size - 1) // 2
    square_sum = _channel_window_sum(cx, cx.op("Mul", [x, x]), size, lo)
    d = cx.op("Add", [cx.scalar(bias, x), cx.op("Mul", [square_sum, cx.scalar(alpha / size, x)])])
    d_beta = cx.op("Pow", [d, cx.scalar(-beta, x)])
    inner = cx.op("Div", [cx.op("Mul", [cx.op("Mul", [g, x]), d_beta]), d])
    spread = _channel_window_sum(cx, inner, size, size - 1 - lo)
    correction = cx.op("Mul", [cx.op("Mul", [x, spread]), cx.scalar(2 * alpha * beta / size, x)])
    return [cx.op("Sub", [cx.op("Mul", [g, d_beta]), correction])]
