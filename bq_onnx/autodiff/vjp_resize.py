"""VJP rules of spatial re-indexing ops: Resize, Pad, Tile, DepthToSpace, SpaceToDepth.

Resize is linear in X and separable: y = A_1 ... A_k X, one matrix ``A_a`` (``[out_a, in_a]``) per resized axis,
so dx = A_1^T ... A_k^T g. Each ``A_a^T`` is obtained by the runtime's own Resize applied to an identity matrix
``I[in_a, in_a]`` along its second axis (same mode, coordinate transformation, nearest mode, cubic coefficient,
exclude_outside, antialias, and that axis's scale or size; ``extrapolation_value`` 0 because it is the constant
term, not part of the linear map). Every mode is then reproduced by construction, not re-derived, and with constant
scales and static dims the matrices are constants both runtimes fold at load time. g is contracted with them by
MatMul (batched, g reshaped so the axis is second to last), which both runtimes run for any dtype they run Resize
in; a ScatterElements-add would serve nearest mode only and is serial per element in onnxruntime.

Upsample (opset 7-9) is not a rule: autodiff needs opset >= 21, and onnx's version converter (the prepare pass)
turns Upsample into Resize on the way there.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, const_array, register

#: Largest resize matrix (elements, in x out along one axis) the rule builds; longer axes are refused.
MAX_MATRIX = 1 << 24

#: Resize attributes the identity-matrix Resize copies (the others are reset or handled here).
_RESIZE_COPIED = ("mode", "coordinate_transformation_mode", "nearest_mode", "cubic_coeff_a", "exclude_outside",
                  "antialias")


def _optional(cx: Vjp, i: int) -> tuple[ir.Value | None, np.ndarray | None]:
    """An optional input and its constant value; an empty constant counts as absent."""
    value = cx.input(i)
    if value is None:
        return None, None
    array = const_array(value)
    if array is not None and array.size == 0:
        return None, None
    return value, array


def _const_like(cx: Vjp, array: np.ndarray, like: ir.Value) -> ir.Value:
    """A constant in ``like``'s dtype (a folded initializer; ``CastLike`` only when that dtype is unknown)."""
    if like.dtype is not None:
        return cx.em.const(array.astype(like.dtype.numpy()))
    return cx.op("CastLike", [cx.em.const(array), like])


def _identity(cx: Vjp, x: ir.Value, axis: int) -> ir.Value:
    """``I[n, n]`` with n = x's length along ``axis``, in x's dtype (a constant when n is static)."""
    dims = cx.static_dims(x)
    dtype = x.dtype.numpy() if x.dtype is not None else np.float32
    if dims is not None:
        eye = cx.em.const(np.eye(dims[axis], dtype=dtype))
    else:
        n = cx.dim(x, axis)
        zeros = cx.op("ConstantOfShape", [cx.op("Concat", [n, n], axis=0)], value=ir.tensor(np.zeros(1, dtype)))
        eye = cx.op("EyeLike", [zeros])
    return eye if x.dtype is not None else cx.op("CastLike", [eye, x])


def _contract(cx: Vjp, g: ir.Value, matrix: ir.Value, axis: int, rank: int) -> ir.Value:
    """out[..., j, ...] = sum_i matrix[j, i] g[..., i, ...] along ``axis``."""
    if axis == rank - 1:
        return cx.op("MatMul", [g, cx.op("Transpose", [matrix], perm=[1, 0])])
    if axis == rank - 2:
        return cx.op("MatMul", [matrix, g])
    tail = cx.op("ReduceProd", [cx.shape(g, axis + 1)], keepdims=1)
    folded = cx.op("Reshape", [g, cx.op("Concat", [cx.ints_const(-1), cx.dim(g, axis), tail], axis=0)])
    product = cx.op("MatMul", [matrix, folded])
    shape = cx.op("Concat", [cx.shape(g, 0, axis), cx.dim(matrix, 0), cx.shape(g, axis + 1)], axis=0)
    return cx.op("Reshape", [product, shape])


def _producer(value: ir.Value, op_type: str) -> ir.Node | None:
    node = value.producer()
    return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None


