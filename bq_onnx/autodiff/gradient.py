"""Reverse-mode automatic differentiation: a gradient model made of standard opset-21 ops.

onnxruntime has no gradient API and onnxruntime-training is gone (DESIGN.md, "Runtime facts"), so posterior
estimators get their gradients from a second ONNX model: the forward graph plus, for every node between the
chosen weights and the loss, the vector-Jacobian product of that node (rules in :mod:`vjp_rules`). One run of
the gradient model returns the loss and all gradients; it runs in onnxruntime CPU and OpenVINO alike.

Only nodes on a path from some ``wrt`` weight to the loss are differentiated. A node on such a path without a
rule (or whose rule refuses its attributes) makes every weight upstream of it unsupported: those weights are
reported in :attr:`GradientGraph.unsupported` and get no gradient output, the others still do.

Control flow (:mod:`vjp_control`): a weight stored inside a subgraph is moved to the main graph's initializers
in the gradient model (the subgraph reads it from the outer scope, as ONNX allows), so every weight is a
``wrt``; ``If`` is differentiated by the branch its condition takes on the run (each backward branch recomputes
its forward branch), ``Loop``/``Scan`` with a small constant trip count are unrolled first, the other Scans
rewritten as Loops, and every Loop left differentiated by its body (:mod:`vjp_loop`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, ShapeInferencePass

from bq_onnx.autodiff.vjp_common import Vjp, is_float
from bq_onnx.autodiff.vjp_control import OUTER_READING, unroll_loops
from bq_onnx.autodiff.vjp_loop import carried_shapes, scans_as_loops
from bq_onnx.autodiff.vjp_rules import NON_DIFFERENTIABLE, RULES, RuleUnavailable, rule_for
from bq_onnx.emitter import GradientEmitter

logger = logging.getLogger(__name__)

#: The emitted ops (ScatterND/ScatterElements with reduction, AveragePool dilations, Split's sizes input) need it.
MIN_OPSET = 21
WEIGHT_TYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)


@dataclasses.dataclass
class GradientGraph:
    """A gradient model and how to read it.

    ``model``'s outputs are exactly ``[loss, *gradients in wrt order]``. A non-scalar loss value is summed over
    all its elements first (``ReduceSum``); ``loss`` then names that sum.
    """

    model: ir.Model  # a new model; the input model is never modified
    loss: str  # name of the scalar loss output
    gradients: dict[str, str]  # weight (initializer) name -> name of its gradient output (same shape and dtype)
    unsupported: dict[str, list[str]]  # weight name -> ["OpType 'node_name'", ...] blocking its gradient
    reasons: dict[str, str] = dataclasses.field(default_factory=dict)  # "OpType 'node_name'" -> why it blocks


def supported_ops() -> frozenset[str]:
    """Op types the pass can cross: those with a VJP rule and those treated as constants (no gradient)."""
    return frozenset(RULES) | NON_DIFFERENTIABLE


def build_gradient_model(
    model: ir.Model, loss: str, wrt: Sequence[str], *, weights_as_inputs: bool = False,
    cache: str | os.PathLike | None = None,
) -> GradientGraph:
    """Differentiate the value ``loss`` with respect to the initializers ``wrt``.

    Args:
        model: opset >= 21 model; it is cloned, never changed.
        loss: name of a float value; summed over all its elements when it is not a scalar.
        wrt: float32/float64 initializer names, of the main graph or of any subgraph.
        weights_as_inputs: also make the ``wrt`` initializers graph inputs (their stored values stay the defaults),
            so one session can evaluate gradients at perturbed weights.
        cache: a folder of gradient graphs keyed by content hash (:mod:`bq_onnx.autodiff.cache`): taken from
            there when a valid entry is, else built and stored.
    """
    if cache is not None:
        from bq_onnx.autodiff.cache import cached_gradient_model

        return cached_gradient_model(cache, model, loss, wrt, weights_as_inputs,
                                     lambda: build_gradient_model(model, loss, wrt,
                                                                  weights_as_inputs=weights_as_inputs),
                                     GradientGraph)
    new = model.clone()
    graph = new.graph
    if new.opset_imports.get("", 0) < MIN_OPSET:
        raise ValueError(f"autodiff needs default-domain opset >= {MIN_OPSET}; upgrade the model first")
    hoist_initializers(graph, wrt)
    _infer_shapes(new)
    graph.sort()
    if unroll_loops(graph) | scans_as_loops(graph):
        _infer_shapes(new)
        graph.sort()
    for _ in range(4):  # each round reaches one level deeper into nested loops
        if not carried_shapes(graph):
            break
        _infer_shapes(new)

    values = _values_by_name(graph)
    if loss not in values:
        raise ValueError(f"no value named '{loss}' in the model")
    weights: dict[str, ir.Value] = {}
    for name in dict.fromkeys(wrt):
        value = graph.initializers.get(name)
        if value is None:
            raise ValueError(f"'{name}' is not an initializer of the model")
        if value.dtype not in WEIGHT_TYPES:
            raise ValueError(f"'{name}' is {value.dtype}; only float32/float64 weights are differentiated")
        weights[name] = value

    taken = set(values) | {node.name for node in graph if node.name}
    em = GradientEmitter(_free_prefix(taken, "grad/"))
    loss_value = values[loss]
    if not is_float(loss_value):
        raise ValueError(f"loss '{loss}' is not a float value")
    if loss_value.shape is None or len(loss_value.shape) != 0:
        loss_value = _append_sum(graph, loss_value, _unique(taken, f"{loss}.sum"))

    grads, unsupported, reasons = backward_scope(em, graph, {loss_value: [_seed(em, loss_value)]},
                                                 {value: frozenset({name}) for name, value in weights.items()})

    outputs = [loss_value]
    names: dict[str, str] = {}
    for name, weight in weights.items():
        if name in unsupported:
            continue
        total = _total(em, grads.get(weight, []))
        if total is None:  # the loss does not depend on this weight
            total = em.op("Expand", [em.const(np.array(0, weight.dtype.numpy())), em.op("Shape", [weight])])
        out = em.op("Identity", [total])
        out.name = _unique(taken, f"{name}.grad")
        out.dtype, out.shape = weight.dtype, ir.Shape(list(weight.shape))
        outputs.append(out)
        names[name] = out.name

    graph.extend(em.tape.nodes)
    for value in em.initializers:
        graph.register_initializer(value)
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    if weights_as_inputs:
        graph.inputs.extend(w for w in weights.values() if w not in graph.inputs)
    RemoveUnusedNodesPass()(new)
    return GradientGraph(new, loss_value.name, names, unsupported, reasons)


def _infer_shapes(model: ir.Model) -> None:
    try:
        ShapeInferencePass(strict_mode=False)(model)
    except Exception:  # noqa: BLE001  shapes only make rules cheaper; rules needing them refuse without
        logger.warning("shape inference failed; rules that need static ranks will report their nodes")


def hoist_initializers(graph: ir.Graph, names: Iterable[str]) -> None:
    """Move the initializers ``names`` that live in a subgraph (any depth) to ``graph``: the subgraph then reads
    them from the outer scope, which computes the same, and they can be differentiated like any weight."""
    wanted = {name for name in names if name not in graph.initializers}
    if not wanted:
        return
    for sub in graph.subgraphs():
        for name in [n for n in sub.initializers if n in wanted]:
            value = sub.initializers.pop(name)
            graph.register_initializer(value)
            wanted.discard(name)


# ----- analysis -----


def _values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {}
    for value in [*graph.inputs, *graph.initializers.values()]:
        found[value.name] = value
    for node in graph:
        for value in node.outputs:
            if value.name:
                found[value.name] = value
    return found


def _free_prefix(taken: set[str], base: str) -> str:
    prefix, n = base, 0
    while any(name.startswith(prefix) for name in taken):
        n += 1
        prefix = f"{base[:-1]}{n}/"
    return prefix


def _unique(taken: set[str], name: str) -> str:
    candidate, n = name, 0
    while candidate in taken:
        n += 1
        candidate = f"{name}.{n}"
    taken.add(candidate)
    return candidate


def _append_sum(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    """The scalar loss: the sum of all elements of ``value`` (``ReduceSum`` without axes, keepdims=0)."""
    node = ir.node("ReduceSum", [value], attributes={"keepdims": 0}, name=name)
    out = node.outputs[0]
    out.name, out.dtype, out.shape = name, value.dtype, ir.Shape([])
    graph.append(node)
    return out


def outer_values(node: ir.Node) -> list[ir.Value]:
    """The values the node's subgraphs (any depth) read from outside them, once each, in reading order."""
    subgraphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            subgraphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            subgraphs.extend(attr.value)
    if not subgraphs:
        return []
    inside: set[int] = set()
    for sub in subgraphs:
        inside.add(id(sub))
        inside.update(id(g) for g in sub.subgraphs())
    found: dict[ir.Value, None] = {}
    for sub in subgraphs:
        for inner in ir.traversal.RecursiveGraphIterator(sub):
            for v in inner.inputs:
                if v is not None and id(v.graph) not in inside:
                    found[v] = None
        for v in sub.outputs:  # a branch may return an outer value as it is
            if id(v.graph) not in inside:
                found[v] = None
    return list(found)


