"""Bring any exported graph into the shape the rewrite needs: opset >= 21, an IR version runtimes read, and an
inference BatchNormalization folded into the Conv before it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass

from bq_onnx.config import WeightsConfig
from bq_onnx.errors import ModelError
from bq_onnx.model_io import external_tensors, stream_external_tensors
from bq_onnx.weight_rules import fresh_name

#: DequantizeLinear with block_size and int4 containers need opset 21.
MIN_OPSET = 21
#: The newest IR version the supported onnxruntime releases load (onnx 1.23 would write 14).
MAX_RUNTIME_IR_VERSION = 10


def _min_ir_version(opset: int) -> int:
    for _release, ir_version, op_version, *_ in onnx.helper.VERSION_TABLE:
        if op_version >= opset:
            return ir_version
    return onnx.IR_VERSION


class UpgradeOpsetPass(ir.passes.FunctionalPass):
    """Convert the default-domain opset up to ``target`` with onnx's version converter (external data stays lazy)."""

    def __init__(self, target: int = MIN_OPSET) -> None:
        self.target = target

    def requires(self, model: ir.Model) -> None:
        known = onnx.defs.onnx_opset_version()
        current = model.opset_imports.get("", None)
        if current is None:
            raise ModelError("model has no default-domain opset import")
        if current > known:
            raise ModelError(f"model uses opset {current}, newer than the installed onnx knows ({known})")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        current = model.opset_imports[""]
        if current >= self.target or _only_bumped(model, current, self.target):
            # nothing for the converter to adapt: skip its round trip through a serialized copy (on a graph of 1e6
            # nodes a fifth of optimize's time and a second copy of the graph in memory)
            new = _same_graph(model)
            new.opset_imports[""] = max(current, self.target)
            return ir.passes.PassResult(new, modified=current < self.target)
        proto = ir.serde.serialize_model(model)
        if current < self.target:
            try:
                proto = onnx.version_converter.convert_version(proto, self.target)
            except Exception as exc:  # noqa: BLE001  the converter raises assorted C++ errors
                msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
                raise ModelError(f"cannot convert the model from opset {current} to {self.target}: {msg}") from None
        new = ir.serde.deserialize_model(proto)
        stream_external_tensors(new, {t.name: t.base_dir for t in external_tensors(model) if t.base_dir})
        return ir.passes.PassResult(new, modified=current < self.target)

    def ensures(self, model: ir.Model) -> None:
        assert model.opset_imports[""] >= self.target


def _only_bumped(model: ir.Model, current: int, target: int) -> bool:
    """Whether converting from opset ``current`` to ``target`` changes nothing but the opset number: no local
    functions, and every default-domain op (subgraphs included) has the same schema at both versions."""
    if model.functions:
        return False
    seen: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type in seen:
            continue
        try:
            before = onnx.defs.get_schema(node.op_type, current, "").since_version
            after = onnx.defs.get_schema(node.op_type, target, "").since_version
        except onnx.defs.SchemaError:
            return False
        if before != after:
            return False
        seen.add(node.op_type)
    return True


def _same_graph(model: ir.Model) -> ir.Model:
    """A new model object around ``model``'s graph (a functional pass returns a new model; the old one is not
    used again)."""
    new = ir.Model(model.graph, ir_version=model.ir_version, producer_name=model.producer_name,
                   producer_version=model.producer_version, domain=model.domain, model_version=model.model_version,
                   doc_string=model.doc_string, functions=list(model.functions.values()),
                   metadata_props=dict(model.metadata_props))
    new.meta.update(model.meta)
    return new


class SetIrVersionPass(ir.passes.InPlacePass):
    """Set the IR version to the lowest the opsets need, capped at what onnxruntime loads."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        needed = _min_ir_version(model.opset_imports.get("", MIN_OPSET))
        target = max(needed, min(model.ir_version, MAX_RUNTIME_IR_VERSION))
        modified = target != model.ir_version
        model.ir_version = target
        return ir.passes.PassResult(model, modified)


class UniqueInitializerNamesPass(ir.passes.InPlacePass):
    """Give subgraph initializers names no other graph's initializer has: weights are keyed by name (two ``If``
    branches may each hold a ``W``, and lifted ``Constant`` nodes keep their output names)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        seen: set[str] = set()
        modified = False
        for graph in model.graphs():
            for name, value in list(graph.initializers.items()):
                if name not in seen:
                    seen.add(name)
                    continue
                graph.initializers.pop(name)
                value.name = fresh_name(name, seen)
                graph.register_initializer(value)
                seen.add(value.name)
                modified = True
        return ir.passes.PassResult(model, modified)


def prepare_passes(config: WeightsConfig) -> list[ir.passes.PassBase]:
    """Constants to initializers (in whichever graph holds them), unique initializer names, inference
    BatchNormalization folded into its Conv, opset >= 21, a runtime-readable IR version."""
    return [
        LiftConstantsToInitializersPass(size_limit=config.min_size),
        UniqueInitializerNamesPass(),
        FoldBatchNormPass(),
        UpgradeOpsetPass(),
        SetIrVersionPass(),
    ]


