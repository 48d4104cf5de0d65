"""VJP rules of elementwise ops: arithmetic with broadcasting, activations, Pow/Sqrt/Exp/Log, Clip, Where, Cast.

Notation: ``g`` is the gradient of the output ``y``; every input gradient is summed back to its input's shape
(``unbroadcast``) because the forward op broadcast it numpy-style.
"""

from __future__ import annotations

import math

import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, const_array, is_float, register


def _out_shape(node: ir.Node) -> ir.Shape | None:
    return node.outputs[0].shape


@register("Add", "Sum")
def add(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = a + b (+ ...): every operand receives g, summed over its broadcast axes."""
    g = gy[0]
    return [cx.unbroadcast(g, _out_shape(node), x) if cx.needs(i) else None for i, x in enumerate(node.inputs)]


@register("Sub")
def sub(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = a - b: da = g, db = -g."""
    a, b = node.inputs
    g = gy[0]
    da = cx.unbroadcast(g, _out_shape(node), a) if cx.needs(0) else None
    db = cx.unbroadcast(cx.op("Neg", [g]), _out_shape(node), b) if cx.needs(1) else None
    return [da, db]


@register("Mul")
def mul(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = a * b: da = g * b, db = g * a."""
    a, b = node.inputs
    g = gy[0]
    da = cx.unbroadcast(cx.op("Mul", [g, b]), _out_shape(node), a) if cx.needs(0) else None
    db = cx.unbroadcast(cx.op("Mul", [g, a]), _out_shape(node), b) if cx.needs(1) else None
    return [da, db]


@register("Div")
def div(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = a / b: da = g / b, db = -g * y / b."""
    a, b = node.inputs
    g, y = gy[0], node.outputs[0]
    if not is_float(y):
        raise RuleUnavailable("integer Div")
    da = cx.unbroadcast(cx.op("Div", [g, b]), _out_shape(node), a) if cx.needs(0) else None
    db = None
    if cx.needs(1):
        db = cx.op("Neg", [cx.op("Div", [cx.op("Mul", [g, y]), b])])
        db = cx.unbroadcast(db, _out_shape(node), b)
    return [da, db]


@register("Neg")
def neg(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = -x: dx = -g."""
    return [cx.op("Neg", [gy[0]])]


@register("Identity")
def identity(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x: dx = g."""
    return [gy[0]]


@register("Dropout")
def dropout(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Inference Dropout is the identity; a run-time ``training_mode`` other than a constant false is refused."""
    if gy[1:] and gy[1] is not None:
        raise RuleUnavailable("gradient of the Dropout mask")
    mode = cx.input(2)
    if mode is not None:
        value = const_array(mode)
        if value is None or bool(value):
            raise RuleUnavailable("Dropout in training mode")
    return [gy[0], None, None]


@register("Cast")
def cast(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = cast(x): dx = cast(g) back to x's float type; integer inputs get none."""
    x = node.inputs[0]
    if x.dtype is None:
        return [cx.op("CastLike", [gy[0], x])]
    if not is_float(x):
        return [None]
    return [cx.op("Cast", [gy[0]], to=x.dtype)]


@register("Relu")
def relu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = max(x, 0): dx = g where x > 0."""
    x = node.inputs[0]
    positive = cx.op("Greater", [x, cx.scalar(0.0, x)])
    return [cx.op("Where", [positive, gy[0], cx.scalar(0.0, x)])]


@register("LeakyRelu")
def leaky_relu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x if x > 0 else alpha x: dx = g or alpha g."""
    x, g = node.inputs[0], gy[0]
    alpha = float(cx.attr("alpha", 0.01))
    positive = cx.op("Greater", [x, cx.scalar(0.0, x)])
    return [cx.op("Where", [positive, g, cx.op("Mul", [g, cx.scalar(alpha, x)])])]


@register("Sigmoid")
def sigmoid(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g y (1 - y)."""
    y = node.outputs[0]
    one_minus = cx.op("Sub", [cx.scalar(1.0, y), y])
    return [cx.op("Mul", [gy[0], cx.op("Mul", [y, one_minus])])]


@register("Tanh")
def tanh(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g (1 - y^2)."""
    y = node.outputs[0]
    return [cx.op("Mul", [gy[0], cx.op("Sub", [cx.scalar(1.0, y), cx.op("Mul", [y, y])])])]


@register("HardSigmoid")
def hard_sigmoid(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = clip(alpha x + beta, 0, 1): dx = alpha g inside the linear part, 0 outside."""
    x = node.inputs[0]
    alpha, beta = float(cx.attr("alpha", 0.2)), float(cx.attr("beta", 0.5))
    t = cx.op("Add", [cx.op("Mul", [x, cx.scalar(alpha, x)]), cx.scalar(beta, x)])
    inside = cx.op("And", [cx.op("Greater", [t, cx.scalar(0.0, x)]), cx.op("Less", [t, cx.scalar(1.0, x)])])
    return [cx.op("Where", [inside, cx.op("Mul", [gy[0], cx.scalar(alpha, x)]), cx.scalar(0.0, x)])]


@register("HardSwish")
def hard_swish(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x clip(x/6 + 1/2, 0, 1): dx = g (x/3 + 1/2) for |x| < 3, g for x >= 3, 0 for x <= -3."""
    x = node.inputs[0]
    slope = cx.op("Add", [cx.op("Mul", [x, cx.scalar(1.0 / 3.0, x)]), cx.scalar(0.5, x)])
    high = cx.op("Where", [cx.op("Less", [x, cx.scalar(3.0, x)]), slope, cx.scalar(1.0, x)])
    deriv = cx.op("Where", [cx.op("Greater", [x, cx.scalar(-3.0, x)]), high, cx.scalar(0.0, x)])
    return [cx.op("Mul", [gy[0], deriv])]


@register("Erf")
def erf(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g 2/sqrt(pi) exp(-x^2)."""
    x = node.inputs[0]
    bump = cx.op("Exp", [cx.op("Neg", [cx.op("Mul", [x, x])])])
    return [cx.op("Mul", [gy[0], cx.op("Mul", [bump, cx.scalar(2.0 / math.sqrt(math.pi), x)])])]


@register("Gelu")
def gelu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Exact: dx = g (Phi(x) + x phi(x)). Tanh form: the derivative of 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    x, g = node.inputs[0], gy[0]
    half, one = cx.scalar(0.5, x), cx.scalar(1.0, x)
    x2 = cx.op("Mul", [x, x])
    if cx.attr("approximate", "none") == "tanh":
        c = math.sqrt(2.0 / math.pi)
        inner = cx.op("Mul", [x, cx.op("Add", [one, cx.op("Mul", [x2, cx.scalar(0.044715, x)])])])
        t = cx.op("Tanh", [cx.op("Mul", [inner, cx.scalar(c, x)])])
        d_inner = cx.op("Add", [cx.scalar(c, x), cx.op("Mul", [x2, cx.scalar(3 * 0.044715 * c, x)])])
        sech2 = cx.op("Sub", [one, cx.op("Mul", [t, t])])
        deriv = cx.op(
            "Add",
            [
                cx.op("Mul", [half, cx.op("Add", [one, t])]),
                cx.op("Mul", [cx.op("Mul", [half, x]), cx.op("Mul", [sech2, d_inner])]),
            ],
        )
    else:
        erf_ = cx.op("Erf", [cx.op("Mul", [x, cx.scalar(math.sqrt(0.5), x)])])
        cdf = cx.op("Mul", [half, cx.op("Add", [one, erf_])])
        bump = cx.op("Exp", [cx.op("Mul", [x2, cx.scalar(-0.5, x)])])
        pdf = cx.op("Mul", [bump, cx.scalar(1 / math.sqrt(2 * math.pi), x)])
        deriv = cx.op("Add", [cdf, cx.op("Mul", [x, pdf])])
    return [cx.op("Mul", [g, deriv])]


@register("Exp")
def exp(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g y."""
    return [cx.op("Mul", [gy[0], node.outputs[0]])]


@register("Log")
def log(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g / x."""
    return [cx.op("Div", [gy[0], node.inputs[0]])]


@register("Reciprocal")
def reciprocal(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = 1/x: dx = -g y^2."""
    y = node.outputs[0]
    return [cx.op("Neg", [cx.op("Mul", [gy[0], cx.op("Mul", [y, y])])])]


@register("Abs")
def abs_(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g sign(x)."""
    return [cx.op("Mul", [gy[0], cx.op("Sign", [node.inputs[0]])])]


@register("Sqrt")
def sqrt(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g / (2 y)."""
    y = node.outputs[0]
    return [cx.op("Div", [cx.op("Mul", [gy[0], cx.scalar(0.5, y)]), y])]


@register("Pow")
def pow_(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x^p: dx = g p x^(p-1); dp = g y log(x) (only when the exponent itself is differentiated)."""
    x, p = node.inputs
    y, g = node.outputs[0], gy[0]
    dx = dp = None
    if cx.needs(0):
        pf = p if is_float(p) and p.dtype == x.dtype else cx.op("CastLike", [p, x])
        power = cx.op("Pow", [x, cx.op("Sub", [pf, cx.scalar(1.0, x)])])
        dx = cx.unbroadcast(cx.op("Mul", [g, cx.op("Mul", [pf, power])]), _out_shape(node), x)
    if cx.needs(1):
        dp = cx.op("CastLike", [cx.op("Mul", [cx.op("Mul", [g, y]), cx.op("Log", [x])]), p])
        dp = cx.unbroadcast(dp, _out_shape(node), p)
    return [dx, dp]


@register("Clip")
def clip(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = min(max(x, lo), hi): dx = g where lo <= x <= hi; dlo = sum(g where x < lo), dhi = sum(g where x > hi)."""
    x, g = node.inputs[0], gy[0]
    lo, hi = cx.input(1), cx.input(2)
    zero = cx.scalar(0.0, x)
    inside = None
    for bound, compare in ((lo, "GreaterOrEqual"), (hi, "LessOrEqual")):
        if bound is not None:
            ok = cx.op(compare, [x, bound])
            inside = ok if inside is None else cx.op("And", [inside, ok])
    grads: list[ir.Value | None] = [None, None, None]
    if cx.needs(0):
        grads[0] = g if inside is None else cx.op("Where", [inside, g, zero])
    for i, (bound, compare) in enumerate(((lo, "Less"), (hi, "Greater")), start=1):
        if bound is not None and cx.needs(i):
            outside = cx.op("Where", [cx.op(compare, [x, bound]), g, zero])
            total = cx.op("ReduceSum", [outside], keepdims=0)
            grads[i] = cx.reshape_like(total, bound)
    return grads


@register("Where")
def where(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = cond ? a : b: da = g where cond, db = g where not cond (each summed over its broadcast axes)."""
    cond, a, b = node.inputs
    g = gy[0]
    zero = cx.scalar(0.0, node.outputs[0])
    da = db = None
    if cx.needs(1):
        da = cx.unbroadcast(cx.op("Where", [cond, g, zero]), _out_shape(node), a)
    if cx.needs(2):
        db = cx.unbroadcast(cx.op("Where", [cond, zero, g]), _out_shape(node), b)
    return [None, da, db]
