"""Control flow: the VJP rule of ``If``, and ``Loop``/``Scan`` unrolled before differentiation.

``If`` takes one branch per run (its condition is a scalar), so the gradient of a run follows the branch that run
took: the backward pass is an ``If`` on the same condition whose branches each recompute their forward branch (its
intermediate values never leave the forward ``If``) and differentiate it from the gradients of the ``If``'s
outputs back to every outer value the branch reads (weights moved to the main graph included); an outer value a
branch does not read gets zeros there. Estimators that want per-sample gradients run one sample per run, so each
sample's gradient follows its own branch. Nested ``If`` s recurse.

``Loop`` and ``Scan`` are unrolled (:func:`unroll_loops`, on the gradient model's copy before anything is
differentiated) when their trip count is known: a ``Loop`` with a constant trip count and a condition that stays
true (absent or constant, passed through the body unchanged), a ``Scan`` whose scanned axis has a static length.
Unrolled, they are plain nodes every other rule handles. The limit is :data:`MAX_UNROLL` steps (and
:data:`MAX_UNROLLED_NODES` copied nodes per loop); beyond it, or with a data-dependent trip count, the loop is
differentiated by its body (:mod:`vjp_loop`: a reverse ``Loop`` over the iterations the forward one ran).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir._cloner import Cloner

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, const_array, register
from bq_onnx.emitter import Emitter, GradientEmitter

#: Most steps a Loop or Scan is unrolled to (below it the unrolled gradient runs 1.5-1.8x faster than the one
#: by the body, benchmarks/loop_gradients.md; above it the node count outgrows the gain).
MAX_UNROLL = 64
#: Most nodes one unrolled loop may add (steps x body nodes).
MAX_UNROLLED_NODES = 20000
#: Ops whose rule handles what their subgraphs read from outside (Loop/Scan: to say why they were not unrolled).
OUTER_READING = frozenset({"If", "Loop", "Scan"})


class _BranchEmitter(GradientEmitter):
    """Nodes on a tape of its own (a backward branch), names and constants from the parent emitter (constants
    are main-graph initializers, which a branch reads from the outer scope)."""

    def __init__(self, parent: GradientEmitter) -> None:
        Emitter.__init__(self, parent.prefix)
        self.parent = parent

    def name(self, label: str) -> str:
        return self.parent.name(label)

    def const(self, array, label: str = "const") -> ir.Value:
        return self.parent.const(array, label)


# ----------------------------------------------------------------------------------------------- If


@register("If")
def if_rule(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Gradients of the outer values the branches read: an ``If`` on the same condition over two backward
    branches."""
    wanted = [v for v, want in zip(cx.outer, cx.outer_wants) if want]
    if not wanted:
        return []
    branches = {}
    blocked: set[str] = set()
    for key in ("then_branch", "else_branch"):
        attr = node.attributes.get(key)
        if attr is None or attr.type != ir.AttributeType.GRAPH:
            raise RuleUnavailable(f"If without a {key}")
        branches[key], inner = _backward_branch(cx, attr.value, gy, wanted, key)
        for label, (names, why) in inner.items():
            known = cx.blocked.setdefault(f"{key} {label}", (set(), why))
            known[0].update(names)
            blocked |= names
    results = cx.ops("If", [node.inputs[0]], len(wanted), **branches)
    for out, v in zip(results, wanted):
        out.dtype, out.shape = v.dtype, None if v.shape is None else v.shape.copy()
    grads = {v: out for v, out in zip(wanted, results) if v.name not in blocked}
    return [None] * len(node.inputs) + [grads.get(v) for v in cx.outer]


