"""The weight survey's rules, on any graph that looks like onnx-ir's: who reads a float tensor, along which axes,
and why it is kept in float.

Two callers walk a model with them: :mod:`bq_onnx.stages.weights` on the IR (``optimize``), and
:mod:`bq_onnx.proto_graph` on the protobuf alone (``bq-onnx inspect`` of a float model, which then starts without
onnx-ir). A graph view needs nodes with ``op_type``, ``domain``, ``name``, ``attributes`` (``.type``/``.value``),
``inputs``, ``outputs`` and ``graph``, and values with ``uses()``, ``shape``, ``const_value``,
``is_graph_input()`` and ``is_graph_output()``. No onnx-ir import here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from bq_onnx.chains import INT_ATTRIBUTE, chain_axes, final_readers, is_move
from bq_onnx.exclusions import Exclusions, Target
from bq_onnx.layout import reduction_axes_for
from bq_onnx.reads import SHAPE_ONLY, control_role

#: Ops that mean the graph (or part of it) is quantized already; their inputs are never touched again.
QUANTIZED_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "MatMulNBits",
        "MatMulInteger",
        "ConvInteger",
        "QLinearConv",
        "QLinearMatMul",
        "DynamicQuantizeLSTM",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "GatherBlockQuantized",
        "QAttention",
    }
)

#: Float element types a weight may have (onnx-ir's ``DataType`` names).
FLOAT_NAMES = frozenset({"FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE"})


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A float initializer (of any graph) that could hold a weight, what reads it, and why it is kept in float
    (``skipped``; empty for a weight)."""

    name: str
    scope: str  # "" for the main graph, else the subgraph path ("If:cond/then_branch/...")
    shape: tuple[int, ...]
    dtype: str
    readers: tuple[str, ...]
    skipped: str = ""


def quantized_ops_message(op_types: list[str]) -> list[str]:
    """The survey's note on quantized ops already in the graph (``op_types``: every node's), or none."""
    counts: dict[str, int] = {}
    for op in op_types:
        if op in QUANTIZED_OPS:
            counts[op] = counts.get(op, 0) + 1
    if not counts:
        return []
    found = ", ".join(f"{n} {op}" for op, n in sorted(counts.items()))
    return [f"model already contains quantized ops ({found}); those are left alone"]


def subgraph_label(node: Any, attribute: str) -> str:
    """One step of a subgraph path: ``If:cond/then_branch``."""
    return f"{node.op_type}:{node.name or '?'}/{attribute}"


def _reader(use: Any, paths: dict[int, str]) -> str:
    node = use.node
    where = paths.get(id(node.graph), "")
    return f"{node.op_type}:{node.name or '?'}" + (f" in {where}" if where else "")


def readers(use: Any, paths: dict[int, str]) -> list[str]:
    """Who reads the tensor at ``use``: its reader, or the consumers at the end of a layout-op chain (``LSTM:rnn
    through Slice``: one entry however many slices lead there), so that what a reader needs (a recurrent layer's
    constant weights) is known."""
    if not is_move(use.node, use.idx):
        return [_reader(use, paths)]
    through = use.node.op_type
    where = paths.get(id(use.node.graph), "")
    ends = [f"{n.op_type}:{n.name or '?'} through {through}" + (f" in {where}" if where else "")
            for n in final_readers(use.node)]
    return ends or [_reader(use, paths)]