def _shape_positions(value: ir.Value, x: ir.Value) -> list[int | None] | None:
    """For a 1-D int64 value: per element, the axis of ``x`` whose length it provably is (else ``None``).

    Reads the exporters' pattern ``Concat(Shape(x)[a:b] or Gather(Shape(x), idx) or Slice(Shape(x)), ...)``.
    """
    length = None if value.shape is None or len(value.shape) != 1 else value.shape[0]
    if not isinstance(length, int):
        return None
    shape = _producer(value, "Shape")
    if shape is not None and shape.inputs[0] is x:
        start = int(shape.attributes.get_int("start", 0))
        rank = len(x.shape) if x.shape is not None else None
        if start < 0 and rank is None:
            return [None] * length
        start = start + rank if start < 0 else start
        return [start + i for i in range(length)]
    gather = _producer(value, "Gather")
    if gather is not None and _producer(gather.inputs[0], "Shape") is not None:
        inner = _shape_positions(gather.inputs[0], x)
        idx = const_array(gather.inputs[1])
        if inner is not None and idx is not None and idx.ndim == 1:
            return [inner[int(i)] if -len(inner) <= int(i) < len(inner) else None for i in idx]
    cut = _producer(value, "Slice")
    if cut is not None and len(cut.inputs) >= 3:
        inner = _shape_positions(cut.inputs[0], x)
        bounds = [const_array(v) if v is not None else None for v in list(cut.inputs[1:]) + [None] * 2][:4]
        if inner is not None and all(b is None or b.size == 1 for b in bounds) and bounds[0] is not None:
            steps = bounds[3]
            if steps is None or int(steps.reshape(-1)[0]) == 1:
                begin = int(bounds[0].reshape(-1)[0])
                begin = max(begin + len(inner), 0) if begin < 0 else begin
                return inner[begin : begin + length]
    concat = _producer(value, "Concat")
    if concat is not None:
        found: list[int | None] = []
        for part in concat.inputs:
            inner = _shape_positions(part, x) if part is not None else None
            if inner is None:
                n = None if part is None or part.shape is None or len(part.shape) != 1 else part.shape[0]
                if not isinstance(n, int):
                    return None
                inner = [None] * n
            found += inner
        return found if len(found) == length else None
    return [None] * length


