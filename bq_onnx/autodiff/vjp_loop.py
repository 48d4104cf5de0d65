"""``Loop`` and ``Scan`` differentiated by their body, whatever their trip count.

:func:`~bq_onnx.autodiff.vjp_control.unroll_loops` unrolls the small loops whose trip count is a constant; the
others (a trip count given as an input, a condition computed in the body that exits early, more steps than the
unroll limit) are differentiated here, by their body:

* **Scan as Loop.** :func:`scans_as_loops` rewrites, on the gradient model's copy, every Scan that was not
  unrolled into the ``Loop`` that computes the same: the trip count is the scanned axis's length, each step
  ``Gather`` s its slice of every scanned input (index ``t``, or ``L-1-t`` for a reverse direction, along its
  axis) from the outer scope, and each stacked output is reversed (``Slice`` with step -1) and moved to its axis
  (``Transpose``) as ``scan_output_directions``/``scan_output_axes`` say. Only the Loop rule is then needed; a
  scanned input's gradient arrives through that ``Gather``.
* **The Loop rule.** The forward loop (the gradient model's copy of it, so it still runs once) also emits, as
  scan outputs, the iteration number and every carried value at the start of each iteration (what each step's
  backward needs). The number of iterations actually run is the length of the saved iteration numbers. The
  backward is a ``Loop`` over that many steps in reverse: step ``j`` takes iteration ``i = T-1-j``'s saved
  carried values and the slices ``i`` of the stacked outputs' gradients (``Gather``), recomputes the body from
  them (its intermediate values were never kept) and differentiates it with the autodiff's own backward pass.
  It carries the cotangents of the carried values (from the gradients of the final values, zeros where none)
  and accumulates the gradients of the outer values the body reads (weights), which it returns after the loop,
  with the carried cotangents as the gradients of the initial values. A condition computed in the body needs
  nothing more: the saved iterations are exactly those that ran, and each ran with a true condition.

Per-sample gradients: weights read inside a subgraph get no batched probe, so the estimators run one sample per
run and each sample's gradient follows its own trip count, as with ``If``; a model whose trip count or loop
condition depends on the samples is not batched at all (:func:`~bq_onnx.autodiff.vjp_control.control_on_samples`).

Limits (each refused with one line naming the node): a carried value whose type is unknown, or whose shape is
known to change between iterations or that grows by a ``Concat`` of itself (saving it as a scan output needs one
shape; a change that neither shows fails when the gradient model runs); a carried value blocked by an
op without a rule inside the body; a Scan output axis or a scanned input whose rank is unknown.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir._cloner import Cloner

from bq_onnx.autodiff.vjp_common import FLOAT_TYPES, Grads, RuleUnavailable, Vjp, register
from bq_onnx.autodiff.vjp_control import _BranchEmitter, _ints, _refusal, _rename

#: The node metadata key under which :func:`scans_as_loops` says why it left a Scan as it is.
_SCAN_REFUSAL = "bq_onnx.scan_refusal"


@register("Loop", "Scan")
def loop_rule(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """Gradients of the initial carried values and of the outer values the body reads, by a reverse ``Loop``
    over the iterations the forward one ran."""
    if node.op_type == "Scan":
        raise RuleUnavailable(node.meta.get(_SCAN_REFUSAL) or _refusal(node) or "a Scan not rewritten as a Loop")
    body_attr = node.attributes.get("body")
    if body_attr is None or body_attr.type != ir.AttributeType.GRAPH:
        raise RuleUnavailable("no body")
    if cx.differentiate is None:
        raise RuleUnavailable("no backward pass to differentiate its body with")
    return _Reverse(cx, node, body_attr.value).grads(gy)


class _Reverse:
    """The saved forward and the reverse loop of one ``Loop`` node."""

    def __init__(self, cx: Vjp, node: ir.Node, body: ir.Graph) -> None:
        self.cx, self.node, self.body = cx, node, body
        self.n = len(node.inputs) - 2
        if len(body.inputs) != 2 + self.n or len(body.outputs) < 1 + self.n:
            raise RuleUnavailable("a body whose inputs or outputs do not match the loop's")
        self.k = len(body.outputs) - 1 - self.n
        self.nodes = list(body)  # the body as the model has it (saved_forward adds to it)
        self.wanted = [v for v, want in zip(cx.outer, cx.outer_wants) if want]
        self.types = [self._state_type(s) for s in range(self.n)]
        #: carried values that carry a cotangent (float ones)
        self.floats = [s for s in range(self.n) if self.types[s] in FLOAT_TYPES]

    def _state_type(self, s: int) -> ir.DataType:
        for v in (self.node.inputs[2 + s], self.body.inputs[2 + s], self.body.outputs[1 + s], self.node.outputs[s]):
            if v is not None and v.dtype is not None:
                dtype = v.dtype
                break
        else:
            raise RuleUnavailable(f"carried value {s} has an unknown type")
        before, after = self.body.inputs[2 + s].shape, self.body.outputs[1 + s].shape
        if before is not None and after is not None and _differ(before, after):
            raise RuleUnavailable(f"carried value {s} changes shape between iterations ({before} -> {after})")
        if _grows(self.body.inputs[2 + s], self.body.outputs[1 + s]):
            raise RuleUnavailable(f"carried value {s} grows each iteration (a Concat of itself), so its iterations "
                                  f"cannot be stacked")
        return dtype

    def _shape(self, s: int) -> ir.Shape | None:
        for v in (self.node.outputs[s], self.node.inputs[2 + s], self.body.inputs[2 + s]):
            if v is not None and v.shape is not None:
                return v.shape.copy()
        return None

    # ----- the forward, saved
    def saved_forward(self) -> tuple[ir.Value, list[ir.Value]]:
        """The forward loop made to also stack, per iteration, its number and its carried values at the start
        (the gradient model's copy is changed in place, so the loop runs once): (the iteration numbers, the
        stacked carried values)."""
        cx, body, node = self.cx, self.body, self.node
        extra = []
        for v in [body.inputs[0], *body.inputs[2:]]:
            copy = ir.node("Identity", [v], name=cx.em.name("saved"))
            out = copy.outputs[0]
            out.name, out.dtype, out.shape = copy.name, v.dtype, None if v.shape is None else v.shape.copy()
            body.append(copy)
            extra.append(out)
        body.outputs.extend(extra)
        count = len(node.outputs)
        node.resize_outputs(count + len(extra))
        saved = list(node.outputs[count:])
        for v in saved:
            v.name = cx.em.name("saved")
        saved[0].dtype = ir.DataType.INT64
        for s, v in enumerate(saved[1:]):
            v.dtype = self.types[s]
        return saved[0], saved[1:]

    # ----- the backward
    def grads(self, gy: list) -> Grads:
        cx, node, n = self.cx, self.node, self.n
        wants_init = [cx.needs(2 + s) for s in range(n)]
        if not self.wanted and not any(wants_init):
            return [None] * (len(node.inputs) + len(cx.outer))
        iterations, saved = self.saved_forward()
        trips = cx.op("Size", [iterations])
        last = cx.op("Sub", [trips, cx.em.const(np.array(1, np.int64))])
        carried0 = [gy[s] if gy[s] is not None else cx.zeros_like(node.outputs[s]) for s in self.floats]
        acc0 = [cx.zeros_like(w) for w in self.wanted]
        body, blocked = self._backward_body(last, saved, gy)
        results = cx.ops("Loop", [trips, None, *carried0, *acc0], len(carried0) + len(acc0), body=body)
        for out, s in zip(results, self.floats):
            out.dtype, out.shape = self.types[s], self._shape(s)
        for out, w in zip(results[len(carried0):], self.wanted):
            out.dtype, out.shape = w.dtype, None if w.shape is None else w.shape.copy()
        init_grads = dict(zip(self.floats, results))
        outer_grads = {w: g for w, g in zip(self.wanted, results[len(carried0):]) if w.name not in blocked}
        din: list[ir.Value | None] = [None, None]
        din += [init_grads.get(s) if wants_init[s] else None for s in range(n)]
        return din + [outer_grads.get(v) for v in cx.outer]

    def _backward_body(self, last: ir.Value, saved: list[ir.Value], gy: list) -> tuple[ir.Graph, set[str]]:
        """Step ``j``: recompute iteration ``T-1-j`` from its saved carried values, differentiate it from the
        carried cotangents and the slices of the outputs' gradients; the body graph and the outer names its
        ops without a rule block."""
        cx, body, n = self.cx, self.body, self.n
        pre = _BranchEmitter(cx.em)
        j = _typed(ir.Value(name=cx.em.name("step")), ir.DataType.INT64, ir.Shape([]))
        cond = _typed(ir.Value(name=cx.em.name("cond")), ir.DataType.BOOL, ir.Shape([]))
        g_in = {s: _typed(ir.Value(name=cx.em.name("carried_grad")), self.types[s], self._shape(s))
                for s in self.floats}
        acc_in = [_typed(ir.Value(name=cx.em.name("grad_sum")), w.dtype, w.shape) for w in self.wanted]
        i = _typed(pre.op("Sub", [last, j]), ir.DataType.INT64, ir.Shape([]))
        bound: dict[ir.Value, ir.Value] = {body.inputs[0]: i, body.inputs[1]: pre.const(np.array(True))}
        states = {}
        for s in range(n):
            states[s] = _typed(pre.op("Gather", [saved[s], i], axis=0), self.types[s], self._shape(s))
            bound[body.inputs[2 + s]] = states[s]
        slices = {}
        for kk in range(self.k):
            g, out = gy[n + kk], body.outputs[1 + n + kk]
            if g is not None:
                slices[kk] = _typed(pre.op("Gather", [g, i], axis=0), out.dtype or g.dtype, out.shape)
        for inner in body.initializers.values():  # constants of the body: main-graph constants
            bound[inner] = cx.em.const(inner.const_value.numpy(), "body_const")
        cloner = Cloner(attr_map={}, value_map=dict(bound), metadata_props={}, allow_outer_scope_values=True)
        recomputed = [cloner.clone_node(inner) for inner in self.nodes]
        mapped = cloner._value_map  # noqa: SLF001  the cloner's own map: body value -> its copy
        graph = ir.Graph([j, cond, *g_in.values(), *acc_in], [], nodes=[*pre.tape.nodes, *recomputed],
                         name=cx.em.name("reverse_body"))
        _rename(graph, cx.em)
        seeds: dict[ir.Value, list[ir.Value]] = {}
        for s in self.floats:
            out = body.outputs[1 + s]
            seeds.setdefault(mapped.get(out, out), []).append(g_in[s])
        for kk, sliced in slices.items():
            out = body.outputs[1 + n + kk]
            seeds.setdefault(mapped.get(out, out), []).append(sliced)

        sources = {states[s]: frozenset({f"carried value {s}"}) for s in self.floats}
        sources.update({w: frozenset({w.name}) for w in self.wanted})
        back = _BranchEmitter(cx.em)
        grads, unsupported, reasons = cx.differentiate(back, graph, seeds, sources)
        blocked: set[str] = set()
        for name, labels in unsupported.items():
            for label in labels:
                why = reasons.get(label, "no rule")
                if name.startswith("carried value "):
                    raise RuleUnavailable(f"its body's {label} blocks {name} ({why})")
                known = cx.blocked.setdefault(f"body {label}", (set(), why))
                known[0].add(name)
                blocked.add(name)
        helper = Vjp(back, self.node, [])
        outs = [back.op("Identity", [cond])]
        for s in self.floats:
            parts = grads.get(states[s], [])
            outs.append(back.op("Identity", [_sum(back, parts) if parts else helper.zeros_like(states[s])]))
        for w, acc in zip(self.wanted, acc_in):
            parts = grads.get(w, [])
            outs.append(back.op("Add", [acc, _sum(back, parts)]) if parts else back.op("Identity", [acc]))
        for out, like in zip(outs, [cond, *g_in.values(), *acc_in]):
            out.dtype, out.shape = like.dtype, None if like.shape is None else like.shape.copy()
        graph.extend(back.tape.nodes)
        graph.outputs.extend(outs)
        return graph, blocked


def _typed(value: ir.Value, dtype: ir.DataType | None, shape: ir.Shape | None) -> ir.Value:
    value.dtype, value.shape = dtype, None if shape is None else shape.copy()
    return value


def _sum(em: _BranchEmitter, parts: list[ir.Value]) -> ir.Value:
    total = parts[0]
    for part in parts[1:]:
        total = em.op("Add", [total, part])
    return total


def _grows(first: ir.Value, last: ir.Value) -> bool:
    """Whether the body's output ``last`` is a ``Concat`` that reads the body's input ``first`` (through
    ``Identity`` nodes): a sequence that gets longer each iteration."""
    while last.producer() is not None and last.producer().op_type == "Identity":
        last = last.producer().inputs[0]
    node = last.producer()
    if node is None or node.op_type != "Concat":
        return False
    for v in node.inputs:
        while v is not None and v is not first and v.producer() is not None and v.producer().op_type == "Identity":
            v = v.producer().inputs[0]
        if v is first:
            return True
    return False


def _differ(a: ir.Shape, b: ir.Shape) -> bool:
    """Whether two shapes are known to differ (rank, or a static dim)."""
    if len(a) != len(b):
        return True
    return any(isinstance(x, int) and isinstance(y, int) and x != y for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------- Scan as Loop


def scans_as_loops(graph: ir.Graph) -> bool:
    """Rewrite, in place, every default-domain ``Scan`` of ``graph`` and its subgraphs (any depth) as the
    ``Loop`` that computes the same (run after :func:`unroll_loops`: the Scans left are those it could not
    unroll); whether any was. A Scan that cannot be rewritten stays, and its rule refuses with the reason."""
    changed = False
    seen: set[int] = set()
    for _ in range(10000):
        node = next((n for n in ir.traversal.RecursiveGraphIterator(graph)
                     if n.op_type == "Scan" and n.domain in ("", "ai.onnx") and id(n) not in seen), None)
        if node is None:
            break
        seen.add(id(node))
        why = _scan_as_loop(node, f"{node.name or 'Scan'}#{len(seen)}")
        if why is None:
            changed = True
        else:
            node.meta[_SCAN_REFUSAL] = why
    return changed


class _Before:
    """Nodes to place before one node of its graph, named after it."""

    def __init__(self, node: ir.Node, label: str) -> None:
        self.node, self.nodes, self.count, self.label = node, [], 0, label

    def add(self, op: str, inputs: list[ir.Value | None], dtype: ir.DataType | None = None,
            shape: ir.Shape | None = None, nodes: list[ir.Node] | None = None, **attrs) -> ir.Value:
        self.count += 1
        made = ir.node(op, inputs, attributes=attrs or None, name=f"{self.label}/as_loop_{self.count}/{op}")
        out = made.outputs[0]
        out.name, out.dtype, out.shape = made.name, dtype, shape
        (self.nodes if nodes is None else nodes).append(made)
        return out

    def const(self, array: np.ndarray) -> ir.Value:
        return self.add("Constant", [], ir.DataType.from_numpy(array.dtype), ir.Shape(list(array.shape)),
                        value=ir.tensor(array))

    def ints(self, *values: int) -> ir.Value:
        return self.const(np.array(values, np.int64))


def _scan_as_loop(node: ir.Node, label: str) -> str | None:
    """Replace one Scan by a Loop (its new values named after ``label``, unique per rewrite); the reason it cannot
    be, or None."""
    body_attr = node.attributes.get("body")
    if body_attr is None or body_attr.type != ir.AttributeType.GRAPH:
        return "no body"
    body: ir.Graph = body_attr.value
    count = int(node.attributes["num_scan_inputs"].value)
    n = len(node.inputs) - count
    k = len(body.outputs) - n
    if count < 1 or len(body.inputs) != len(node.inputs) or k < 0 or len(node.outputs) != len(body.outputs):
        return "a body whose inputs or outputs do not match the Scan's"
    scanned = list(node.inputs[n:])
    in_axes, in_dirs = _ints(node, "scan_input_axes", [0] * count), _ints(node, "scan_input_directions", [0] * count)
    out_axes = _ints(node, "scan_output_axes", [0] * k)
    out_dirs = _ints(node, "scan_output_directions", [0] * k)
    for value in scanned:
        if value is None or value.shape is None:
            return f"a scanned input ({value.name if value is not None else 'missing'}) of unknown rank"
    ranks = []
    for kk in range(k):
        out, inner = node.outputs[n + kk], body.outputs[n + kk]
        rank = len(out.shape) if out.shape is not None else (len(inner.shape) + 1 if inner.shape is not None
                                                              else None)
        if rank is None and out_axes[kk] != 0:
            return f"scan output {kk} on axis {out_axes[kk]} with an unknown rank"
        ranks.append(rank)

    b = _Before(node, label)
    first, axis0 = scanned[0], in_axes[0]
    axis0 %= len(first.shape)
    length = b.add("Reshape", [b.add("Shape", [first], ir.DataType.INT64, ir.Shape([1]), start=axis0, end=axis0 + 1),
                               b.ints()], ir.DataType.INT64, ir.Shape([]))
    last = b.add("Sub", [length, b.const(np.array(1, np.int64))], ir.DataType.INT64, ir.Shape([]))

    step = ir.Value(name=f"{b.label}/as_loop/iteration", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name=f"{b.label}/as_loop/cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    inner_nodes: list[ir.Node] = []
    back = None
    for j, (value, x) in enumerate(zip(scanned, body.inputs[n:])):
        if in_dirs[j]:
            back = back or b.add("Sub", [last, step], ir.DataType.INT64, ir.Shape([]), inner_nodes)
        sliced = b.add("Gather", [value, back if in_dirs[j] else step], x.dtype or value.dtype,
                       None if x.shape is None else x.shape.copy(), inner_nodes, axis=in_axes[j])
        x.replace_all_uses_with(sliced, replace_graph_outputs=True)
    for x in list(body.inputs[n:]):
        body.inputs.remove(x)
    body.inputs.insert(0, cond)
    body.inputs.insert(0, step)
    if len(body):
        body.insert_before(body[0], inner_nodes)
    else:
        body.extend(inner_nodes)
    body.outputs.insert(0, _identity_in(body, cond, f"{label}/as_loop/cond_out"))
    loop = ir.node("Loop", [length, None, *node.inputs[:n]], attributes={"body": body},
                   num_outputs=len(node.outputs), name=f"{b.label}/as_loop")
    b.nodes.append(loop)
    finals = list(loop.outputs[:n])
    for i, out in enumerate(loop.outputs):
        out.name = f"{label}/as_loop.{i}"
    for s, out in enumerate(finals):
        shape = node.outputs[s].shape
        out.dtype, out.shape = node.outputs[s].dtype, None if shape is None else shape.copy()
    for kk in range(k):
        y = loop.outputs[n + kk]
        old = node.outputs[n + kk]
        y.dtype = old.dtype or body.outputs[1 + n + kk].dtype
        if out_dirs[kk]:
            y = b.add("Slice", [y, b.ints(-1), b.ints(-(2 ** 63)), b.ints(0), b.ints(-1)], y.dtype)
        axis = out_axes[kk] % ranks[kk] if ranks[kk] is not None else 0
        if axis:
            perm = [*range(1, axis + 1), 0, *range(axis + 1, ranks[kk])]
            y = b.add("Transpose", [y], y.dtype, perm=perm)
        finals.append(y)
    graph = node.graph
    finals = [b.add("Identity", [v], old.dtype, None if old.shape is None else old.shape.copy())
              for v, old in zip(finals, node.outputs)]
    graph.insert_before(node, b.nodes)
    olds = list(node.outputs)
    for old, new in zip(olds, finals):
        old.replace_all_uses_with(new, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    for old, new in zip(olds, finals):
        if old.name:
            new.name = old.name
    return None


def _identity_in(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    """``Identity(value)`` appended to ``graph``: the loop condition passed through."""
    made = ir.node("Identity", [value], name=name)
    out = made.outputs[0]
    out.name, out.dtype, out.shape = made.name, ir.DataType.BOOL, ir.Shape([])
    graph.append(made)
    return out


def carried_shapes(graph: ir.Graph) -> bool:
    """Shapes for the carried values of every Loop of ``graph`` (any depth) where shape inference left none
    (ONNX's inference drops them, as a carried value may change shape between iterations), which the rules
    need the ranks of: the body's carried inputs get the rank of the initial value (their dims where the body's
    output agrees with it), the loop's final values the shape the initial value and the body's output agree
    on (dims that differ stay unknown; ranks that differ give nothing). Whether any shape was set (shape
    inference then fills the body from them)."""
    changed = False
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type != "Loop" or node.domain not in ("", "ai.onnx"):
            continue
        body_attr = node.attributes.get("body")
        if body_attr is None or body_attr.type != ir.AttributeType.GRAPH:
            continue
        body = body_attr.value
        n = len(node.inputs) - 2
        if len(body.inputs) != 2 + n or len(body.outputs) < 1 + n or len(node.outputs) < n:
            continue
        for s in range(n):
            first, inner, last, out = node.inputs[2 + s], body.inputs[2 + s], body.outputs[1 + s], node.outputs[s]
            if first is None or first.shape is None:
                continue
            if last.shape is not None and len(last.shape) != len(first.shape):
                continue
            agreed = ir.Shape([a if last.shape is not None and _same(a, b) else None
                               for a, b in zip(first.shape, last.shape or first.shape)])
            if inner.shape is None:
                inner.shape = agreed
                inner.dtype = inner.dtype or first.dtype
                changed = True
            if out.shape is None and last.shape is not None:
                out.shape = agreed.copy()
                out.dtype = out.dtype or first.dtype or last.dtype
                changed = True
    return changed


def _same(a, b) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return isinstance(a, int) and isinstance(b, int) and a == b
    return a.value is not None and a.value == b.value