# Fold an inference BatchNormalization into the Conv before it: one weight and one bias instead of four tensors more.
#
# Exporters that keep BatchNormalization apart (paddle2onnx: the zoo's PP-OCR classifier has 35 of them on 53 Conv)
# store four float vectors per channel that no runtime needs at inference (onnxruntime, OpenVINO and TensorRT fold
# them at load). In a model quantized to 4 bits they are what the file is made of: the classifier's FP32 file holds
# 34.5 bits per weight element, 2.5 of them BatchNormalization and bias vectors, so a 4-bit output still stored 6.6
# (``benchmarks/zoo_s9.md``). Folded before the weights are surveyed, the scale is part of the Conv weight the
# posterior and the quantizer see, and only the bias remains.
#
# The rule: ``Conv(X, W[, b]) -> BatchNormalization(scale, B, mean, var; epsilon)`` in inference mode, where the Conv's
# output feeds only that node, W (and b) are initializers nothing else reads, and the four vectors are constants of
# one value per output channel: ``W' = W * s[:, None, ...]``, ``b' = (b - mean) * s + B`` with
# ``s = scale / sqrt(var + epsilon)``, computed in float64 and stored in W's type. Anything else is left as it is.

_BN_STANDARD = ("", "ai.onnx")
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16})


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Every foldable ``Conv -> BatchNormalization`` pair, in the main graph and every subgraph, as one Conv."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graphs = (model.graph, *model.graph.subgraphs())
        names = {v.name for g in graphs for v in (*g.inputs, *g.initializers.values())}
        names |= {v.name for g in graphs for n in g for v in n.outputs}
        folded = 0
        for graph in graphs:
            for node in list(graph):
                match = _match(node)
                if match is not None:
                    _fold(graph, names, node, *match)
                    folded += 1
        return ir.passes.PassResult(model, modified=folded > 0)


def _const(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else np.asarray(tensor.numpy(), dtype=np.float64)


def _sole_reader(value: ir.Value, node: ir.Node) -> bool:
    return all(u.node is node for u in value.uses()) and not value.is_graph_output()


def _match(bn: ir.Node) -> tuple[ir.Node, np.ndarray, np.ndarray] | None:
    """(the Conv, the per-channel factor s, the shift ``B - mean * s``) when ``bn`` folds into its producer."""
    if bn.op_type != "BatchNormalization" or bn.domain not in _BN_STANDARD or len(bn.inputs) != 5:
        return None
    if any(a.value for k, a in bn.attributes.items() if k == "training_mode"):
        return None
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return None  # running statistics read by someone: a training graph
    x = bn.inputs[0]
    conv = x.producer() if x is not None else None
    if conv is None or conv.op_type != "Conv" or conv.domain not in _BN_STANDARD or not _sole_reader(x, bn):
        return None
    weight = conv.inputs[1]
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    for v in (weight, bias):
        if v is not None and (not v.is_initializer() or v.const_value is None or v.dtype not in _FLOATS
                              or not _sole_reader(v, conv)):
            return None
    scale, shift, mean, var = (_const(v) for v in bn.inputs[1:])
    channels = weight.const_value.shape[0]
    if any(a is None or a.shape != (channels,) for a in (scale, shift, mean, var)):
        return None
    eps = next((float(a.value) for k, a in bn.attributes.items() if k == "epsilon"), 1e-5)
    s = scale / np.sqrt(var + eps)
    if not np.all(np.isfinite(s)):
        return None
    return conv, s, shift - mean * s


def _fold(graph: ir.Graph, names: set[str], bn: ir.Node, conv: ir.Node, s: np.ndarray, shift: np.ndarray) -> None:
    weight = conv.inputs[1]
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    dtype = weight.const_value.numpy().dtype
    w = np.asarray(weight.const_value.numpy(), dtype=np.float64)
    weight.const_value = ir.tensor((w * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(dtype), name=weight.name)
    b = shift if bias is None else np.asarray(bias.const_value.numpy(), dtype=np.float64) * s + shift
    folded = ir.tensor(b.astype(dtype), name=bias.name if bias is not None else None)
    if bias is not None:
        bias.const_value = folded
    else:
        name = f"{weight.name}_bias"
        name = fresh_name(name, names) if name in names else name
        names.add(name)
        folded.name = name
        value = ir.Value(name=name, shape=ir.Shape(b.shape), type=ir.TensorType(weight.dtype), const_value=folded)
        graph.register_initializer(value)
        conv.resize_inputs(3)
        conv.replace_input_with(2, value)
    out, conv_out = bn.outputs[0], conv.outputs[0]
    output = out.is_graph_output()
    out.replace_all_uses_with(conv_out, replace_graph_outputs=output)
    if output:  # a graph output keeps its name
        name, out.name = out.name, fresh_name(out.name, names)
        names.add(out.name)
        conv_out.name = name
        conv_out.type = conv_out.type or out.type  # a graph output declares its type
        conv_out.shape = conv_out.shape or out.shape
    params = list(bn.inputs[1:])
    graph.remove(bn, safe=True)
    for value in params:  # the four vectors, now read by nobody: no unused initializer or Constant is left
        if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and producer.graph is not None:
            producer.graph.remove(producer, safe=True)
        elif value.is_initializer() and value.graph is not None:
            value.graph.initializers.pop(value.name, None)
