"""Find the weights to quantize: large float initializers of the main graph and of every subgraph, read by
MatMul, Gemm, Conv, ConvTranspose, Gather or a recurrent layer's W/R (directly, or through Slice/Transpose/
Reshape-like layout ops: :mod:`bq_onnx.chains`), in one layout all their readers share; a tensor any reader uses
as a shape, scale or index is never one."""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator

import onnx_ir as ir

from bq_onnx.chains import chain_axes, final_readers, is_move
from bq_onnx.config import WeightsConfig
from bq_onnx.context import WeightInfo
from bq_onnx.errors import UnsupportedError
from bq_onnx.layout import WeightLayout, reduction_axes_for
from bq_onnx.reads import SHAPE_ONLY, control_role, structural_sources

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)

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


@dataclasses.dataclass
class FoundWeights:
    """The weights to quantize, every candidate with its readers, and what the search has to say (weights kept
    in float, quantized ops seen)."""

    weights: list[WeightInfo]
    messages: list[str]
    candidates: list[Candidate] = dataclasses.field(default_factory=list)


def scoped_graphs(graph: ir.Graph, path: str = "") -> Iterator[tuple[str, ir.Graph]]:
    """``graph`` and every subgraph below it (any depth), each with its path from the main graph."""
    yield path, graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subs = [(attr.name, attr.value)]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = [(f"{attr.name}[{i}]", g) for i, g in enumerate(attr.value)]
            else:
                continue
            for label, sub in subs:
                here = f"{node.op_type}:{node.name or '?'}/{label}"
                yield from scoped_graphs(sub, f"{path}/{here}" if path else here)


def _reader(use: ir.Usage, paths: dict[int, str]) -> str:
    node = use.node
    where = paths.get(id(node.graph), "")
    return f"{node.op_type}:{node.name or '?'}" + (f" in {where}" if where else "")


def _readers(use: ir.Usage, paths: dict[int, str]) -> list[str]:
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


def _layout(value: ir.Value, shape: tuple[int, ...], paths: dict[int, str]) -> tuple[tuple[int, ...] | None, str]:
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
        attrs = {k: a.value for k, a in node.attributes.items() if a.type == ir.AttributeType.INT}
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


def survey(model: ir.Model, config: WeightsConfig) -> FoundWeights:
    """Every float initializer of every graph, found a weight or skipped with why (the model is not changed)."""
    messages: list[str] = []
    quantized_ops: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type in QUANTIZED_OPS:
            quantized_ops[node.op_type] = quantized_ops.get(node.op_type, 0) + 1
    if quantized_ops:
        found = ", ".join(f"{n} {op}" for op, n in sorted(quantized_ops.items()))
        messages.append(f"model already contains quantized ops ({found}); those are left alone")

    graphs = list(scoped_graphs(model.graph))
    paths = {id(g): path for path, g in graphs}
    structural = structural_sources(ir.traversal.RecursiveGraphIterator(model.graph))
    weights: list[WeightInfo] = []
    candidates: list[Candidate] = []
    for path, graph in graphs:
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or value.dtype not in FLOAT_TYPES:
                continue
            shape = tuple(int(d) for d in tensor.shape)
            readers = tuple(dict.fromkeys(r for u in value.uses() for r in _readers(u, paths)))
            why = ""
            if value.is_graph_input():
                why = "a graph input (overridable at run time)"
            elif value.is_graph_output():
                why = "a graph output"
            elif tensor.size < config.min_size:
                why = f"too small ({tensor.size} < {config.min_size} elements)"
            elif any(fnmatch.fnmatchcase(name, pattern) for pattern in config.keep_fp):
                why = "kept in floating point (--keep-fp)"
                messages.append(f"kept '{name}' in floating point (--keep-fp)")
            if not why:
                axes, why = _layout(value, shape, paths)
                if not why and id(value) in structural:  # its values also reach a Resize's scales, a shape...
                    why = f"read as {structural[id(value)]} (its values reach it through {_carriers(value)})"
                if why.startswith("read as"):
                    messages.append(f"'{name}' is not a weight: {why}; left in float")
                elif why.startswith("unsupported layout: its readers") or "also read as a weight" in why:
                    messages.append(f"'{name}' kept in float: {why}")
            candidates.append(Candidate(name, path, shape, str(value.dtype.name).lower(), readers, why))
            if not why:
                weights.append(WeightInfo(name, value, WeightLayout(shape, axes), readers, path))
    return FoundWeights(weights, messages, candidates)


def _carriers(value: ir.Value) -> str:
    """The ops that carry ``value`` on (for the message)."""
    ops = sorted({u.node.op_type for u in value.uses()})
    return ", ".join(ops) or "the graph"


def find_weights(model: ir.Model, config: WeightsConfig) -> FoundWeights:
    """Every quantizable weight of ``model`` (the model is not changed); none at all is an error."""
    found = survey(model, config)
    if not found.weights:
        detail = "; the model looks quantized already" if any("quantized ops" in m for m in found.messages) else ""
        raise UnsupportedError(
            f"no quantizable weights (float initializers of at least {config.min_size} elements read by "
            f"MatMul, Gemm, Conv, ConvTranspose, Gather, LSTM, GRU or RNN){detail}"
        )
    return found
