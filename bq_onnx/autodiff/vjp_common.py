"""What every vector-Jacobian-product rule needs: the rule registry and shape helpers.

A rule receives a :class:`Vjp` (the node being differentiated, which inputs want a gradient, and an emitter
that appends standard opset-21 nodes to the backward tape) and the gradients arriving at the node's outputs.
It returns one gradient (or ``None``) per input. A rule that cannot handle a node (an attribute combination it
does not implement, a rank it needs but shape inference did not find) raises :class:`RuleUnavailable`; the
autodiff pass then reports the node instead of failing.

Only ops that onnxruntime CPU and OpenVINO both run are emitted; shape arithmetic is int64 on small vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.emitter import GradientEmitter, i64

FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


class RuleUnavailable(Exception):
    """The rule does not cover this node (attributes, missing static shapes); the node is reported, not crashed on."""


Grads = Sequence["ir.Value | None"]
Rule = Callable[["Vjp", ir.Node, list["ir.Value | None"]], Grads]

#: op type -> rule; filled by the ``vjp_*`` family modules through :func:`register`.
RULES: dict[str, Rule] = {}


def register(*op_types: str) -> Callable[[Rule], Rule]:
    def wrap(rule: Rule) -> Rule:
        for op_type in op_types:
            assert op_type not in RULES, f"two rules for {op_type}"
            RULES[op_type] = rule
        return rule

    return wrap


def is_float(value: ir.Value) -> bool:
    """Float-typed, or of unknown type (then it may carry a gradient; a rule decides)."""
    return value.dtype is None or value.dtype in FLOAT_TYPES


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's content when it is an initializer or a ``Constant`` output, else ``None``."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


class Vjp:
    """The context of one rule call: the node, which inputs want gradients, and helpers that emit ops."""

    def __init__(self, em: GradientEmitter, node: ir.Node, wants: Sequence[bool], *,
                 outer: Sequence[ir.Value] = (), outer_wants: Sequence[bool] = (),
                 differentiate: Callable | None = None) -> None:
        self.em = em
        self.node = node
        self.wants = list(wants)
        #: values the node's subgraphs read from outside (a control-flow rule returns their gradients after the
        #: inputs'), whether each wants one, and what a subgraph blocks: inner label -> (outer names, why)
        self.outer = list(outer)
        self.outer_wants = list(outer_wants)
        self.blocked: dict[str, tuple[set[str], str]] = {}
        #: the autodiff's own backward pass over a graph (``gradient.backward_scope``), for rules that
        #: differentiate a subgraph (passed in: the rules cannot import the pass that imports them)
        self.differentiate = differentiate

    # ----- the node -----
    def needs(self, i: int) -> bool:
        return i < len(self.wants) and self.wants[i]

    def input(self, i: int) -> ir.Value | None:
        inputs = self.node.inputs
        return inputs[i] if i < len(inputs) else None

    def attr(self, name: str, default=None):
        attr = self.node.attributes.get(name)
        return default if attr is None else attr.value

    def ints(self, name: str, default: Sequence[int] | None = None) -> list[int] | None:
        value = self.attr(name)
        return None if value is None and default is None else [int(v) for v in (default if value is None else value)]

    # ----- static facts -----
    def rank(self, value: ir.Value) -> int:
        if value.shape is None:
            raise RuleUnavailable(f"the rank of '{value.name}' is unknown")
        return len(value.shape)

    def static_dims(self, value: ir.Value, start: int = 0) -> list[int] | None:
        """The value's dims from ``start`` on when all are known integers."""
        if value.shape is None:
            return None
        dims = list(value.shape)[start:]
        return [int(d) for d in dims] if all(isinstance(d, int) for d in dims) else None

    # ----- emitting -----
    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attrs) -> ir.Value:
        return self.em.op(op_type, inputs, **attrs)

    def ops(self, op_type: str, inputs: Sequence[ir.Value | None], num_outputs: int, **attrs) -> Sequence[ir.Value]:
        return self.em.ops(op_type, inputs, num_outputs, **attrs)

    def ints_const(self, *values: int) -> ir.Value:
        return self.em.const(i64(*values))

    def scalar(self, number: float, like: ir.Value) -> ir.Value:
        """A scalar constant in ``like``'s float type (``CastLike`` when that type is unknown)."""
        if like.dtype is not None:
            return self.em.const(np.array(number, dtype=like.dtype.numpy()))
        return self.op("CastLike", [self.em.const(np.array(number, dtype=np.float32)), like])

    def shape(self, value: ir.Value, start: int | None = None, end: int | None = None) -> ir.Value:
        return self.op("Shape", [value], start=start, end=end)

    def dim(self, value: ir.Value, axis: int) -> ir.Value:
        """``[value.shape[axis]]`` as a 1-element int64 tensor (negative axes allowed)."""
        return self.shape(value, axis, None if axis == -1 else axis + 1)

    def zeros_like(self, value: ir.Value) -> ir.Value:
        return self.op("Expand", [self.scalar(0.0, value), self.shape(value)])

    def reshape_like(self, g: ir.Value, like: ir.Value) -> ir.Value:
        return self.op("Reshape", [g, self.shape(like)])

    def transpose_last2(self, value: ir.Value, rank: int) -> ir.Value:
        perm = [*range(rank - 2), rank - 1, rank - 2]
        return self.op("Transpose", [value], perm=perm)

    def reduce_sum(self, value: ir.Value, axes: Sequence[int], keepdims: int) -> ir.Value:
        return self.op("ReduceSum", [value, self.ints_const(*axes)], keepdims=keepdims)

    def size_ratio(self, small: ir.Value, big: ir.Value, like: ir.Value) -> ir.Value:
        """``Size(small) / Size(big)`` in ``like``'s float type: the mean's scale, symbolic dims included."""
        num = self.op("CastLike", [self.op("Size", [small]), like])
        den = self.op("CastLike", [self.op("Size", [big]), like])
        return self.op("Div", [num, den])

    def own_copy(self, weight: ir.Value, axes: tuple[int, int] = (-2, -1)) -> ir.Value:
        """A constant ``weight``, as a tensor of its own, for a backward MatMul/Gemm/Conv that reads it in
        another orientation than the forward op.

        OpenVINO 2026.4's CPU plugin repacks a constant weight once per buffer: when a MatMul/Gemm reads a
        square weight transposed and another reads it as is (or a Conv and a ConvTranspose share a weight whose
        two channel dims are equal), one of them silently computes with the other's layout (measured; a copy
        is fine). ``Neg(Neg(w))`` is folded into a separate constant by both runtimes: no cost per run. Weights
        whose two ``axes`` differ in length, and activations, are returned as they are.
        """
        if ir.convenience.get_const_tensor(weight) is None:
            return weight
        dims = self.static_dims(weight)
        if dims is not None and len(dims) >= 2 and dims[axes[0]] != dims[axes[1]]:
            return weight
        return self.op("Neg", [self.op("Neg", [weight])])

    # ----- broadcasting -----
    def unbroadcast(
        self, g: ir.Value, g_shape: ir.Shape | None, x: ir.Value, x_shape: ir.Shape | None = None
    ) -> ir.Value:
        """Sum ``g`` (of broadcast shape ``g_shape``) down to the shape of ``x``.

        Axes that static shapes decide (known 1s, equal dims, equal symbols) are summed with constant axes. An
        axis whose dim is unknown is summed or kept at run time (``Where`` on ``shape(x)[i] == 1``, then a
        ``Slice`` to that length), which keeps every reduction's axes constant as OpenVINO requires. Only when
        the rank of ``g`` is unknown are the axes computed at run time (``NonZero``); onnxruntime runs that,
        OpenVINO's ONNX reader rejects it.
        """
        x_shape = x.shape if x_shape is None else x_shape
        if g_shape is None:
            return self._unbroadcast_dynamic_axes(g, x)
        rank = len(g_shape)
        if x_shape is None:
            ones = self.op("ConstantOfShape", [self._rank_gap(rank, x)], value=ir.tensor(i64(1)))
            padded = self.op("Concat", [ones, self.shape(x)], axis=0)
            for axis in range(rank):
                dim = self.op("Slice", [padded, self.ints_const(axis), self.ints_const(axis + 1)])
                g = self._sum_if_one(g, axis, dim)
            return self.reshape_like(g, x)
        plan = _reduction_plan(g_shape, x_shape)
        if plan is None:
            return self._unbroadcast_dynamic_axes(g, x)
        lead, kept, undecided = plan
        if kept:
            g = self.reduce_sum(g, kept, keepdims=1)
        for axis in undecided:
            g = self._sum_if_one(g, axis, self.dim(x, axis - len(lead)))
        if lead:
            g = self.reduce_sum(g, lead, keepdims=0)
        return g

    def _rank_gap(self, rank: int, x: ir.Value) -> ir.Value:
        """``[rank - rank(x)]`` computed at run time."""
        x_rank = self.op("Size", [self.shape(x)])
        gap = self.op("Sub", [self.em.const(np.array(rank, np.int64)), x_rank])
        return self.op("Reshape", [gap, self.ints_const(1)])

    def _sum_if_one(self, g: ir.Value, axis: int, dim: ir.Value) -> ir.Value:
        """Sum ``g`` over ``axis`` when the target length ``dim`` (``[1]`` int64) is 1, else keep it."""
        summed = self.reduce_sum(g, [axis], keepdims=1)
        picked = self.op("Where", [self.op("Equal", [dim, self.ints_const(1)]), summed, g])
        return self.op("Slice", [picked, self.ints_const(0), dim, self.ints_const(axis)])

    def _unbroadcast_dynamic_axes(self, g: ir.Value, x: ir.Value) -> ir.Value:
        sx, sg = self.shape(x), self.shape(g)
        extra = self.op("Sub", [self.op("Size", [sg]), self.op("Size", [sx])])
        ones = self.op(
            "ConstantOfShape",
            [self.op("Reshape", [extra, self.ints_const(1)])],
            value=ir.tensor(i64(1)),
        )
        padded = self.op("Concat", [ones, sx], axis=0)
        differs = self.op("Not", [self.op("Equal", [padded, sg])])
        axes = self.op("Reshape", [self.op("NonZero", [differs]), self.ints_const(-1)])
        # A leading axis of length 1 keeps the axes list non-empty (an empty list would mean "reduce all").
        axes = self.op("Concat", [self.ints_const(0), self.op("Add", [axes, self.ints_const(1)])], axis=0)
        lifted = self.op("Unsqueeze", [g, self.ints_const(0)])
        summed = self.op("ReduceSum", [lifted, axes], keepdims=1)
        return self.op("Reshape", [summed, sx])


def _same_dim(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.value is not None and a.value == b.value


def _reduction_plan(g_shape: ir.Shape, x_shape: ir.Shape) -> tuple[list[int], list[int], list[int]] | None:
    """(leading axes to drop, axes to sum keeping dims, axes decided at run time), axes of ``g``."""
    gd, xd = list(g_shape), list(x_shape)
    lead = len(gd) - len(xd)
    if lead < 0:
        return None
    kept, undecided = [], []
    for i, x_dim in enumerate(xd):
        g_dim = gd[lead + i]
        if isinstance(x_dim, int) and x_dim == 1:
            if not (isinstance(g_dim, int) and g_dim == 1):
                kept.append(lead + i)  # summing a length-1 axis is harmless when it was not broadcast after all
        elif isinstance(x_dim, int) or _same_dim(x_dim, g_dim):
            continue  # a known dim other than 1 is never broadcast
        elif isinstance(g_dim, int) and g_dim == 1:
            continue  # nothing to sum over
        else:
            undecided.append(lead + i)
    return list(range(lead)), kept, undecided