def _backward_branch(
    cx: Vjp, branch: ir.Graph, gy: list, wanted: list[ir.Value], key: str
) -> tuple[ir.Graph, dict[str, tuple[set[str], str]]]:
    """One backward branch: the forward branch recomputed, then differentiated from ``gy`` (outer values) to
    ``wanted``; returns it and what it blocks (inner label -> (wanted names, why))."""
    backward_scope = cx.differentiate
    if backward_scope is None:
        raise RuleUnavailable("no backward pass to differentiate its branches with")
    try:
        clone = branch.clone(allow_outer_scope_values=True)
    except (KeyError, ValueError) as exc:
        raise RuleUnavailable(f"its {key} cannot be copied ({exc})") from None
    _rename(clone, cx.em)
    em = _BranchEmitter(cx.em)
    seeds: dict[ir.Value, list[ir.Value]] = {}
    for out, g in zip(clone.outputs, gy):
        if g is not None:
            seeds.setdefault(out, []).append(g)
    grads, unsupported, reasons = backward_scope(em, clone, seeds, {v: frozenset({v.name}) for v in wanted})
    helper = Vjp(em, cx.node, [])
    outs = []
    for v in wanted:
        parts = grads.get(v, [])
        total = parts[0] if parts else helper.zeros_like(v)
        for part in parts[1:]:
            total = em.op("Add", [total, part])
        out = em.op("Identity", [total])
        out.dtype, out.shape = v.dtype, None if v.shape is None else v.shape.copy()
        outs.append(out)
    clone.extend(em.tape.nodes)
    clone.outputs.clear()
    clone.outputs.extend(outs)
    clone.name = cx.em.name(key)
    blocked: dict[str, tuple[set[str], str]] = {}
    for name, labels in unsupported.items():
        for label in labels:
            blocked.setdefault(label, (set(), reasons.get(label, "no rule")))[0].add(name)
    return clone, blocked


def _rename(graph: ir.Graph, em: Emitter) -> None:
    """Fresh names for the values ``graph`` (a copy) defines, so no value name repeats the forward graph's (node
    names stay: they label what blocks a gradient)."""
    for g in [graph, *graph.subgraphs()]:
        if g is not graph:
            for v in g.inputs:
                v.name = em.name("in")
        for v in list(g.initializers.values()):
            v.name = em.name("init")
        for node in g:
            label = em.name(f"fwd_{node.op_type}")
            for i, out in enumerate(node.outputs):
                out.name = f"{label}.{i}"


# ----------------------------------------------------------------------------------------------- Loop / Scan


def unroll_loops(graph: ir.Graph) -> bool:
    """Unroll, in place, every ``Loop`` and ``Scan`` of ``graph`` and its subgraphs (any depth) whose trip count
    is known and within the limits; whether any was."""
    changed = False
    for _ in range(10000):
        node = next((n for n in ir.traversal.RecursiveGraphIterator(graph)
                     if n.op_type in ("Loop", "Scan") and n.domain in ("", "ai.onnx") and _refusal(n) is None), None)
        if node is None:
            break
        (_unroll_loop if node.op_type == "Loop" else _unroll_scan)(node)
        changed = True
    return changed


def _refusal(node: ir.Node) -> str | None:
    """Why ``node`` (Loop or Scan) cannot be unrolled, or None."""
    body_attr = node.attributes.get("body")
    if body_attr is None or body_attr.type != ir.AttributeType.GRAPH:
        return "no body"
    body = body_attr.value
    if node.op_type == "Loop":
        steps = _loop_trip_count(node, body)
        if isinstance(steps, str):
            return steps
    else:
        steps = _scan_length(node)
        if isinstance(steps, str):
            return steps
    if steps < 1:
        return f"a trip count of {steps}"
    if steps > MAX_UNROLL:
        return f"a trip count of {steps}, over the unroll limit of {MAX_UNROLL} steps"
    if steps * len(body) > MAX_UNROLLED_NODES:
        return f"{steps} steps of {len(body)} nodes, over the unroll limit of {MAX_UNROLLED_NODES} nodes"
    return None


def _loop_trip_count(node: ir.Node, body: ir.Graph) -> int | str:
    trip = const_array(node.inputs[0] if node.inputs else None)
    if trip is None or trip.size != 1:
        return "a trip count that is not a constant"
    return _loop_condition(node, body) or int(trip.reshape(-1)[0])


def _loop_condition(node: ir.Node, body: ir.Graph) -> str | None:
    """Why the Loop ``node`` may stop before its trip count (a condition given or computed from the data), or
    None when its condition stays true."""
    cond = node.inputs[1] if len(node.inputs) > 1 else None
    if cond is not None:
        value = const_array(cond)
        if value is None or not bool(np.all(value)):
            return "a loop condition that is not constant true"
    out, cond_in = body.outputs[0], body.inputs[1]
    while out is not cond_in and out.producer() is not None and out.producer().op_type == "Identity":
        out = out.producer().inputs[0]
    value = const_array(out) if out is not cond_in else None
    if out is not cond_in and (value is None or not bool(np.all(value))):
        return "a condition computed in the body (the trip count depends on the data)"
    return None