def _inputs_of(node: ir.Node) -> list[ir.Value]:
    """Explicit inputs plus outer-scope values that the node's subgraphs read."""
    return [*(v for v in node.inputs if v is not None), *outer_values(node)]


def _seed(em: GradientEmitter, loss: ir.Value) -> ir.Value:
    """d loss / d loss = 1, in the loss's float type."""
    if loss.dtype is not None:
        return em.const(np.array(1.0, loss.dtype.numpy()))
    return em.op("CastLike", [em.const(np.array(1.0, np.float32)), loss])


def backward_scope(
    em: GradientEmitter,
    graph: ir.Graph,
    seeds: dict[ir.Value, list[ir.Value]],
    sources: dict[ir.Value, frozenset[str]],
) -> tuple[dict[ir.Value, list[ir.Value]], dict[str, list[str]], dict[str, str]]:
    """Differentiate ``graph`` backwards from the gradients ``seeds`` (value -> gradients arriving at it) towards
    the ``sources`` (value -> the names it stands for): the gradient contributions per value, the source names
    whose gradient is blocked (with the blocking nodes' labels) and why each label blocks."""
    deps = _dependencies(graph, sources)
    path, on_path = _path_to_loss(graph, list(seeds), deps)
    return _backward(em, path, seeds, deps, on_path)


