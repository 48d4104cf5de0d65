"""VJP rules of index-addressed ops: GatherND, ScatterND, ScatterElements, and the masking Trilu.

Indices are integers and get no gradient; negative indices are wrapped before they address a scatter. A scatter
that overwrites (``reduction`` none) hides the overwritten data elements: they get zero, the updates get g at
their targets (with duplicate targets the forward itself is unspecified). ``mul``/``max``/``min`` reductions are
refused.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, register


def _wrap_nd(cx: Vjp, data: ir.Value, indices: ir.Value) -> ir.Value:
    """int64 ``indices`` (last axis: k coordinates into data) with negative coordinates wrapped."""
    dims = cx.static_dims(indices, -1) if indices.shape is not None and len(indices.shape) else None
    if not dims:
        raise RuleUnavailable("index depth (last dim of indices) unknown")
    idx = cx.op("Cast", [indices], to=ir.DataType.INT64)
    bound = cx.shape(data, 0, dims[0])
    return cx.op("Where", [cx.op("Less", [idx, cx.ints_const(0)]), cx.op("Add", [idx, bound]), idx])


def _wrap_elements(cx: Vjp, data: ir.Value, indices: ir.Value, axis: int) -> ir.Value:
    idx = cx.op("Cast", [indices], to=ir.DataType.INT64)
    return cx.op("Where", [cx.op("Less", [idx, cx.ints_const(0)]), cx.op("Add", [idx, cx.dim(data, axis)]), idx])


@register("GatherND")
def gather_nd(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y[i] = data[indices[i]] (``batch_dims`` 0): d data = ScatterND-add of g at the indices."""
    data, indices = node.inputs
    if int(cx.attr("batch_dims", 0)):
        raise RuleUnavailable("GatherND with batch_dims")
    if not cx.needs(0):
        return [None, None]
    idx = _wrap_nd(cx, data, indices)
    return [cx.op("ScatterND", [cx.zeros_like(data), idx, gy[0]], reduction="add"), None]


def _reduction(cx: Vjp) -> str:
    reduction = cx.attr("reduction", "none")
    if reduction not in ("none", "add"):
        raise RuleUnavailable(f"scatter reduction {reduction}")
    return reduction


@register("ScatterND")
def scatter_nd(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = data with updates written (none) or added (add) at the indices: d data = g (zero at overwritten
    positions); d updates = GatherND(g, indices)."""
    data, indices, updates = node.inputs
    g = gy[0]
    reduction = _reduction(cx)
    idx = _wrap_nd(cx, data, indices)
    d_data = d_updates = None
    if cx.needs(0):
        d_data = g if reduction == "add" else cx.op("ScatterND", [g, idx, cx.zeros_like(updates)])
    if cx.needs(2):
        d_updates = cx.op("GatherND", [g, idx])
    return [d_data, None, d_updates]


@register("ScatterElements")
def scatter_elements(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """The ScatterND rule along one ``axis``: d data = g (zero where overwritten), d updates = GatherElements(g)."""
    data, indices, updates = node.inputs
    g = gy[0]
    reduction = _reduction(cx)
    axis = int(cx.attr("axis", 0))
    idx = _wrap_elements(cx, data, indices, axis)
    d_data = d_updates = None
    if cx.needs(0):
        keep = reduction == "add"
        d_data = g if keep else cx.op("ScatterElements", [g, idx, cx.zeros_like(updates)], axis=axis)
    if cx.needs(2):
        # OpenVINO's GatherElements wants indices as long as the data off the axis: g is cut to them first, by
        # Gather with a Range (OpenVINO 2026.4 drops a Slice in front of a GatherElements)
        rank = cx.rank(data)
        cropped = g
        i_dims, d_dims = list(indices.shape or [None] * rank), list(data.shape or [None] * rank)
        for a in range(rank):
            if a == axis % rank or (isinstance(i_dims[a], int) and i_dims[a] == d_dims[a]):
                continue
            n = cx.op("Reshape", [cx.dim(indices, a), cx.em.const(np.zeros(0, np.int64))])
            zero, one = cx.em.const(np.array(0, np.int64)), cx.em.const(np.array(1, np.int64))
            cropped = cx.op("Gather", [cropped, cx.op("Range", [zero, n, one])], axis=a)
        d_updates = cx.op("GatherElements", [cropped, idx], axis=axis)
    return [d_data, None, d_updates]


@register("Trilu")
def trilu(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """y = x masked to a triangle (a fixed 0/1 mask): dx = the same Trilu of g."""
    k = cx.input(1)
    inputs = [gy[0]] if k is None else [gy[0], k]
    return [cx.op("Trilu", inputs, upper=int(cx.attr("upper", 1))), None]