def _scan_length(node: ir.Node) -> int | str:
    count = int(node.attributes["num_scan_inputs"].value)
    scanned = node.inputs[len(node.inputs) - count :]
    axes = _ints(node, "scan_input_axes", [0] * count)
    lengths = set()
    for value, axis in zip(scanned, axes):
        if value is None or value.shape is None:
            return "a scanned input of unknown shape"
        dim = value.shape[axis % len(value.shape)]
        if not isinstance(dim, int):
            return f"a symbolic sequence length ({dim})"
        lengths.add(int(dim))
    if len(lengths) != 1:
        return "scanned inputs of different lengths"
    return lengths.pop()


def _ints(node: ir.Node, name: str, default: list[int]) -> list[int]:
    attr = node.attributes.get(name)
    return default if attr is None else [int(v) for v in attr.value]


class _Unroller:
    """Copies of a loop body placed before the loop node, each reading the values the step before it made."""

    def __init__(self, node: ir.Node) -> None:
        self.node = node
        self.graph = node.graph
        self.body: ir.Graph = node.attributes["body"].value
        self.label = node.name or node.op_type
        self.nodes: list[ir.Node] = []
        self.count = 0
        for name in list(self.body.initializers):  # constants of the body: read from the enclosing graph
            value = self.body.initializers.pop(name)
            value.name = self.fresh(name)
            self.graph.register_initializer(value)

    def fresh(self, label: str) -> str:
        self.count += 1
        return f"{self.label}/unrolled_{self.count}/{label}"

    def add(self, op: str, inputs: list[ir.Value | None], **attrs) -> ir.Value:
        node = ir.node(op, inputs, attributes=attrs or None, name=self.fresh(op))
        node.outputs[0].name = node.name
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray) -> ir.Value:
        return self.add("Constant", [], value=ir.tensor(array))

    def step(self, bound: dict[ir.Value, ir.Value], step: int) -> list[ir.Value]:
        """One copy of the body with its inputs bound; the values of its outputs."""
        cloner = Cloner(attr_map={}, value_map=dict(bound), metadata_props={}, allow_outer_scope_values=True)
        for inner in self.body:
            copy = cloner.clone_node(inner)
            copy.name = self.fresh(f"step{step}/{inner.name or inner.op_type}")
            for i, out in enumerate(copy.outputs):
                out.name = f"{copy.name}.{i}"
            self.nodes.append(copy)
        mapped = cloner._value_map  # noqa: SLF001  the cloner's own map: body value -> its copy
        return [mapped.get(v, v) for v in self.body.outputs]

    def finish(self, results: list[ir.Value]) -> None:
        """Replace the loop's outputs by ``results`` (names kept) and the loop by the copies."""
        finals = [self.add("Identity", [r]) for r in results]
        self.graph.insert_before(self.node, self.nodes)
        outs = list(self.node.outputs)
        for old, new in zip(outs, finals):
            new.dtype, new.shape = old.dtype, None if old.shape is None else old.shape.copy()
            old.replace_all_uses_with(new, replace_graph_outputs=True)
        self.graph.remove(self.node, safe=True)
        for old, new in zip(outs, finals):
            if old.name:
                new.name = old.name


def _stack(u: _Unroller, parts: list[ir.Value], axis: int) -> ir.Value:
    axes = u.const(np.array([axis], np.int64))
    lifted = [u.add("Unsqueeze", [p, axes]) for p in parts]
    return lifted[0] if len(lifted) == 1 else u.add("Concat", lifted, axis=axis)


def _unroll_loop(node: ir.Node) -> None:
    u = _Unroller(node)
    steps = int(const_array(node.inputs[0]).reshape(-1)[0])
    body = u.body
    states = list(node.inputs[2:])
    n = len(states)
    true = u.const(np.array(True))
    scans: list[list[ir.Value]] = [[] for _ in body.outputs[1 + n :]]
    for i in range(steps):
        bound = {body.inputs[0]: u.const(np.array(i, np.int64)), body.inputs[1]: true}
        bound.update(zip(body.inputs[2:], states))
        outs = u.step(bound, i)
        states = outs[1 : 1 + n]
        for k, v in enumerate(outs[1 + n :]):
            scans[k].append(v)
    u.finish([*states, *(_stack(u, parts, 0) for parts in scans)])