def layout(value: Any, shape: tuple[int, ...], paths: dict[int, str]) -> tuple[tuple[int, ...] | None, str]:
    """The reduction axes every reader agrees on, or None and why the tensor is not a weight."""
    found: dict[tuple[int, ...], str] = {}
    unknown: list[str] = []
    for use in value.uses():
        node = use.node
        reader = _reader(use, paths)
        if node.op_type in QUANTIZED_OPS:
            return None, f"read by the quantized op {reader}"
        role = control_role(node.op_type, node.domain, use.idx)
        if role is not None:
            return None, f"read as {role} by {reader}"
        if node.op_type in SHAPE_ONLY and node.domain in ("", "ai.onnx"):
            continue
        attrs = {k: a.value for k, a in node.attributes.items() if a.type == INT_ATTRIBUTE}
        axes = None
        if is_move(node, use.idx):  # read through Slice/Transpose/...: its final consumers' layout
            axes = chain_axes(node, use.idx, len(shape))
        elif node.domain in ("", "ai.onnx"):
            axes = reduction_axes_for(node.op_type, use.idx, len(shape), attrs)
        if axes is None:
            unknown.append(f"{reader} input {use.idx}")
        else:
            found.setdefault(axes, reader)
    if unknown:
        also = f" (also read as a weight by {', '.join(found.values())})" if found else ""
        return None, f"unsupported layout: no known reduction axis for {', '.join(unknown)}{also}"
    if not found:
        return None, "read only for its shape" if value.uses() else "unused"
    if len(found) > 1:
        views = " and ".join(f"axes {list(a)} by {r}" for a, r in found.items())
        return None, f"unsupported layout: its readers reduce it along different axes ({views})"
    return next(iter(found)), ""


def reader_nodes(value: Any) -> tuple[tuple[str, str], ...]:
    """(op type, node name) of every node reading ``value``, and of the nodes at the end of a layout-op chain."""
    found: list[Any] = []
    for use in value.uses():
        found.append(use.node)
        if is_move(use.node, use.idx):
            found += final_readers(use.node)
    return tuple(dict.fromkeys((n.op_type, n.name or "") for n in found))


def classify(name: str, value: Any, scope: str, shape: tuple[int, ...], dtype: str, size: int,
             paths: dict[int, str], min_size: int, exclusions: Exclusions | None,
             messages: list[str], structural: dict[int, str] | None = None
             ) -> tuple[Candidate, tuple[int, ...] | None]:
    """One float initializer: its candidate row and, for a weight, its reduction axes (notes go to ``messages``);
    a weight that ``exclusions`` match stays in float with their reason. ``structural`` is
    :func:`bq_onnx.reads.structural_sources` of the graph: a tensor whose values reach a shape, scale or index
    input (also through arithmetic) is never a weight."""
    found_readers = tuple(dict.fromkeys(r for u in value.uses() for r in readers(u, paths)))
    why = ""
    axes = None
    if value.is_graph_input():
        why = "a graph input (overridable at run time)"
    elif value.is_graph_output():
        why = "a graph output"
    elif size < min_size:
        why = f"too small ({size} < {min_size} elements)"
    if not why:
        axes, why = layout(value, shape, paths)
        if not why and axes is not None and math.prod(shape[a] for a in axes) == 1:
            why = ("its reduction axes hold one element: every quantization block would be a single weight, its "
                   "scale costing more than its code")
        if not why and structural and id(value) in structural:  # its values also reach a Resize's scales, a shape
            why = f"read as {structural[id(value)]} (its values reach it through {_carriers(value)})"
        if why.startswith("read as"):
            messages.append(f"'{name}' is not a weight: {why}; left in float")
        elif why.startswith("unsupported layout: its readers") or "also read as a weight" in why:
            messages.append(f"'{name}' kept in float: {why}")
    if not why and exclusions:
        why = exclusions.reason(Target(name, scope, reader_nodes(value)))
    return Candidate(name, scope, shape, dtype, found_readers, why), (None if why else axes)


def _carriers(value: Any) -> str:
    """The ops that carry ``value`` on (for the message)."""
    return ", ".join(sorted({u.node.op_type for u in value.uses()})) or "the graph"


def fresh_name(name: str, seen: set[str]) -> str:
    """``name.1`` (``.2`` ...): the first suffix ``seen`` does not hold; how a repeated subgraph initializer is
    renamed, on onnx-ir (``UniqueInitializerNamesPass``) and on the protobuf view alike."""
    n = 1
    while f"{name}.{n}" in seen:
        n += 1
    return f"{name}.{n}"
