"""Probe runs from a cut onward: with one weight swapped, every node before the weight's first reader computes what
the FP32 model computes, so a probe runs only the nodes from a cut at or before that reader, fed the FP32 values
crossing the cut.

Why: the guard's tensor probes and the measured rounding choice run the model once per tensor (on up to 64
samples), and on all-MiniLM-L6-v2 they were about half of ``optimize``'s time in a profile, though a tensor of the last
layer changes a sixth of the network. A session per tensor costs about what it saves, so the graph's topological
order is cut at :data:`CUTS` - 1 evenly spaced places and each probe runs from the last cut before its tensor's
first reader: one session per cut, shared by the tensors after it.

The FP32 values crossing each cut are computed once (in the same run as the FP32 outputs) and kept where they fit
:data:`FRONTIER_BYTES` (cuts with the largest crossings dropped first: a decision on array sizes, so the same input
gives the same runs). Graphs of fewer than :data:`MIN_NODES` nodes, with local functions, not in topological order,
or a weight read inside a subgraph, run whole as before; so does a cut after a node with a subgraph (its outer-scope
reads are not inputs). The outputs equal the whole model's up to float32 rounding of kernels the runtime fuses
differently at the cut (``tests/test_cuts.py``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.errors import LimitError
from bq_onnx.graph import forward_model
from bq_onnx.runtimes.base import Session
from bq_onnx.runtimes.sessions import TempSessions

CUTS = 8
"""The topological order is cut into this many parts (so at ``CUTS - 1`` places)."""

MIN_NODES = 64
"""Graphs with fewer nodes run whole (a small model's run costs less than a cut's session)."""

FRONTIER_BYTES = 256 * 2**20
"""FP32 values crossing the cuts kept at most (all samples together)."""

Runs = list[list[np.ndarray]]


class Cuts:
    """Runs of the model's ``names`` on ``runs`` (a list of feeds) with one of ``weights`` swapped, from the last cut
    before that weight's first reader (:meth:`runs_for`)."""

    def __init__(self, model: ir.Model, names: Sequence[str], runs: Sequence[Mapping[str, np.ndarray]],
                 weights: Sequence[str]) -> None:
        self.model, self.names, self.runs, self.weights = model, list(names), list(runs), list(weights)
        self.sessions = TempSessions()
        self.cut_of: dict[str, int] = {}  # weight -> the cut (node index) its probes run from
        self.parts: dict[int, _Part] = {}
        self.cache: list[dict[str, np.ndarray]] = []
        self._built = False

    def runs_for(self, weight: str, value: np.ndarray, whole: Callable[[], Runs],
                 which: Sequence[int] | None = None) -> Runs:
        """``names`` on every run (``which``: on those runs, by index) with ``weight`` replaced by ``value``: from
        its cut, or ``whole()`` (the whole model's run on the same runs) where it has none."""
        if not self._built:
            self._built = True
            try:
                self._build()
            except LimitError:
                raise
            except Exception:  # noqa: BLE001 - a graph the cuts do not suit: every probe runs the whole model
                self.cut_of, self.parts, self.cache = {}, {}, []
        cut = self.cut_of.get(weight)
        if cut is None:
            return whole()
        part = self.parts[cut]
        try:
            if part.session is None:
                part.session = self.sessions.open(part.model)
            out = []
            chosen = range(len(self.runs)) if which is None else which
            for feeds, cached in ((self.runs[i], self.cache[i]) for i in chosen):
                given = {n: (feeds[n] if n in feeds else cached[n]) for n in part.frontier}
                given[weight] = value
                got = dict(zip(part.produced, part.session.run(given)))
                out.append([got[n] if n in got else cached[n] for n in self.names])
            return out
        except LimitError:
            raise
        except Exception:  # noqa: BLE001 - this cut does not run: its weights run the whole model from now on
            self.cut_of = {w: c for w, c in self.cut_of.items() if c != cut}
            return whole()

    def close(self) -> None:
        for part in self.parts.values():
            part.session = None
        self.sessions.close()

    def _build(self) -> None:
        graph = self.model.graph
        nodes = list(graph)
        if len(nodes) < MIN_NODES or self.model.functions or not self.runs or not _sorted(graph, nodes):
            return
        index = {id(node): i for i, node in enumerate(nodes)}
        nested = [i for i, node in enumerate(nodes) if _has_subgraph(node)]
        cuts = sorted({round(j * len(nodes) / CUTS) for j in range(1, CUTS)})
        cuts = [c for c in cuts if 0 < c < len(nodes) and not any(i >= c for i in nested)]
        wanted: dict[str, int] = {}
        for name in self.weights:
            value = graph.initializers.get(name)
            if value is None:
                continue
            readers = [index.get(id(node)) for node, _ in value.uses()]
            if not readers or None in readers:  # read inside a subgraph
                continue
            first = min(readers)
            before = [c for c in cuts if c <= first]
            if before:
                wanted[name] = before[-1]
        if not wanted:
            return
        parts = {c: _part(self.model, nodes, c, self.names, [w for w, cc in wanted.items() if cc == c])
                 for c in sorted(set(wanted.values()))}
        self._fill_cache(parts, wanted)

    def _fill_cache(self, parts: dict[int, _Part], wanted: dict[str, int]) -> None:
        """The FP32 values crossing every cut and the outputs computed before it, per run; the cuts whose crossings
        do not fit :data:`FRONTIER_BYTES` dropped, the largest first."""
        inputs = {v.name for v in self.model.graph.inputs}
        need = sorted({n for p in parts.values() for n in (*p.frontier, *p.upstream_outputs)} - inputs)
        if need:
            session = self.sessions.open(forward_model(self.model, need))
            first = dict(zip(need, session.run(dict(self.runs[0]))))
        else:
            session, first = None, {}
        size = {n: np.asarray(v).nbytes * len(self.runs) for n, v in first.items()}

        def total(kept: dict[int, _Part]) -> int:
            return sum(size[n] for n in {n for p in kept.values() for n in (*p.frontier, *p.upstream_outputs)}
                       if n in size)

        while parts and total(parts) > FRONTIER_BYTES:
            del parts[max(parts, key=lambda c: sum(size.get(n, 0) for n in parts[c].frontier))]
        keep = {n for p in parts.values() for n in (*p.frontier, *p.upstream_outputs)} - inputs
        for part in parts.values():  # a crossing value without a declared type takes its FP32 array's
            for v in part.model.graph.inputs:
                if v.type is None and v.name in first:
                    v.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(first[v.name]).dtype))
        cache = [{n: v for n, v in first.items() if n in keep}]
        for feeds in self.runs[1:]:
            if session is None:
                cache.append({})
                continue
            cache.append({n: v for n, v in zip(need, session.run(dict(feeds))) if n in keep})
        self.parts, self.cache = parts, cache
        self.cut_of = {w: c for w, c in wanted.items() if c in parts}