def _dependencies(graph: ir.Graph, sources: dict[ir.Value, frozenset[str]]) -> dict[ir.Value, frozenset[str]]:
    """For every float value that depends on some source: the names of those sources."""
    deps: dict[ir.Value, frozenset[str]] = dict(sources)
    for node in graph:
        sources: set[str] = set()
        for value in _inputs_of(node):
            sources |= deps.get(value, frozenset())
        if not sources or (node.domain in ("", "ai.onnx") and node.op_type in NON_DIFFERENTIABLE):
            continue
        found = frozenset(sources)
        for out in node.outputs:
            if is_float(out):
                deps[out] = found
    return deps


def _path_to_loss(
    graph: ir.Graph, ends: list[ir.Value], deps: dict[ir.Value, frozenset[str]]
) -> tuple[list[ir.Node], set[ir.Value]]:
    """Nodes on a weight->loss path (``ends``: the loss, or a subgraph's outputs), last first, and the values the
    ends depend on."""
    needed = set(ends)
    path = []
    for node in reversed(graph):
        if not any(out in needed for out in node.outputs):
            continue
        inputs = _inputs_of(node)
        needed.update(inputs)
        if any(v in deps for v in inputs) and any(out in deps and out in needed for out in node.outputs):
            path.append(node)
    return path, needed


def _total(em: GradientEmitter, parts: list[ir.Value]) -> ir.Value | None:
    """Sum of the gradient contributions reaching one value (several consumers: accumulate with Add)."""
    if not parts:
        return None
    total = parts[0]
    for part in parts[1:]:
        total = em.op("Add", [total, part])
    return total


def _backward(
    em: GradientEmitter,
    path: list[ir.Node],
    seeds: dict[ir.Value, list[ir.Value]],
    deps: dict[ir.Value, frozenset[str]],
    needed: set[ir.Value],
) -> tuple[dict[ir.Value, list[ir.Value]], dict[str, list[str]], dict[str, str]]:
    """Run the rules from the seeds backwards; returns gradient contributions per value, blocked sources and why.

    A node with subgraphs (``If``) gets the gradients of the outer values its subgraphs read after those of its
    inputs (``Vjp.outer``); a rule may report sources it blocks inside a subgraph through ``Vjp.blocked``."""
    grads: dict[ir.Value, list[ir.Value]] = {value: list(parts) for value, parts in seeds.items()}
    unsupported: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}

    def block(names: Iterable[str], label: str) -> None:
        for weight in names:
            labels = unsupported.setdefault(weight, [])
            if label not in labels:
                labels.append(label)

    for node in path:
        gy = [_total(em, grads.get(out, [])) if out in needed else None for out in node.outputs]
        if all(g is None for g in gy):
            continue  # every route from its outputs to the loss is already blocked
        wants = [v is not None and v in deps for v in node.inputs]
        outer = outer_values(node)
        rule = rule_for(node.op_type, node.domain)
        reason = None
        din: Sequence[ir.Value | None] = []
        cx = Vjp(em, node, wants, outer=outer, outer_wants=[v in deps for v in outer], differentiate=backward_scope)
        if rule is None or (any(v in deps for v in outer) and node.op_type not in OUTER_READING):
            reason = "no rule"
        else:
            try:
                din = rule(cx, node, gy)
            except RuleUnavailable as exc:
                reason = str(exc)
        label = f"{node.op_type} '{node.name}'"
        if reason is not None:
            logger.info("autodiff: %s blocks its weights (%s)", label, reason)
            reasons[label] = reason
            block(set().union(*(deps[v] for v in _inputs_of(node) if v in deps)), label)
            continue
        for inner_label, (names, why) in cx.blocked.items():
            reasons[f"{label} > {inner_label}"] = why
            block(set().union(*(deps[v] for v in outer if v.name in names and v in deps)), f"{label} > {inner_label}")
        for value, want, grad in zip([*node.inputs, *outer], [*wants, *cx.outer_wants], din):
            if want and grad is not None:
                grads.setdefault(value, []).append(grad)
    return grads, unsupported, reasons
