"""Which weights feed a graph output directly: the heads (a classifier's last layer, a CTC head, a detector's
last convolution per branch).

Why: the expected-loss tables come from a local, diagonal curvature; a head's rows that calibration seldom
exercises (classes never predicted) look free to the allocator, yet coarse heads destroy the model (DESIGN.md,
Heads). :func:`bq_onnx.stages.allocate.head_floors` keeps them at the uniform width.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx_ir as ir

from bq_onnx.context import WeightInfo


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    """Every graph inside ``node``'s attributes, at any depth."""
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs = [attr.value]
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs = list(attr.value)
        else:
            continue
        for g in graphs:
            yield g
            for inner in g:
                yield from _subgraphs(inner)


def head_weights(model: ir.Model, weights: Iterable[WeightInfo | str]) -> set[str]:
    """The names of the ``weights`` that are heads.

    The rule, on the main graph: a weight's consumers are the main-graph nodes that read it (a node whose
    subgraph reads it counts as the reader). The weight is a head when, following values forward from a consumer,
    a main-graph output is reached without entering another node that reads one of ``weights`` (any op in between
    counts as passing: Add, Reshape, Transpose, Softmax, activations, Concat, ArgMax...). So each branch's last
    weighted layer is a head, and a hidden layer is not (the next weighted layer stands between it and the output).
    Pure graph walk: nothing is run, the model is not changed.
    """
    graph = model.graph
    names = {w if isinstance(w, str) else w.name for w in weights}
    owner: dict[int, ir.Node] = {}  # id(subgraph) -> the main-graph node holding it
    for node in graph:
        for sub in _subgraphs(node):
            owner[id(sub)] = node

    def top(node: ir.Node) -> ir.Node | None:
        return node if node.graph is graph else owner.get(id(node.graph))

    readers: dict[str, set[ir.Node]] = {}
    for g in [graph, *(sub for node in graph for sub in _subgraphs(node))]:
        for name, value in g.initializers.items():
            if name in names:
                found = {top(use.node) for use in value.uses()} - {None}
                readers.setdefault(name, set()).update(found)  # type: ignore[arg-type]
    weighted = {id(n) for found in readers.values() for n in found}
    outputs = {id(v) for v in graph.outputs}

    def reaches_output(start: set[ir.Node]) -> bool:
        mine = {id(n) for n in start}
        todo, seen = list(start), set(mine)
        while todo:
            node = todo.pop()
            for out in node.outputs:
                if id(out) in outputs:
                    return True
                for use in out.uses():
                    nxt = top(use.node)
                    if nxt is None or id(nxt) in seen:
                        continue
                    if id(nxt) in weighted and id(nxt) not in mine:
                        continue  # another weighted layer stands between this weight and the output
                    seen.add(id(nxt))
                    todo.append(nxt)
        return False

    return {name for name, found in readers.items() if found and reaches_output(found)}
