"""Graph surgery the estimators and measured passes share: which values a model outputs, fixed or forgotten
shapes, and where a weight's layer reads its input. Each function works on a copy the caller owns."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.loss import output_value
from bq_onnx.autodiff.vjp_control import control_on_samples
from bq_onnx.calibration import Calibration
from bq_onnx.context import WeightInfo
from bq_onnx.layout import RECURRENT_OPS


def forward_model(model: ir.Model, outputs: Sequence[str | None]) -> ir.Model:
    """A copy of ``model`` whose outputs are the named values (``None``: the first graph output); its graph is its
    own, its tensors are ``model``'s (every caller opens a session of it: nothing writes them). Why not a
    serialized copy: that copied every weight, about 0.1 s a session on all-MiniLM-L6-v2, and saves the same
    bytes."""
    copy = model.clone()
    values = {v.name: v for v in all_values(copy)} | {v.name: v for v in copy.graph.outputs}
    chosen = [output_value(copy, name) if name is None or name in {v.name for v in copy.graph.outputs}
              else values[name] for name in outputs]
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(chosen)
    return copy


def all_values(model: ir.Model) -> Iterator[ir.Value]:
    """The graph inputs and every node output (the values a forward model can return)."""
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs


def forget_shapes(model: ir.Model) -> None:
    """Drop every node output's shape, in subgraphs too (exported annotations, or those of an earlier
    specialisation, would stop inferred shapes from propagating: a branch output left at batch 1 gave its If
    output, and the loss target, a batch of 1)."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for out in node.outputs:
            out.shape = None


def specialise(model: ir.Model, sample: Mapping[str, np.ndarray | Sequence[int | None]]) -> ir.Model:
    """Fix the inputs to one sample's shapes (arrays, or shapes with None where runs differ, such as the widths
    of calibration parts kept per run) and infer the rest: per-sample gradient graphs run at batch 1, and static
    shapes let the autodiff use its direct Conv weight-gradient form (2-3x faster than the unfold form that
    symbolic shapes need)."""
    from onnx_ir.passes.common import ShapeInferencePass

    declared = {value: value.shape for value in model.graph.inputs}
    for value in model.graph.inputs:
        if value.name in sample:
            given = sample[value.name]
            value.shape = ir.Shape(list(given.shape if isinstance(given, np.ndarray) else given))
    ShapeInferencePass(check_type=False, strict_mode=False)(model)
    if any(node.op_type == "If" for node in ir.traversal.RecursiveGraphIterator(model.graph)):
        # onnxruntime's inference of If branches fails on some static inputs (silero-vad: "LSTM: first input
        # must have rank 3"); the inputs keep their declared shapes, the values inside keep the inferred ones
        for value, shape in declared.items():
            value.shape = shape
    return model


def weights_of(model: ir.Model, weights: Sequence[WeightInfo]) -> list[WeightInfo]:
    """``weights`` re-pointed at the same-named initializers of ``model`` (a copy of theirs)."""
    return [dataclasses.replace(w, value=model.graph.initializers[w.name]) for w in weights]


def batch_major_weights(model: ir.Model, weights: Sequence[WeightInfo], calib: Calibration) -> dict[str, int]:
    """Weights whose single consumer reads and writes sample-major tensors (first axis = the calibration
    sample axis, by shape inference with a symbolic batch), with their use counts. A model whose inputs have a
    fixed first dimension, a fixed batch, a sample axis other than the first or an If/Loop whose condition or
    trip count depends on the samples is not batched at all (its estimators run one sample per run). ``model``: a
    copy whose shapes this rewrites."""
    from onnx_ir.passes.common import ShapeInferencePass

    if calib.fixed_batch or any(axis not in (0, None) for axis in calib.axes.values()):
        return {}
    per_sample = {v.name for v in model.graph.inputs
                  if calib.sample_shape(v.name) is not None and calib.axis(v.name) is not None}
    if control_on_samples(model.graph, per_sample):  # one branch or trip count for a whole batch (issue 14)
        return {}
    symbol = "bq_samples"
    for value in model.graph.inputs:
        dims = calib.sample_shape(value.name)
        if dims is None or calib.axis(value.name) is None:  # absent, or shared by every sample: as it is
            continue
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], int) and value.shape[0] > 0:
            return {}
        value.shape = ir.Shape([symbol, *dims])
    forget_shapes(model)
    try:
        ShapeInferencePass(check_type=False, strict_mode=False)(model)
        for _ in range(CARRY_ROUNDS):
            if not carry_sample_axis(model.graph, symbol):
                break
            ShapeInferencePass(check_type=False, strict_mode=False)(model)
    except Exception:  # noqa: BLE001 - no inferred shapes: nothing is known to be sample-major
        return {}

    def sample_major(value: ir.Value | None) -> bool:
        if value is None or value.shape is None or len(value.shape) < 2:
            return False
        dim = value.shape[0]
        return isinstance(dim, ir.SymbolicDim) and dim.value == symbol

    found = {}
    for info in weights:
        uses = list(model.graph.initializers[info.name].uses())
        if not uses:
            continue
        node = uses[0].node
        reads = node.inputs[1] if node.op_type == "Gather" and len(node.inputs) > 1 else node.inputs[0]
        summed = broadcast_sum(node) if node.op_type == "Gather" and uses[0].idx == 0 else None
        if (sample_major(reads) and sample_major(node.outputs[0])) or \
                (summed is not None and sample_major(summed.outputs[0])):
            found[info.name] = len(uses)
    return found


