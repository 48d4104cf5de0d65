"""The weight survey of a float model on its protobuf alone, so ``bq-onnx inspect`` starts without onnx-ir.

onnx-ir imports onnx (with ml_dtypes) and sympy, about a second before a byte is read. Listing a float model's
weights needs only who reads each tensor: this module builds a read-only view of a ``ModelProto`` with the
parts of onnx-ir's graph API that :mod:`bq_onnx.weight_rules` uses (values with their uses, nodes with their
attributes and graph), resolving names through subgraph scopes and ordering uses as onnx-ir's deserializer does
(a subgraph's reads of an outer tensor before its parent node's). It then does what ``inspect`` does on the IR:
lift ``Constant`` nodes of at least ``min_size`` elements to initializers (onnx-ir's
``LiftConstantsToInitializersPass``), give subgraph initializers unique names (``UniqueInitializerNamesPass``)
and classify every float initializer. ``tests/test_fast_start.py`` checks both paths list the same rows.

Standard library, protobuf and the survey's rules; numpy only to read a Squeeze/Unsqueeze's axes input; no onnx-ir.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

from bq_onnx.onnx_proto import data_type_bits, pb, tensor_bytes
from bq_onnx.reads import structural_sources
from bq_onnx.weight_rules import FLOAT_NAMES, Candidate, classify, fresh_name, subgraph_label

_GRAPH, _GRAPHS, _INT, _INTS, _TENSOR = 5, 10, 2, 7, 4  # AttributeProto.AttributeType


class Tensor:
    """A ``TensorProto`` with the few things the rules ask of a constant: its size and (small int) values."""

    __slots__ = ("proto",)

    def __init__(self, proto: Any) -> None:
        self.proto = proto

    @property
    def size(self) -> int:
        return math.prod(self.proto.dims)

    def numpy(self) -> Any:
        """The values of an integer tensor (axes of a Squeeze/Unsqueeze), as onnx-ir would give them."""
        import numpy as np

        t = self.proto
        dtype = {pb().TensorProto.INT64: np.int64, pb().TensorProto.INT32: np.int32}.get(t.data_type)
        if dtype is None:
            raise ValueError(f"tensor '{t.name}': not an integer tensor")
        if t.HasField("raw_data"):
            return np.frombuffer(t.raw_data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(tuple(t.dims))
        data = t.int64_data if t.data_type == pb().TensorProto.INT64 else t.int32_data
        return np.array(list(data), dtype=dtype).reshape(tuple(t.dims))


@dataclasses.dataclass(frozen=True)
class Ints:
    """A ``Constant`` node's ``value_int``/``value_ints``."""

    values: list[int]

    @property
    def size(self) -> int:
        return len(self.values)

    def numpy(self) -> Any:
        import numpy as np

        return np.array(self.values, dtype=np.int64)


@dataclasses.dataclass(eq=False)
class Attr:
    type: int
    value: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Usage:
    node: Node
    idx: int


@dataclasses.dataclass(eq=False)
class Value:
    name: str
    shape: tuple | None = None
    const_value: Tensor | Ints | None = None
    graph_input: bool = False
    graph_output: bool = False
    used_by: list[Usage] = dataclasses.field(default_factory=list)
    made_by: Node | None = None

    def uses(self) -> list[Usage]:
        return self.used_by

    def producer(self) -> Node | None:
        return self.made_by

    def is_graph_input(self) -> bool:
        return self.graph_input

    def is_graph_output(self) -> bool:
        return self.graph_output


@dataclasses.dataclass(eq=False)
class Node:
    op_type: str
    domain: str
    name: str
    graph: Graph
    inputs: list[Value | None]
    outputs: list[Value]
    attributes: dict[str, Attr]


@dataclasses.dataclass(eq=False)
class Graph:
    nodes: list[Node] = dataclasses.field(default_factory=list)
    initializers: dict[str, Value] = dataclasses.field(default_factory=dict)

    def __iter__(self) -> Iterator[Node]:
        return iter(list(self.nodes))


def _shape(info: Any) -> tuple | None:
    t = info.type
    if t.WhichOneof("value") != "tensor_type" or not t.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.tensor_type.shape.dim)


def _lookup(scopes: list[dict[str, Value]], name: str) -> Value | None:
    for scope in reversed(scopes):
        if name in scope:
            return scope[name]
    return None


def build(graph: Any, scopes: list[dict[str, Value]] | None = None) -> Graph:
    """The view of a ``GraphProto`` (and its subgraphs) with every value's uses, as onnx-ir deserializes it."""
    scopes = [] if scopes is None else scopes
    scope: dict[str, Value] = {}
    scopes.append(scope)
    view = Graph()
    for info in graph.input:
        scope[info.name] = Value(info.name, _shape(info), graph_input=True)
    for t in graph.initializer:
        value = scope.get(t.name) or Value(t.name, tuple(t.dims))
        value.const_value = Tensor(t)
        scope[t.name] = view.initializers[t.name] = value
    infos = {info.name: info for info in graph.value_info}
    for node in graph.node:
        for name in node.output:
            if name:
                scope[name] = Value(name, _shape(infos[name]) if name in infos else None)
    for proto in graph.node:
        inputs: list[Value | None] = []
        for name in proto.input:
            value = _lookup(scopes, name) if name else None
            if name and value is None:
                value = scope[name] = Value(name, _shape(infos[name]) if name in infos else None)
            inputs.append(value)
        attributes = {a.name: _attribute(a, scopes) for a in proto.attribute}  # subgraph uses come first
        node = Node(proto.op_type, proto.domain, proto.name, view, inputs,
                    [scope[name] if name else Value("") for name in proto.output], attributes)
        for idx, value in enumerate(inputs):
            if value is not None:
                value.used_by.append(Usage(node, idx))
        for value in node.outputs:
            value.made_by = node
        if proto.op_type == "Constant" and proto.domain == "" and len(proto.attribute) == 1 and node.outputs:
            node.outputs[0].const_value = _constant(proto.attribute[0])  # what get_const_tensor finds there
        view.nodes.append(node)
    for info in graph.output:
        value = _lookup(scopes, info.name)
        if value is None:
            value = scope[info.name] = Value(info.name)
        value.graph_output = True
        shape = _shape(info)
        if shape is not None:
            value.shape = shape
    scopes.pop()
    return view


