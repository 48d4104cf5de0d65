"""VJP rules of neural-network ops: Conv, ConvTranspose, pools, Softmax/LogSoftmax, Layer/BatchNormalization.

Convolutions use the two adjoint identities (DESIGN.md, "Runtime facts"):

* input gradient of a Conv = ConvTranspose of g with the same weight, strides, dilations, pads and groups, with
  ``output_padding`` restoring the input positions the forward windows never reached;
* weight gradient = a Conv of the batch<->channel-transposed input with the batch<->channel-transposed g as
  kernel, strides and dilations swapped, cropped to the kernel size. That kernel is an activation; when its
  shape is symbolic (OpenVINO refuses Conv weights of dynamic shape) the windows are unfolded instead by a Conv
  with constant one-hot kernels and contracted with g by one MatMul.

ConvTranspose is the adjoint of Conv, so its input gradient is a Conv and its weight gradient the same
weight-gradient Conv with the roles of input and output swapped. AveragePool is a depthwise Conv with a constant
kernel; MaxPool routes g to each window's first maximum (the position its ``Indices`` output names): found with
elementwise ops when the windows tile the input, through the Indices and a scatter otherwise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, register
from bq_onnx.autodiff.vjp_norm import normalize


@dataclasses.dataclass
class Window:
    """Geometry of a strided sliding window over the spatial axes, pads resolved from ``auto_pad``."""

    kernel: list[int]
    strides: list[int]
    dilations: list[int]
    begin: list[int]
    end: list[int]

    @property
    def pads(self) -> list[int]:
        return [*self.begin, *self.end]

    def leftover(self, size: int, axis: int) -> int:
        """Padded input positions after the last window (what ``output_padding`` must restore)."""
        k, s, d = self.kernel[axis], self.strides[axis], self.dilations[axis]
        return (size + self.begin[axis] + self.end[axis] - d * (k - 1) - 1) % s


def _kernel(cx: Vjp, w: ir.Value | None) -> list[int]:
    kernel = cx.ints("kernel_shape")
    if kernel is None and w is not None:
        dims = cx.static_dims(w, 2)
        kernel = dims if dims else None
    if kernel is None:
        raise RuleUnavailable("kernel shape unknown")
    return kernel


def _window(cx: Vjp, x: ir.Value, kernel: list[int]) -> Window:
    """Strides, dilations and pads of a Conv/pool node; SAME padding needs static spatial dims."""
    n = len(kernel)
    strides, dilations = cx.ints("strides", [1] * n), cx.ints("dilations", [1] * n)
    auto_pad = cx.attr("auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return Window(kernel, strides, dilations, [0] * n, [0] * n)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        spatial = cx.static_dims(x, 2)
        if spatial is None:
            raise RuleUnavailable("auto_pad SAME with unknown spatial dims")
        begin, end = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else big)
            end.append(big if auto_pad == "SAME_UPPER" else small)
        return Window(kernel, strides, dilations, begin, end)
    pads = cx.ints("pads", [0] * 2 * n)
    return Window(kernel, strides, dilations, pads[:n], pads[n:])


def _conv_adjoint(cx: Vjp, g: ir.Value, w: ir.Value, x: ir.Value, win: Window, group: int) -> ir.Value:
    """ConvTranspose of g sized to x's spatial dims: the input gradient of ``Conv(x, w)``.

    With static spatial dims (or unit strides) one ConvTranspose with ``output_padding`` does it; otherwise the
    unpadded result gets ``stride - 1`` trailing zeros and is cropped to ``[begin, begin + size)`` at run time.
    """
    n = len(win.kernel)
    spatial = cx.static_dims(x, 2)
    if spatial is not None or all(s == 1 for s in win.strides):
        extra = [0] * n if spatial is None else [win.leftover(size, i) for i, size in enumerate(spatial)]
        return cx.op(
            "ConvTranspose",
            [g, w],
            strides=win.strides,
            dilations=win.dilations,
            pads=win.pads,
            output_padding=extra if any(extra) else None,
            group=group,
        )
    full = cx.op("ConvTranspose", [g, w], strides=win.strides, dilations=win.dilations, group=group)
    tail = cx.ints_const(*([0] * (n + 2)), 0, 0, *(s - 1 for s in win.strides))
    padded = cx.op("Pad", [full, tail])
    begin = cx.ints_const(*win.begin)
    ends = cx.op("Add", [cx.shape(x, 2), begin])
    return cx.op("Slice", [padded, begin, ends, cx.ints_const(*range(2, n + 2))])


def _weight_grad(cx: Vjp, inp: ir.Value, kern: ir.Value, win: Window, group: int) -> ir.Value:
    """sum_n sum_p kern[n, jB+b, p] * inp_padded[n, jA+a, p*stride + k*dilation]  ->  ``[G*B, A, *kernel]``.

    One Conv over the batch axis: ``inp`` becomes ``[A, G*N, *S]`` (batch = A), ``kern`` becomes
    ``[G*B, N, *O]`` (a grouped kernel), strides and dilations swap roles, and the result is cropped to the
    kernel size and transposed back.
    """
    n = len(win.kernel)
    spatial = list(range(2, n + 2))
    if group == 1:
        x_t = cx.op("Transpose", [inp], perm=[1, 0, *spatial])
        k_t = cx.op("Transpose", [kern], perm=[1, 0, *spatial])
    else:
        split = cx.op("Concat", [cx.ints_const(0, group, -1), cx.shape(inp, 2)], axis=0)
        x_t = cx.op("Transpose", [cx.op("Reshape", [inp, split])], perm=[2, 1, 0, *(a + 1 for a in spatial)])
        x_t = cx.op("Reshape", [x_t, cx.op("Concat", [cx.ints_const(0, -1), cx.shape(inp, 2)], axis=0)])
        split = cx.op("Concat", [cx.ints_const(0, group, -1), cx.shape(kern, 2)], axis=0)
        k_t = cx.op("Transpose", [cx.op("Reshape", [kern, split])], perm=[1, 2, 0, *(a + 1 for a in spatial)])
        merged = cx.op("Concat", [cx.ints_const(-1), cx.shape(kern, 0, 1), cx.shape(kern, 2)], axis=0)
        k_t = cx.op("Reshape", [k_t, merged])
    full = cx.op("Conv", [x_t, k_t], strides=win.dilations, dilations=win.strides, pads=win.pads, group=group)
    cropped = cx.op("Slice", [full, cx.ints_const(*([0] * n)), cx.ints_const(*win.kernel), cx.ints_const(*spatial)])
    return cx.op("Transpose", [cropped], perm=[1, 0, *spatial])


def _weight_grad_unfold(cx: Vjp, inp: ir.Value, kern: ir.Value, win: Window, group: int, a: int, b: int) -> ir.Value:
    """The same sum as :func:`_weight_grad` as unfold + MatMul: ``[G*B, A, *kernel]``.

    A Conv of every input channel with one-hot kernels extracts the ``K = prod(kernel)`` taps of each window
    (``[N, G, A*K, P]``); one batched MatMul over ``N*P`` with ``kern`` (``[G, B, N*P]``) gives the gradient.
    Every Conv weight here is a constant, which OpenVINO needs when batch or length are symbolic.
    """
    taps = math.prod(win.kernel)
    dtype = inp.dtype.numpy() if inp.dtype is not None else np.float32
    one_hot = cx.em.const(np.eye(taps, dtype=dtype).reshape(taps, 1, *win.kernel))
    if inp.dtype is None:
        one_hot = cx.op("CastLike", [one_hot, inp])
    single = cx.op("Reshape", [inp, cx.op("Concat", [cx.ints_const(-1, 1), cx.shape(inp, 2)], axis=0)])
    patches = cx.op("Conv", [single, one_hot], strides=win.strides, dilations=win.dilations, pads=win.pads)
    split = cx.op("Concat", [cx.shape(inp, 0, 1), cx.ints_const(group, a * taps, -1)], axis=0)
    patches = cx.op("Reshape", [patches, split])  # [N*G*A, K, *P] -> [N, G, A*K, P]
    patches = cx.op("Transpose", [patches], perm=[1, 0, 3, 2])
    patches = cx.op("Reshape", [patches, cx.ints_const(group, -1, a * taps)])
    kern = cx.op("Reshape", [kern, cx.ints_const(0, group, b, -1)])
    kern = cx.op("Transpose", [kern], perm=[1, 2, 0, 3])
    kern = cx.op("Reshape", [kern, cx.ints_const(group, b, -1)])
    grad = cx.op("MatMul", [kern, patches])
    return cx.op("Reshape", [grad, cx.ints_const(group * b, a, *win.kernel)])


def _weight_gradient(
    cx: Vjp, inp: ir.Value, kern: ir.Value, kern_like: ir.Value, w: ir.Value, win: Window, group: int
) -> ir.Value:
    """Pick the weight-gradient form: the batch<->channel Conv when its kernel (``kern``, shaped like
    ``kern_like``) has a static shape, else unfold + MatMul.

    The Conv form is 2-7x faster in onnxruntime for batches above 1 (about equal at batch 1), but its kernel is
    an activation: OpenVINO's CPU plugin refuses a Conv whose weight shape is dynamic (symbolic batch or length).
    """
    dims = cx.static_dims(w)
    if cx.static_dims(kern_like) is not None or dims is None:
        return _weight_grad(cx, inp, kern, win, group)
    return _weight_grad_unfold(cx, inp, kern, win, group, a=dims[1], b=dims[0] // group)


def _bias_grad(cx: Vjp, g: ir.Value, n_spatial: int) -> ir.Value:
    return cx.reduce_sum(g, [0, *range(2, n_spatial + 2)], keepdims=0)


@register("Conv")
def conv(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = conv(x, w) + b: dx = ConvTranspose(g, w), dw = Conv(x^T, g^T) (batch<->channel; unfold + MatMul when
    the shapes are symbolic), db = sum of g over batch and space."""
    x, w = node.inputs[0], node.inputs[1]
    g = gy[0]
    kernel = _kernel(cx, w)
    win = _window(cx, x, kernel)
    group = int(cx.attr("group", 1))
    dx = _conv_adjoint(cx, g, cx.own_copy(w, (0, 1)), x, win, group) if cx.needs(0) else None
    dw = _weight_gradient(cx, x, g, node.outputs[0], w, win, group) if cx.needs(1) else None
    db = _bias_grad(cx, g, len(kernel)) if cx.needs(2) else None
    return [dx, dw, db]