def _unroll_scan(node: ir.Node) -> None:
    u = _Unroller(node)
    body = u.body
    count = int(node.attributes["num_scan_inputs"].value)
    n = len(node.inputs) - count
    steps = _scan_length(node)
    assert isinstance(steps, int)
    in_axes = _ints(node, "scan_input_axes", [0] * count)
    in_dirs = _ints(node, "scan_input_directions", [0] * count)
    k_out = len(body.outputs) - n
    out_axes = _ints(node, "scan_output_axes", [0] * k_out)
    out_dirs = _ints(node, "scan_output_directions", [0] * k_out)
    states = list(node.inputs[:n])
    scans: list[list[ir.Value]] = [[] for _ in range(k_out)]
    for t in range(steps):
        bound = dict(zip(body.inputs[:n], states))
        for j, value in enumerate(node.inputs[n:]):
            index = u.const(np.array(steps - 1 - t if in_dirs[j] else t, np.int64))
            bound[body.inputs[n + j]] = u.add("Gather", [value, index], axis=in_axes[j])
        outs = u.step(bound, t)
        states = outs[:n]
        for k, v in enumerate(outs[n:]):
            scans[k].append(v)
    stacked = [_stack(u, parts[::-1] if out_dirs[k] else parts, out_axes[k]) for k, parts in enumerate(scans)]
    u.finish([*states, *stacked])


# ----------------------------------------------------------------------------------------------- batching


def control_on_samples(graph: ir.Graph, per_sample: set[str]) -> str | None:
    """The first ``If`` condition or ``Loop`` trip count / condition (given, or computed in the body) that
    depends on the values of the inputs ``per_sample`` (those with a sample axis), as a line naming the node; None
    when there is none. Such a node takes one branch, or runs one number of iterations, for a whole batch, so a
    batched run does not compute what one-sample runs compute, and per-sample gradients need one-sample runs.
    Dependence is followed through every node (a node with subgraphs: all its outputs when anything in them
    depends) and into bodies (a carried value: its initial value, or its value after an iteration)."""
    dep: set[ir.Value] = {v for v in graph.inputs if v.name in per_sample}
    return _walk(graph, dep)


def _walk(graph: ir.Graph, dep: set[ir.Value]) -> str | None:
    for node in graph:
        label = f"{node.op_type} '{node.name}'"
        if node.op_type == "If" and node.inputs and node.inputs[0] in dep:
            return f"{label}: its condition depends on the samples"
        if node.op_type == "Loop" and any(v in dep for v in node.inputs[:2] if v is not None):
            return f"{label}: its trip count or condition depends on the samples"
        inner_dep = False
        for attr in node.attributes.values():
            subs = [attr.value] if attr.type == ir.AttributeType.GRAPH else (
                list(attr.value) if attr.type == ir.AttributeType.GRAPHS else [])
            for sub in subs:
                why = _walk_body(node, sub, dep)
                if why is not None:
                    return why
                inner_dep = inner_dep or any(v in dep for g in [sub, *sub.subgraphs()] for n in g
                                             for v in n.outputs) or any(v in dep for v in sub.outputs)
        if inner_dep or any(v in dep for v in node.inputs if v is not None):
            dep.update(node.outputs)
    return None


def _walk_body(node: ir.Node, body: ir.Graph, dep: set[ir.Value]) -> str | None:
    """Dependence inside one subgraph of ``node``: its inputs from the node's (Loop: carried values, to a fixed
    point over iterations; Scan: state and scanned inputs), then its nodes."""
    if node.op_type == "Loop":
        n = len(node.inputs) - 2
        pairs = [(body.inputs[2 + s], node.inputs[2 + s], body.outputs[1 + s]) for s in range(n)
                 if 2 + s < len(body.inputs) and 1 + s < len(body.outputs)]
        for inner, first, _ in pairs:
            if first is not None and first in dep:
                dep.add(inner)
        for _ in range(len(pairs) + 1):
            why = _walk(body, dep)
            if why is not None:
                return why
            grown = [inner for inner, _, last in pairs if last in dep and inner not in dep]
            if not grown:
                break
            dep.update(grown)
        if body.outputs and body.outputs[0] in dep:
            return f"Loop '{node.name}': its condition, computed in the body, depends on the samples"
        return None
    if node.op_type == "Scan":
        for inner, outer in zip(body.inputs, node.inputs):
            if outer is not None and outer in dep:
                dep.add(inner)
    return _walk(body, dep)