def _constant(a: Any) -> Tensor | Ints | None:
    if a.name == "value" and a.type == _TENSOR:
        return Tensor(a.t)
    if a.name == "value_int":
        return Ints([a.i])
    if a.name == "value_ints":
        return Ints(list(a.ints))
    return None


def _attribute(a: Any, scopes: list[dict[str, Value]]) -> Attr:
    if a.type == _GRAPH:
        return Attr(a.type, build(a.g, scopes))
    if a.type == _GRAPHS:
        return Attr(a.type, [build(g, scopes) for g in a.graphs])
    if a.type == _INT:
        return Attr(a.type, a.i)
    if a.type == _INTS:
        return Attr(a.type, list(a.ints))
    if a.type == _TENSOR:
        return Attr(a.type, Tensor(a.t))
    return Attr(a.type, None)


def scoped_graphs(graph: Graph, path: str = "") -> Iterator[tuple[str, Graph]]:
    """``graph`` and every subgraph below it, each with its path (as :func:`bq_onnx.stages.weights.scoped_graphs`)."""
    yield path, graph
    for node in graph:
        for name, attr in node.attributes.items():
            subs = [(name, attr.value)] if attr.type == _GRAPH else \
                [(f"{name}[{i}]", g) for i, g in enumerate(attr.value)] if attr.type == _GRAPHS else []
            for label, sub in subs:
                here = subgraph_label(node, label)
                yield from scoped_graphs(sub, f"{path}/{here}" if path else here)


def lift_constants(graph: Graph, min_size: int) -> None:
    """onnx-ir's ``LiftConstantsToInitializersPass(size_limit=min_size)``: a ``Constant`` node with one ``value``
    attribute of at least ``min_size`` elements, not a graph output, becomes its graph's initializer."""
    for node in graph:
        if node.op_type == "Constant" and node.domain in ("", "onnx.ai") and not node.outputs[0].is_graph_output() \
                and len(node.attributes) == 1 and "value" in node.attributes \
                and node.attributes["value"].type == _TENSOR and node.attributes["value"].value.size >= min_size:
            value = node.outputs[0]
            value.const_value = node.attributes["value"].value
            value.shape = tuple(value.const_value.proto.dims)
            graph.initializers[value.name] = value
            graph.nodes.remove(node)
        for attr in node.attributes.values():
            for sub in [attr.value] if attr.type == _GRAPH else attr.value if attr.type == _GRAPHS else []:
                lift_constants(sub, min_size)


def unique_names(graphs: list[Graph]) -> None:
    """``UniqueInitializerNamesPass``: a subgraph initializer whose name an earlier graph's has becomes
    ``name.1`` (``.2`` ...), moved to the end of its graph's initializers as onnx-ir re-registers it."""
    seen: set[str] = set()
    for graph in graphs:
        for name, value in list(graph.initializers.items()):
            if name not in seen:
                seen.add(name)
                continue
            del graph.initializers[name]
            value.name = fresh_name(name, seen)
            graph.initializers[value.name] = value
            seen.add(value.name)


@dataclasses.dataclass
class Survey:
    """What ``inspect`` lists of a float model: every candidate, the weights' reduction axes, the stored bytes of
    every initializer by name (after lifting), and the main graph's nodes."""

    candidates: list[Candidate]
    weights: list[Candidate]
    initializer_bytes: dict[str, int]
    all_initializer_bytes: int
    nodes: list[tuple[str, str]]


def survey(model: Any, min_size: int) -> Survey:
    """The weight survey of a ``ModelProto`` (the proto is not changed)."""
    main = build(model.graph)
    lift_constants(main, min_size)
    graphs = list(scoped_graphs(main))
    unique_names([g for _, g in graphs])
    paths = {id(g): path for path, g in graphs}
    names = {v: k for k, v in pb().TensorProto.DataType.items()}
    bits = data_type_bits()
    candidates: list[Candidate] = []
    weights: list[Candidate] = []
    sizes: dict[str, int] = {}
    total = 0
    messages: list[str] = []
    structural = structural_sources(node for _, graph in graphs for node in graph)
    for path, graph in graphs:
        for name, value in graph.initializers.items():
            t = value.const_value.proto
            nbytes = tensor_bytes(t, bits)
            sizes.setdefault(name, nbytes)
            total += nbytes
            dtype = names.get(t.data_type, "")
            if dtype not in FLOAT_NAMES:
                continue
            shape = tuple(int(d) for d in t.dims)
            candidate, axes = classify(name, value, path, shape, dtype.lower(), value.const_value.size, paths,
                                       min_size, None, messages, structural)
            candidates.append(candidate)
            if axes is not None:
                weights.append(candidate)
    return Survey(candidates, weights, sizes, total, [(n.domain, n.op_type) for n in main])