def _transposed_window(cx: Vjp, x: ir.Value, kernel: list[int]) -> tuple[Window, list[int]]:
    """ConvTranspose geometry: (window whose pads crop the full result, output_padding).

    ``output_shape`` and SAME padding fix the total crop from static input dims; it is split as the ONNX spec
    says (SAME_UPPER: the smaller half first).
    """
    n = len(kernel)
    strides, dilations = cx.ints("strides", [1] * n), cx.ints("dilations", [1] * n)
    extra = cx.ints("output_padding", [0] * n)
    auto_pad = cx.attr("auto_pad", "NOTSET")
    output_shape = cx.ints("output_shape")
    if output_shape is None and auto_pad in ("NOTSET", "VALID"):
        pads = [0] * 2 * n if auto_pad == "VALID" else cx.ints("pads", [0] * 2 * n)
        return Window(kernel, strides, dilations, pads[:n], pads[n:]), extra
    spatial = cx.static_dims(x, 2)
    if spatial is None:
        raise RuleUnavailable("ConvTranspose output_shape/auto_pad with unknown spatial dims")
    target = output_shape[-n:] if output_shape is not None else [size * s for size, s in zip(spatial, strides)]
    begin, end = [], []
    for size, k, s, d, e, t in zip(spatial, kernel, strides, dilations, extra, target):
        total = s * (size - 1) + e + (k - 1) * d + 1 - t
        if total < 0:
            raise RuleUnavailable("ConvTranspose output_shape larger than the full result")
        small, big = total // 2, total - total // 2
        begin.append(small if auto_pad == "SAME_UPPER" else big)
        end.append(big if auto_pad == "SAME_UPPER" else small)
    return Window(kernel, strides, dilations, begin, end), extra


