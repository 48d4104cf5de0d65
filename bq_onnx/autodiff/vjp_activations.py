"""VJP rules of further elementwise ops found in exported models: Softplus, Softsign, Mish, Elu, Selu, PRelu,
ThresholdedRelu, Sin, Cos, and the n-ary Mean.

Piecewise activations take the branch the ONNX definition takes at the switch point (Elu/Selu: x > 0 is the
identity branch, PRelu: x < 0 is the slope branch, ThresholdedRelu: x > alpha passes).
"""

from __future__ import annotations

import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, Vjp, register

SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


@register("Softplus")
def softplus(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = log(1 + exp(x)): dx = g sigmoid(x)."""
    return [cx.op("Mul", [gy[0], cx.op("Sigmoid", [node.inputs[0]])])]


@register("Softsign")
def softsign(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x / (1 + |x|): dx = g / (1 + |x|)^2."""
    x = node.inputs[0]
    d = cx.op("Add", [cx.scalar(1.0, x), cx.op("Abs", [x])])
    return [cx.op("Div", [gy[0], cx.op("Mul", [d, d])])]


@register("Mish")
def mish(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x tanh(softplus(x)): dx = g (t + x sigmoid(x) (1 - t^2)), t = tanh(softplus(x))."""
    x = node.inputs[0]
    t = cx.op("Tanh", [cx.op("Softplus", [x])])
    sech2 = cx.op("Sub", [cx.scalar(1.0, x), cx.op("Mul", [t, t])])
    deriv = cx.op("Add", [t, cx.op("Mul", [cx.op("Mul", [x, cx.op("Sigmoid", [x])]), sech2])])
    return [cx.op("Mul", [gy[0], deriv])]


@register("Elu")
def elu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x for x > 0, alpha (exp(x) - 1) otherwise: dx = g, or g (y + alpha)."""
    x, y, g = node.inputs[0], node.outputs[0], gy[0]
    alpha = float(cx.attr("alpha", 1.0))
    negative = cx.op("Mul", [g, cx.op("Add", [y, cx.scalar(alpha, x)])])
    return [cx.op("Where", [cx.op("Greater", [x, cx.scalar(0.0, x)]), g, negative])]


@register("Selu")
def selu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = gamma x for x > 0, gamma alpha (exp(x) - 1) otherwise: dx = gamma g, or g (y + gamma alpha)."""
    x, y, g = node.inputs[0], node.outputs[0], gy[0]
    alpha, gamma = float(cx.attr("alpha", SELU_ALPHA)), float(cx.attr("gamma", SELU_GAMMA))
    positive = cx.op("Mul", [g, cx.scalar(gamma, x)])
    negative = cx.op("Mul", [g, cx.op("Add", [y, cx.scalar(gamma * alpha, x)])])
    return [cx.op("Where", [cx.op("Greater", [x, cx.scalar(0.0, x)]), positive, negative])]


@register("PRelu")
def prelu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = slope x for x < 0, x otherwise (slope broadcast to x): dx = g or g slope; dslope = sum g x over x < 0."""
    x, slope = node.inputs
    g = gy[0]
    zero = cx.scalar(0.0, x)
    negative = cx.op("Less", [x, zero])
    dx = cx.op("Where", [negative, cx.op("Mul", [g, slope]), g]) if cx.needs(0) else None
    dslope = None
    if cx.needs(1):
        dslope = cx.op("Where", [negative, cx.op("Mul", [g, x]), zero])
        dslope = cx.unbroadcast(dslope, node.outputs[0].shape, slope)
    return [dx, dslope]


@register("ThresholdedRelu")
def thresholded_relu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x for x > alpha, 0 otherwise: dx = g where x > alpha."""
    x = node.inputs[0]
    above = cx.op("Greater", [x, cx.scalar(float(cx.attr("alpha", 1.0)), x)])
    return [cx.op("Where", [above, gy[0], cx.scalar(0.0, x)])]


@register("Sin")
def sin(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g cos(x)."""
    return [cx.op("Mul", [gy[0], cx.op("Cos", [node.inputs[0]])])]


@register("Cos")
def cos(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = -g sin(x)."""
    return [cx.op("Neg", [cx.op("Mul", [gy[0], cx.op("Sin", [node.inputs[0]])])])]


@register("Mean")
def mean(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = (x_0 + ... + x_{n-1}) / n: dx_i = g / n summed over x_i's broadcast axes."""
    inputs = list(node.inputs)
    scaled = cx.op("Mul", [gy[0], cx.scalar(1.0 / len(inputs), node.outputs[0])])
    return [cx.unbroadcast(scaled, node.outputs[0].shape, x) if cx.needs(i) else None for i, x in enumerate(inputs)]