def broadcast_sum(gather: ir.Node) -> ir.Node | None:
    """The ``Add`` that adds a lookup's rows to a tensor of its rank, where it is the lookup's only reader (BERT's
    position and token-type embeddings: their indices are one row shared by every sample, or built per sample from
    a computed shape): the gradient of its output is the lookup's, per sample (:func:`bq_onnx.estimators.probes.
    add_probes` probes it there)."""
    out = gather.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx] if len(add.inputs) == 2 else None
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or other is None or out.shape is None \
            or other.shape is None or len(out.shape) != len(other.shape) or add.graph is not gather.graph:
        return None
    return add


#: Broadcasting ops (every input, multidirectional) and Expand (its data input): an output axis that an input of
#: the output's rank has as the sample axis is the sample axis, whatever the other inputs' dims there (1 or the
#: same count: broadcasting allows nothing else while the batch is over 1).
BROADCASTING = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum", "Where", "Equal",
                          "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "And", "Or", "Xor", "PRelu",
                          "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "Expand"})
#: Rounds of :func:`carry_sample_axis` and shape inference at most (each carries the axis past one more op).
CARRY_ROUNDS = 16


def carry_sample_axis(graph: ir.Graph, symbol: str) -> bool:
    """Name the first axis of broadcasting ops' outputs ``symbol`` where one input of the output's rank has it
    there and ONNX shape inference left it unknown, and forget every other inferred shape; whether any changed.
    Why: inference gives up on a broadcast against a computed shape (all-MiniLM's ``embeddings +
    token_type_embeddings``), and every later layer then looked per-run to the posterior (issue 17: 1 of
    paraphrase-MiniLM-L3's 21 weights batched)."""
    changed = False
    for node in graph:
        if node.op_type not in BROADCASTING or node.domain not in ("", "ai.onnx") or not node.outputs:
            continue
        out = node.outputs[0]
        if out.shape is None or len(out.shape) < 2 or isinstance(out.shape[0], int) or \
                (isinstance(out.shape[0], ir.SymbolicDim) and out.shape[0].value == symbol):
            continue
        data = node.inputs[:1] if node.op_type == "Expand" else node.inputs
        if any(v is not None and v.shape is not None and len(v.shape) == len(out.shape)
               and isinstance(v.shape[0], ir.SymbolicDim) and v.shape[0].value == symbol for v in data):
            out.shape = ir.Shape([symbol, *out.shape[1:]])
            changed = True
    if changed:  # the other inferred shapes go: a generated name (``unk__7``) would win over the symbol next round
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for out in node.outputs:
                if out.shape is None or not len(out.shape) or not isinstance(out.shape[0], ir.SymbolicDim) \
                        or out.shape[0].value != symbol:
                    out.shape = None
    return changed


#: How a layer reads its input channels: ``(kind, argument)`` (see :func:`activation_site`).
Reduction = tuple[str, int | None]


def activation_site(weight: ir.Value) -> tuple[ir.Value | None, Reduction | None]:
    """(activation value, how to reduce it) for the first consumer that reads the weight as a weight."""
    for use in weight.uses():
        node, idx = use.node, use.idx
        op = node.op_type
        attrs = {k: a.value for k, a in node.attributes.items()}
        if op == "MatMul" and idx == 1:
            return node.inputs[0], ("last", None)
        if op == "MatMul" and idx == 0:
            return node.inputs[1], ("second_last", None)
        if op == "Gemm" and idx == 1:
            return node.inputs[0], ("axis", 0 if attrs.get("transA", 0) else 1)
        if op == "Gemm" and idx == 0:
            return node.inputs[1], ("axis", 1 if attrs.get("transB", 0) else 0)
        if op == "Conv" and idx == 1:
            return node.inputs[0], ("channels", int(attrs.get("group", 1)))
        if op == "ConvTranspose" and idx == 1:
            return node.inputs[0], ("in_channels", None)
        if op == "Gather" and idx == 0:
            return node.inputs[1], ("tokens", None)
        if op in RECURRENT_OPS and idx == 1:  # W reads the sequence input's features
            return node.inputs[0], ("recurrent", None)
        if op in RECURRENT_OPS and idx == 2 and node.outputs and node.outputs[0].name:  # R reads h(t-1) ~ Y
            return node.outputs[0], ("recurrent", None)
    return None, None
