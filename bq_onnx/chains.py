"""Weights read through layout ops: where a tensor's reduction axes are when it reaches its consumer through a
chain of ``Identity``, ``Slice``, ``Concat``, ``Transpose``, ``Unsqueeze``, ``Squeeze``, ``Expand``, ``Tile``,
``Reshape`` or ``Flatten``.

Exporters often keep one tensor and cut or turn it before use: PyTorch's LSTM export slices ``weight_ih``
``[4H, I]`` into its gates, re-concatenates them in ONNX's gate order and unsqueezes the direction axis before the
``LSTM``; a linear layer may be stored ``[N, K]`` and transposed before its ``MatMul``. Such a tensor is still a
weight; so is one broadcast (``Expand``: a batched MatMul over a shared weight) or repeated (``Tile``) before use,
each of its axes being one of the output's. Its reduction axes are its final consumers'
(:func:`bq_onnx.layout.reduction_axes_for`), followed back
through each op's axis mapping; where a ``Reshape``/``Flatten`` loses that mapping (the chain only changes the
shape), a 2-D tensor is taken as a plain ``(K, N)`` tensor, reduced along its first axis. The rewrite replaces the
tensor itself, so the chain keeps reading the decoded tensor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bq_onnx.layout import reduction_axes_for

if TYPE_CHECKING:  # onnx-ir is imported only where a Constant node's tensor is read: the protobuf view runs here too
    import onnx_ir as ir

#: Ops that move or cut a tensor's data without computing on it, and the input they move (the data input).
MOVES = frozenset({"Identity", "Slice", "Concat", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile", "Reshape",
                   "Flatten"})
#: ``AttributeType.INT`` (onnx-ir's and the protobuf's value).
INT_ATTRIBUTE = 2
#: How deep a chain is followed.
MAX_DEPTH = 8


class Lost(Exception):
    """The axis mapping is lost on the way (a Reshape or Flatten): only the chain's final consumer is known."""


def is_move(node: ir.Node, idx: int) -> bool:
    """Whether ``node`` reads its input ``idx`` as data it only moves."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in MOVES:
        return False
    return node.op_type == "Concat" or idx == 0


def chain_axes(node: ir.Node, idx: int, rank: int) -> tuple[int, ...] | None:
    """The reduction axes, in the space of the tensor that ``node`` reads at ``idx`` (a layout op), that every
    consumer at the end of the chain agrees on; None when a path ends anywhere else than a weight input, or the
    consumers disagree. A path whose axis mapping is lost gives the plain ``(K, N)`` reading of a 2-D tensor."""
    try:
        return _follow(node, rank, 0)
    except Lost:
        return (0,) if rank == 2 else None


def _follow(node: ir.Node, rank: int, depth: int) -> tuple[int, ...] | None:
    """Reduction axes in the input space of the layout op ``node`` (input rank ``rank``)."""
    if depth > MAX_DEPTH:
        return None
    mapping = _axis_map(node, rank)
    out = node.outputs[0] if node.outputs else None
    if out is None or out.is_graph_output() or not out.uses():
        return None
    out_rank = len(mapping) if mapping is not None else len(out.shape) if out.shape is not None else rank
    found: set[tuple[int, ...]] = set()
    lost = False
    for use in out.uses():
        reader, idx = use.node, use.idx
        try:
            if is_move(reader, idx):
                axes = _follow(reader, out_rank, depth + 1)
            else:
                attrs = {k: a.value for k, a in reader.attributes.items() if a.type == INT_ATTRIBUTE}
                axes = (reduction_axes_for(reader.op_type, idx, out_rank, attrs)
                        if reader.domain in ("", "ai.onnx") else None)
        except Lost:
            lost = True
            continue
        if axes is None:
            return None
        found.add(axes)
    if mapping is None or lost:
        raise Lost
    if len(found) != 1:
        return None
    back = tuple(sorted({mapping[a] for a in next(iter(found)) if mapping[a] is not None}))
    return back or None


def final_readers(node: ir.Node, depth: int = 0) -> list[ir.Node]:
    """The nodes at the end of the layout-op chain that starts at ``node`` (what really reads the tensor)."""
    out = node.outputs[0] if node.outputs else None
    if out is None or depth > MAX_DEPTH:
        return []
    found: list[ir.Node] = []
    for use in out.uses():
        found += final_readers(use.node, depth + 1) if is_move(use.node, use.idx) else [use.node]
    return list(dict.fromkeys(found))


def _axis_map(node: ir.Node, rank: int) -> list[int | None] | None:
    """For each output axis, the input axis it comes from (None: an inserted axis of size 1); None when the op
    loses the mapping (Reshape, Flatten, or axes that are not constants)."""
    op = node.op_type
    if op in ("Identity", "Slice", "Concat", "Tile"):
        return list(range(rank))
    if op == "Expand":  # numpy broadcasting: leading axes may be added, each input axis keeps its place from the end
        out_rank = _expanded_rank(node)
        return None if out_rank is None else [None] * (out_rank - rank) + list(range(rank))
    if op == "Transpose":
        perm = node.attributes.get("perm")
        return [int(p) for p in perm.value] if perm is not None else list(reversed(range(rank)))
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(node)
        if axes is None:
            return None
        if op == "Unsqueeze":
            total = rank + len(axes)
            inserted = {a % total for a in axes}
            kept = iter(range(rank))
            return [None if a in inserted else next(kept) for a in range(total)]
        removed = {a % rank for a in axes}
        return [a for a in range(rank) if a not in removed]
    return None


def _expanded_rank(node: ir.Node) -> int | None:
    """The rank of Expand's output: the inferred one, else the constant target shape's length (at least the
    input's)."""
    out, data = node.outputs[0], node.inputs[0]
    if out.shape is not None:
        return len(out.shape)
    shape = _const_tensor(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if shape is None or data is None or data.shape is None:
        return None
    return max(len(data.shape), int(shape.numpy().size))


def _axes(node: ir.Node) -> list[int] | None:
    """Unsqueeze/Squeeze axes: the attribute (opset < 13) or the constant second input."""
    attr = node.attributes.get("axes")
    if attr is not None:
        return [int(a) for a in attr.value]
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    tensor = _const_tensor(node.inputs[1])
    return None if tensor is None else [int(a) for a in tensor.numpy().reshape(-1)]


def _const_tensor(value: Any) -> Any:
    """The constant tensor behind ``value`` (an initializer's, or a ``Constant`` node's), or None."""
    if value.const_value is not None:
        return value.const_value
    import onnx_ir as ir

    return ir.convenience.get_const_tensor(value)