@register("ConvTranspose")
def conv_transpose(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = conv_transpose(x, w) + b: dx = Conv(g, w) (its adjoint), dw = the Conv weight gradient with x and g
    swapped (g padded by the crop, x as kernel), db = sum of g."""
    x, w = node.inputs[0], node.inputs[1]
    g = gy[0]
    kernel = _kernel(cx, w)
    win, extra = _transposed_window(cx, x, kernel)
    if any(e >= s for e, s in zip(extra, win.strides)):
        raise RuleUnavailable("output_padding not smaller than the stride")
    group = int(cx.attr("group", 1))
    dx = dw = db = None
    if cx.needs(0):
        w_own = cx.own_copy(w, (0, 1))
        dx = cx.op("Conv", [g, w_own], strides=win.strides, dilations=win.dilations, pads=win.pads, group=group)
    if cx.needs(1):
        dw = _weight_gradient(cx, g, x, x, w, win, group)
    if cx.needs(2):
        db = _bias_grad(cx, g, len(kernel))
    return [dx, dw, db]


def _scatter_add_flat(cx: Vjp, x: ir.Value, positions: ir.Value, g: ir.Value) -> ir.Value:
    """A tensor shaped like x, zero except g added at the flat ``positions`` (repeats accumulate)."""
    length = cx.op("Reshape", [cx.op("Size", [x]), cx.ints_const(1)])
    zeros = cx.op("Expand", [cx.scalar(0.0, x), length])
    flat_pos = cx.op("Reshape", [positions, cx.ints_const(-1)])
    flat_g = cx.op("Reshape", [g, cx.ints_const(-1)])
    scattered = cx.op("ScatterElements", [zeros, flat_pos, flat_g], axis=0, reduction="add")
    return cx.reshape_like(scattered, x)


def _tiling_pool(cx: Vjp, x: ir.Value) -> tuple[int, int, int, int, int] | None:
    """``(C, H, W, kh, kw)`` of a float32 2-D MaxPool whose windows tile the input: kernel = strides, no
    dilation, no padding, no partial window (``ceil_mode`` only where the windows fit), static channels and
    spatial dims (onnxruntime's CPU ConvTranspose is float32 only)."""
    kernel = cx.ints("kernel_shape")
    dims = cx.static_dims(x, 1)
    if x.dtype != ir.DataType.FLOAT or kernel is None or len(kernel) != 2 or dims is None or len(dims) != 3:
        return None
    win = _window(cx, x, kernel)
    if win.strides != kernel or any(d != 1 for d in win.dilations) or any(win.pads):
        return None
    c, h, w = dims
    (kh, kw), partial = kernel, h % kernel[0] or w % kernel[1]
    if h < kh or w < kw or (partial and int(cx.attr("ceil_mode", 0))):
        return None
    return c, h, w, kh, kw


def _max_pool_tiles(cx: Vjp, x: ir.Value, y: ir.Value, g: ir.Value, dims: tuple[int, int, int, int, int]
                    ) -> ir.Value:
    """dx for windows that tile x, without MaxPool's ``Indices`` (onnxruntime computes those ~10x slower than
    the pool itself, and then scatters one element at a time).

    In a window-major layout ``[N, K, C*Ho*Wo]`` (``K = kh*kw`` window positions in row-major order; for square
    windows SpaceToDepth of x seen as N one-channel images ``[C*Ho*kh, Wo*kw]``), ``e = (x == y)`` marks every
    maximum of a window and ``relu(e - exclusive_cumsum(e))`` keeps the first one, the element MaxPool's Indices
    name (ties included: after a Relu many windows hold several equal values). Times g, the layout is N images
    ``[K, C*Ho, Wo]``, and a ConvTranspose with one-hot kernels and stride = kernel puts each window position
    back in place (``[N, 1, C*Ho*kh, W]``, that is x's layout), zero in rows and columns no window covers. Exact
    for finite gradients: every element of dx is one product ``1 * g`` plus zeros. Measured on LeNet's pools at
    batch 32 (onnxruntime, one thread): 240 instead of 480 us and 110 instead of 170 us; at batch 1 the Indices
    path is 2-3 us faster (fewer ops).
    """
    c, h, w, kh, kw = dims
    k, ho, wo = kh * kw, h // kh, w // kw
    if (h, w) != (ho * kh, wo * kw):
        x = cx.op("Slice", [x, cx.ints_const(0, 0), cx.ints_const(ho * kh, wo * kw), cx.ints_const(2, 3)])
    if kh == kw:  # x as N images [1, C*Ho*kh, Wo*kw]: SpaceToDepth makes channel q window position q
        single = cx.op("Reshape", [x, cx.ints_const(0, 1, c * ho * kh, wo * kw)])
        windows = cx.op("SpaceToDepth", [single], blocksize=kh)
    else:
        windows = cx.op("Reshape", [x, cx.ints_const(0, c, ho, kh, wo, kw)])
        windows = cx.op("Transpose", [windows], perm=[0, 3, 5, 1, 2, 4])
    windows = cx.op("Reshape", [windows, cx.ints_const(0, k, c * ho * wo)])
    per_window = cx.ints_const(0, 1, c * ho * wo)
    is_max = cx.op("Equal", [windows, cx.op("Reshape", [y, per_window])])
    is_max = cx.op("Cast", [is_max], to=ir.DataType.FLOAT)
    earlier = cx.op("CumSum", [is_max, cx.ints_const(1)], exclusive=1)
    first = cx.op("Relu", [cx.op("Sub", [is_max, earlier])])
    routed = cx.op("Mul", [first, cx.op("Reshape", [g, per_window])])
    # [N, K, C*Ho, Wo] is N images of K channels: one ConvTranspose with one-hot kernels gives [N, 1, C*Ho*kh, W]
    routed = cx.op("Reshape", [routed, cx.ints_const(0, k, c * ho, wo)])
    one_hot = cx.em.const(np.eye(k, dtype=np.float32).reshape(k, 1, kh, kw))
    extra_w = w - wo * kw  # columns no window covers: output_padding adds them to every row
    full = cx.op("ConvTranspose", [routed, one_hot], strides=[kh, kw], output_padding=[0, extra_w] if extra_w else None)
    if h == ho * kh:
        return cx.op("Reshape", [full, cx.ints_const(0, c, h, w)])
    full = cx.op("Reshape", [full, cx.ints_const(0, c, ho * kh, w)])  # rows no window covers, per channel
    return cx.op("Pad", [full, cx.ints_const(0, 0, 0, 0, 0, 0, h - ho * kh, 0)])


@register("MaxPool")
def max_pool(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g added at each window's argmax: the first maximum in row-major window order, the position
    MaxPool's ``Indices`` output names.

    Windows that tile the input (kernel = strides, no padding or dilation, static dims: :func:`_max_pool_tiles`)
    find it with elementwise ops. Otherwise the Indices route it (the pool is re-run with two outputs when the
    model did not ask for them) and a ScatterElements adds g there (overlapping windows share positions).
    Column-major indices (``storage_order=1``) are refused.
    """
    if int(cx.attr("storage_order", 0)):
        raise RuleUnavailable("MaxPool storage_order=1")
    x = node.inputs[0]
    dims = _tiling_pool(cx, x)
    if dims is not None:
        return [_max_pool_tiles(cx, x, node.outputs[0], gy[0], dims)]
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].name:
        indices = node.outputs[1]
    else:
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        indices = cx.ops("MaxPool", [x], 2, **attrs)[1]
    return [_scatter_add_flat(cx, x, indices, gy[0])]


@register("AveragePool")
def average_pool(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = ConvTranspose of g / count with a ones kernel, per channel.

    count = the window size, or with ``count_include_pad=0`` the number of real (unpadded) elements, obtained
    as ``AveragePool(ones, count_include_pad=1) * kernel size``. ``ceil_mode=1`` is accepted only where it
    changes nothing (static dims, windows fit exactly).
    """
    x, g = node.inputs[0], gy[0]
    kernel = _kernel(cx, None)
    win = _window(cx, x, kernel)
    n = len(kernel)
    if int(cx.attr("ceil_mode", 0)):
        spatial = cx.static_dims(x, 2)
        if spatial is None or any(win.leftover(size, i) for i, size in enumerate(spatial)):
            raise RuleUnavailable("AveragePool ceil_mode=1 with partial windows")
    size = math.prod(kernel)
    if int(cx.attr("count_include_pad", 0)) or not any(win.pads):
        scaled = cx.op("Mul", [g, cx.scalar(1.0 / size, x)])
    else:
        ones_shape = cx.op("Concat", [cx.ints_const(1, 1), cx.shape(x, 2)], axis=0)
        ones = cx.op("Expand", [cx.scalar(1.0, x), ones_shape])
        fraction = cx.op(
            "AveragePool",
            [ones],
            kernel_shape=kernel,
            strides=win.strides,
            dilations=win.dilations,
            pads=win.pads,
            count_include_pad=1,
        )
        scaled = cx.op("Div", [g, cx.op("Mul", [fraction, cx.scalar(float(size), x)])])
    per_channel = cx.op("Reshape", [scaled, cx.ints_const(-1, 1, *([0] * n))])
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    ones_kernel = cx.em.const(np.ones((1, 1, *kernel), dtype=dtype))
    if x.dtype is None:
        ones_kernel = cx.op("CastLike", [ones_kernel, x])
    return [cx.reshape_like(_conv_adjoint(cx, per_channel, ones_kernel, x, win, 1), x)]


@register("GlobalAveragePool")
def global_average_pool(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g broadcast over the spatial axes / their number of positions."""
    x, y = node.inputs[0], node.outputs[0]
    spread = cx.op("Expand", [gy[0], cx.shape(x)])
    return [cx.op("Mul", [spread, cx.size_ratio(y, x, x)])]


@register("Softmax")
def softmax(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = y (g - sum(g y)) along ``axis``."""
    y, g = node.outputs[0], gy[0]
    axis = int(cx.attr("axis", -1))
    inner = cx.reduce_sum(cx.op("Mul", [g, y]), [axis], keepdims=1)
    return [cx.op("Mul", [y, cx.op("Sub", [g, inner])])]


@register("LogSoftmax")
def log_softmax(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx = g - exp(y) sum(g) along ``axis``."""
    y, g = node.outputs[0], gy[0]
    axis = int(cx.attr("axis", -1))
    total = cx.reduce_sum(g, [axis], keepdims=1)
    return [cx.op("Sub", [g, cx.op("Mul", [cx.op("Exp", [y]), total])])]


@register("LayerNormalization")
def layer_norm(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = xhat * scale + bias with xhat = (x - mean) * inv, inv = 1/sqrt(var + eps) over axes ``axis..-1``.

    dx = inv (gs - mean(gs) - xhat mean(gs xhat)) with gs = g scale; dscale = sum g xhat; dbias = sum g (both
    summed over the axes scale and bias were broadcast along). Mean and inv are recomputed with standard ops,
    so the optional Mean/InvStdDev outputs may be absent; gradients flowing into them are refused.
    """
    if any(g is not None for g in gy[1:]):
        raise RuleUnavailable("gradient of LayerNormalization's Mean/InvStdDev outputs")
    x, scale = node.inputs[0], node.inputs[1]
    bias = cx.input(2)
    g, y_shape = gy[0], node.outputs[0].shape
    axis = int(cx.attr("axis", -1))
    axes = list(range(axis, 0)) if axis < 0 else list(range(axis, cx.rank(x)))
    eps = float(cx.attr("epsilon", 1e-5))
    stats = normalize(cx, x, axes, eps)
    grads: list[ir.Value | None] = [None, None, None]
    if cx.needs(0):
        grads[0] = stats.dx(cx, cx.op("Mul", [g, scale]))
    if cx.needs(1):
        grads[1] = cx.unbroadcast(cx.op("Mul", [g, stats.xhat]), y_shape, scale)
    if bias is not None and cx.needs(2):
        grads[2] = cx.unbroadcast(g, y_shape, bias)
    return grads


@register("BatchNormalization")
def batch_norm(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Inference form y = (x - mean) inv scale + bias, inv = 1/sqrt(var + eps), per channel (axis 1).

    dx = g scale inv; dscale = sum g (x - mean) inv; dbias = sum g; dmean = -dbias scale inv;
    dvar = -1/2 sum g (x - mean) scale inv^3. Training mode (batch statistics) is refused.
    """
    if int(cx.attr("training_mode", 0)) or len(node.outputs) > 1:
        raise RuleUnavailable("BatchNormalization in training mode")
    x, scale, bias, mean, var = node.inputs
    g = gy[0]
    r = cx.rank(x)
    eps = float(cx.attr("epsilon", 1e-5))
    per_channel = cx.ints_const(-1, *([1] * (r - 2)))
    axes = [0, *range(2, r)]

    def spread(v: ir.Value) -> ir.Value:
        return cx.op("Reshape", [v, per_channel])

    inv = cx.op("Reciprocal", [cx.op("Sqrt", [cx.op("Add", [var, cx.scalar(eps, var)])])])
    scale_inv = cx.op("Mul", [scale, inv])
    sum_g = cx.reduce_sum(g, axes, keepdims=0) if any(cx.needs(i) for i in (2, 3)) else None
    sum_gx = None
    if cx.needs(1) or cx.needs(4):
        sum_gx = cx.reduce_sum(cx.op("Mul", [g, cx.op("Sub", [x, spread(mean)])]), axes, keepdims=0)
    grads: list[ir.Value | None] = [None] * 5
    if cx.needs(0):
        grads[0] = cx.op("Mul", [g, spread(scale_inv)])
    if cx.needs(1):
        grads[1] = cx.op("Mul", [sum_gx, inv])
    if cx.needs(2):
        grads[2] = sum_g
    if cx.needs(3):
        grads[3] = cx.op("Neg", [cx.op("Mul", [sum_g, scale_inv])])
    if cx.needs(4):
        cube = cx.op("Mul", [scale_inv, cx.op("Mul", [inv, inv])])
        grads[4] = cx.op("Mul", [cx.op("Mul", [sum_gx, cube]), cx.scalar(-0.5, var)])
    return grads
