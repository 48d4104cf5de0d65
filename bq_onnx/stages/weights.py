"""Find the weights to quantize: large float initializers read by MatMul, Gemm, Conv, ConvTranspose, Gather."""

from __future__ import annotations

import dataclasses
import fnmatch

import onnx_ir as ir

from bq_onnx.config import WeightsConfig
from bq_onnx.context import WeightInfo
from bq_onnx.errors import UnsupportedError
from bq_onnx.layout import WeightLayout, reduction_axes_for

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


@dataclasses.dataclass
class FoundWeights:
    """The weights to quantize, and what the search has to say (weights kept in float, quantized ops seen)."""

    weights: list[WeightInfo]
    messages: list[str]


def find_weights(model: ir.Model, config: WeightsConfig) -> FoundWeights:
    """Every quantizable weight of ``model`` (the model is not changed)."""
    messages: list[str] = []
    graph = model.graph
    settings = config
    quantized_ops: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.op_type in QUANTIZED_OPS:
            quantized_ops[node.op_type] = quantized_ops.get(node.op_type, 0) + 1
    if quantized_ops:
        found = ", ".join(f"{n} {op}" for op, n in sorted(quantized_ops.items()))
        messages.append(f"model already contains quantized ops ({found}); those are left alone")

    graph_inputs = {v.name for v in graph.inputs}
    graph_outputs = {v.name for v in graph.outputs}
    weights: list[WeightInfo] = []
    for name, value in graph.initializers.items():
        tensor = value.const_value
        if tensor is None or value.dtype not in FLOAT_TYPES:
            continue
        if name in graph_inputs or name in graph_outputs:
            continue  # overridable at run time, or an output: not ours to change
        shape = tuple(int(d) for d in tensor.shape)
        if tensor.size < settings.min_size:
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.keep_fp):
            messages.append(f"kept '{name}' in floating point (--keep-fp)")
            continue
        uses = list(value.uses())
        if not uses or any(use.node.op_type in QUANTIZED_OPS for use in uses):
            continue
        axes = None
        consumers = []
        for use in uses:
            node = use.node
            attrs = {k: a.value for k, a in node.attributes.items() if a.type == ir.AttributeType.INT}
            found_axes = reduction_axes_for(node.op_type, use.idx, len(shape), attrs)
            consumers.append(f"{node.op_type}:{node.name or '?'}")
            if axes is None and found_axes is not None and node.domain in ("", "ai.onnx"):
                axes = found_axes
        if axes is None:
            continue
        weights.append(WeightInfo(name, value, WeightLayout(shape, axes), tuple(consumers)))
    if not weights:
        detail = "; the model looks quantized already" if quantized_ops else ""
        raise UnsupportedError(
            f"no quantizable weights (float initializers of at least {settings.min_size} elements read by "
            f"MatMul, Gemm, Conv, ConvTranspose or Gather){detail}"
        )
    return FoundWeights(weights, messages)