class _Part:
    """The nodes from one cut on: the model (the weights after the cut fed or kept), the values crossing the cut,
    the outputs it computes and those computed before it (taken from the FP32 run)."""

    def __init__(self, model: ir.Model, frontier: list[str], produced: list[str], upstream_outputs: list[str]) -> None:
        self.model, self.frontier, self.produced, self.upstream_outputs = model, frontier, produced, upstream_outputs
        self.session: Session | None = None


def _sorted(graph: ir.Graph, nodes: list[ir.Node]) -> bool:
    """Whether every node input is a graph input, an initializer or produced by an earlier node."""
    seen = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.name not in seen and v.const_value is None:
                return False
        seen.update(out.name for out in node.outputs)
    return True


def _has_subgraph(node: ir.Node) -> bool:
    return any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for attr in node.attributes.values())


def _part(model: ir.Model, nodes: list[ir.Node], cut: int, names: list[str], fed: list[str]) -> _Part:
    """The model of ``nodes[cut:]``: inputs the values they read from before the cut (not initializers), and the
    weights ``fed`` (initializers that may be fed, as the whole model's probe session has them)."""
    tail = nodes[cut:]
    produced = {out.name for node in tail for out in node.outputs}
    frontier: list[str] = []
    for node in tail:
        for v in node.inputs:
            if v is None or v.name in produced or v.name in frontier or v.is_initializer() or v.const_value is not None:
                continue
            frontier.append(v.name)
    outputs = [n for n in names if n in produced]
    upstream = [n for n in names if n not in produced]
    return _Part(_tail_model(model, tail, frontier, outputs, fed), frontier, outputs, upstream)


def _tail_model(model: ir.Model, tail: list[ir.Node], frontier: list[str], outputs: list[str],
                fed: list[str]) -> ir.Model:
    """A new model of copies of ``tail``; the initializers it reads are shared with ``model``, not copied."""
    graph = model.graph
    mapped: dict[str, ir.Value] = {}
    originals = {v.name: v for node in tail for v in node.inputs if v is not None}
    inputs = []
    for name in frontier:
        new = ir.Value(name=name, type=originals[name].type, shape=None)
        mapped[name] = new
        inputs.append(new)
    initializers = []

    def get(v: ir.Value | None) -> ir.Value | None:
        if v is None:
            return None
        if v.name not in mapped:  # an initializer or constant the tail reads
            new = ir.Value(name=v.name, type=v.type, shape=v.shape, const_value=v.const_value)
            mapped[v.name] = new
            initializers.append(new)
        return mapped[v.name]

    copies = []
    for node in tail:
        copy = ir.Node(node.domain, node.op_type, [get(v) for v in node.inputs], list(node.attributes.values()),
                       overload=node.overload, num_outputs=len(node.outputs), version=node.version, name=node.name)
        for old, new in zip(node.outputs, copy.outputs):
            new.name, new.type, new.shape = old.name, old.type, old.shape
            mapped[old.name] = new
        copies.append(copy)
    inputs += [mapped[w] for w in fed if w in mapped and mapped[w] in initializers]
    return ir.Model(ir.Graph(inputs, [mapped[n] for n in outputs], nodes=copies, initializers=initializers,
                             opset_imports=dict(graph.opset_imports), name=graph.name), ir_version=model.ir_version)