@register("Resize")
def resize(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = A_1 ... A_k x (separable, linear): dx = g contracted along each resized axis a with ``A_a^T = Resize(I)``.

    Axes whose scale is a constant 1 (or whose output length equals the input length with ``sizes``: static, or
    read from ``Shape(x)`` by the sizes' Concat) are the identity in every mode but ``tf_crop_and_resize`` and are
    skipped. Refused: gradients for roi/scales,
    ``keep_aspect_ratio_policy`` other than stretch with ``sizes`` (the scale would couple the axes).
    """
    if any(cx.needs(i) for i in (1, 2, 3)):
        raise RuleUnavailable("gradient of Resize's roi or scales")
    x, y, g = node.inputs[0], node.outputs[0], gy[0]
    rank = cx.rank(x)
    roi, _ = _optional(cx, 1)
    scales, scales_c = _optional(cx, 2)
    sizes, sizes_c = _optional(cx, 3)
    if scales is None and sizes is None:
        raise RuleUnavailable("Resize without scales or sizes")
    if sizes is not None and scales is None and cx.attr("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise RuleUnavailable("Resize keep_aspect_ratio_policy other than stretch")
    ctm = cx.attr("coordinate_transformation_mode", "half_pixel")
    axes = cx.ints("axes") or list(range(rank))
    axes = [a + rank if a < 0 else a for a in axes]
    x_dims = list(x.shape)
    y_dims = list(y.shape) if y.shape is not None and len(y.shape) == rank else [None] * rank
    attrs = {name: cx.attr(name) for name in _RESIZE_COPIED if cx.attr(name) is not None}
    kept = _shape_positions(sizes, x) if sizes is not None and scales is None else None
    dx = g
    for k, axis in enumerate(axes):
        if ctm != "tf_crop_and_resize":
            if scales is not None and scales_c is not None and float(scales_c.reshape(-1)[k]) == 1.0:
                continue
            same = isinstance(x_dims[axis], int) and x_dims[axis] == y_dims[axis]
            if scales is None and (same or (sizes_c is not None and int(sizes_c.reshape(-1)[k]) == x_dims[axis])):
                continue
            if kept is not None and k < len(kept) and kept[k] == axis:
                continue  # the size is x's own length along the axis (Shape(x) in the sizes' Concat)
        if isinstance(x_dims[axis], int) and isinstance(y_dims[axis], int) and x_dims[axis] * y_dims[axis] > MAX_MATRIX:
            raise RuleUnavailable(f"Resize axis of {x_dims[axis]} -> {y_dims[axis]}: resize matrix too large")
        eye = _identity(cx, x, axis)
        pick = (cx.ints_const(k), cx.ints_const(k + 1))
        # The identity's first axis is kept (scale 1; OpenVINO's constant folding refuses the axes attribute)
        if scales is not None:
            one = _const_like(cx, np.ones(1, np.float32), scales)
            inputs = [eye, None, cx.op("Concat", [one, cx.op("Slice", [scales, *pick])], axis=0)]
        else:
            sizes_k = cx.op("Cast", [cx.op("Slice", [sizes, *pick])], to=ir.DataType.INT64)
            inputs = [eye, None, None, cx.op("Concat", [cx.dim(x, axis), sizes_k], axis=0)]
        if ctm == "tf_crop_and_resize":
            if roi is None:
                raise RuleUnavailable("tf_crop_and_resize without roi")
            n = len(axes)
            ends = (cx.ints_const(n + k), cx.ints_const(n + k + 1))
            zero, one = _const_like(cx, np.zeros(1, np.float32), roi), _const_like(cx, np.ones(1, np.float32), roi)
            parts = [zero, cx.op("Slice", [roi, *pick]), one, cx.op("Slice", [roi, *ends])]
            inputs[1] = cx.op("Concat", parts, axis=0)
        matrix = cx.op("Resize", inputs, extrapolation_value=0.0, **attrs)  # [in, out] = A^T
        dx = _contract(cx, dx, matrix, axis, rank)
    return [dx, None, None, None]


@register("Pad")
def pad(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = pad(x, pads) (negative pads crop).

    constant: dx = pad(g, -pads) (the crop of g where x sits, zeros where x was cropped away); d value = sum of g
    over the positions the constant filled. reflect/edge/wrap with constant non-negative pads and static lengths:
    g's borders folded back per axis (:func:`_fold_pad`, elementwise cost). Otherwise (cropping, run-time pads):
    every element of y copies one element of x, which Pad applied to a map of x's flat positions names:
    dx = ScatterElements-add of g at those positions (onnxruntime runs it serially, ~20x the forward).
    """
    x, pads, g = node.inputs[0], node.inputs[1], gy[0]
    value, axes = cx.input(2), cx.input(3)
    mode = cx.attr("mode", "constant")
    zero = cx.scalar(0.0, x)
    grads: list[ir.Value | None] = [None, None, None, None]
    if mode == "constant":
        if cx.needs(0):
            grads[0] = cx.op("Pad", [g, cx.op("Neg", [pads]), zero, axes], mode="constant")
        if value is not None and cx.needs(2):
            filled = cx.op("Pad", [cx.zeros_like(x), pads, cx.scalar(1.0, x), axes], mode="constant")
            total = cx.op("ReduceSum", [cx.op("Mul", [g, filled])], keepdims=0)
            grads[2] = cx.reshape_like(total, value)
        return grads
    if mode not in ("reflect", "edge", "wrap"):
        raise RuleUnavailable(f"Pad mode {mode}")
    if cx.needs(0):
        folded = _fold_pad(cx, x, pads, axes, mode, g)
        if folded is not None:
            grads[0] = folded
            return grads
        size = cx.op("Size", [x])
        positions = cx.op("Range", [cx.em.const(np.array(0, np.int64)), size, cx.em.const(np.array(1, np.int64))])
        positions = cx.reshape_like(positions, x)
        source = cx.op("Pad", [positions, pads, None, axes], mode=mode)
        flat = cx.op("Expand", [zero, cx.op("Reshape", [size, cx.ints_const(1)])])
        flat_g = cx.op("Reshape", [g, cx.ints_const(-1)])
        flat_source = cx.op("Reshape", [source, cx.ints_const(-1)])
        scattered = cx.op("ScatterElements", [flat, flat_source, flat_g], axis=0, reduction="add")
        grads[0] = cx.reshape_like(scattered, x)
    return grads


def _fold_pad(cx: Vjp, x: ir.Value, pads: ir.Value, axes: ir.Value | None, mode: str, g: ir.Value
              ) -> ir.Value | None:
    """dx of a reflect/edge/wrap Pad with constant non-negative pads and static lengths, one axis at a time
    (the forward is the composition of one-axis pads): g's middle part plus its two borders folded back onto
    the positions they copied (reversed for reflect, summed onto the end element for edge). ``None`` when the
    form does not fit (the scatter form serves it)."""
    pads_c = const_array(pads)
    rank = len(x.shape) if x.shape is not None else None
    if pads_c is None or rank is None or (pads_c < 0).any():
        return None
    if axes is None:
        axes_list = list(range(rank))
    else:
        axes_c = const_array(axes)
        if axes_c is None:
            return None
        axes_list = [int(a) + rank if a < 0 else int(a) for a in axes_c.reshape(-1)]
    pads_c = [int(p) for p in pads_c.reshape(-1)]
    k = len(axes_list)
    dims = list(x.shape)
    zero = cx.scalar(0.0, x)

    def cut(v: ir.Value, axis: int, start: int, end: int) -> ir.Value:
        return cx.op("Slice", [v, cx.ints_const(start), cx.ints_const(end), cx.ints_const(axis)])

    def pick(v: ir.Value, axis: int, positions: range) -> ir.Value:
        """Reversed borders by a Gather (OpenVINO 2026.4 does not return from compiling a float64 graph with a
        negative-step Slice there)."""
        return cx.op("Gather", [v, cx.ints_const(*positions)], axis=axis)

    def place(v: ir.Value, axis: int, before: int, after: int) -> ir.Value:
        amounts = [0] * (2 * rank)
        amounts[axis], amounts[rank + axis] = before, after
        return cx.op("Pad", [v, cx.ints_const(*amounts), zero], mode="constant")

    for i, axis in enumerate(axes_list):
        pb, pe, n = pads_c[i], pads_c[k + i], dims[axis]
        if not pb and not pe:
            continue
        if not isinstance(n, int) or (mode == "reflect" and max(pb, pe) > n - 1) or max(pb, pe) > n:
            return None
    for i, axis in enumerate(axes_list):
        pb, pe, n = pads_c[i], pads_c[k + i], dims[axis]
        if not pb and not pe:
            continue
        parts = [cut(g, axis, pb, pb + n)]
        if pb:
            if mode == "reflect":  # y[j] = x[pb - j]: reversed, the border lands on x[1 : pb + 1]
                parts.append(place(pick(g, axis, range(pb - 1, -1, -1)), axis, 1, n - 1 - pb))
            elif mode == "edge":
                parts.append(place(cx.reduce_sum(cut(g, axis, 0, pb), [axis], keepdims=1), axis, 0, n - 1))
            else:  # wrap: y[j] = x[n - pb + j]
                parts.append(place(cut(g, axis, 0, pb), axis, n - pb, 0))
        if pe:
            end = pb + n + pe
            if mode == "reflect":  # y[pb + n + j] = x[n - 2 - j]: reversed, it lands on x[n - 1 - pe : n - 1]
                parts.append(place(pick(g, axis, range(end - 1, pb + n - 1, -1)), axis, n - 1 - pe, 1))
            elif mode == "edge":
                parts.append(place(cx.reduce_sum(cut(g, axis, pb + n, end), [axis], keepdims=1), axis, n - 1, 0))
            else:  # wrap: y[pb + n + j] = x[j]
                parts.append(place(cut(g, axis, pb + n, end), axis, 0, n - pe))
        g = parts[0]
        for part in parts[1:]:
            g = cx.op("Add", [g, part])
    return g


@register("Tile")
def tile(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = tile(x, repeats): g seen as ``[r_0, d_0, r_1, d_1, ...]``, dx = its sum over the repeat axes."""
    x, repeats = node.inputs
    rank = cx.rank(x)
    if rank == 0:
        return [gy[0], None]
    parts = []
    for axis in range(rank):
        parts += [cx.op("Slice", [repeats, cx.ints_const(axis), cx.ints_const(axis + 1)]), cx.dim(x, axis)]
    split = cx.op("Reshape", [gy[0], cx.op("Concat", parts, axis=0)])
    return [cx.reduce_sum(split, list(range(0, 2 * rank, 2)), keepdims=0), None]


@register("DepthToSpace")
def depth_to_space(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """A permutation of the elements: dx = its inverse applied to g. DCR mode: SpaceToDepth; CRD mode: g as
    ``[N, C, H, b, W, b]`` transposed to ``[N, C, b, b, H, W]``."""
    x, g = node.inputs[0], gy[0]
    b = int(cx.attr("blocksize"))
    if cx.attr("mode", "DCR") == "DCR":
        return [cx.op("SpaceToDepth", [g], blocksize=b)]
    blocks = cx.op(
        "Concat",
        [cx.shape(x, 0, 1), cx.ints_const(-1), cx.shape(x, 2, 3), cx.ints_const(b), cx.shape(x, 3, 4),
         cx.ints_const(b)],
        axis=0,
    )
    moved = cx.op("Transpose", [cx.op("Reshape", [g, blocks])], perm=[0, 1, 3, 5, 2, 4])
    return [cx.reshape_like(moved, x)]


@register("SpaceToDepth")
def space_to_depth(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """The inverse permutation of DepthToSpace in DCR mode: dx = DepthToSpace(g, DCR)."""
    return [cx.op("DepthToSpace", [gy[0]], blocksize=int(cx.attr("blocksize")), mode="DCR")]
