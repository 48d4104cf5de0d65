"""An independent count of what a file stores per weight, for any model, whoever quantized it.

Read with onnx's protobuf classes alone (:mod:`bq_onnx.onnx_proto`; not the IR bq-onnx rewrites with, and
without the onnx package's numpy start-up) so that it checks the rewrite rather than repeats it:
every stored tensor (initializers, ``Constant`` node values, in subgraphs too) counts its packed size (int4 two
per byte, int2 four), external data included. The figure is

    8 * (stored bytes of the model - stored bytes of the reference's non-weight tensors) / weights of the reference

with the *weights* of the FP32 reference what a weight quantizer quantizes (:func:`reference_weights`). Graph
constants a quantizer adds (shapes, indices, decode functions) and the weights it left in float count as stored;
the reference's other tensors (biases, norms, shapes) do not. The same figure for bq-onnx's output and
onnxruntime's or NNCF's compares them on equal terms.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from bq_onnx.config import WeightsConfig
from bq_onnx.onnx_proto import data_type_bits, graph_tensors, iter_graphs, pb
from bq_onnx.onnx_proto import tensor_bytes as _tensor_bytes

if TYPE_CHECKING:  # the protobuf classes only at run time: no numpy, onnx package or onnx-ir to start
    import onnx
    import onnx_ir as ir

    from bq_onnx.proto_graph import Survey

_ATTR_TENSORS = {"value_float": "FLOAT", "value_int": "INT64"}


@dataclasses.dataclass(frozen=True)
class Count:
    """The independent count of one model against its FP32 reference."""

    stored_bytes: int  # every stored tensor of the model
    reference_other_bytes: int  # the reference's tensors that are not weights (biases, shapes)
    weight_numel: int  # weight elements of the reference
    file_bytes: int  # the .onnx file and its external data files

    @property
    def weight_bytes(self) -> int:
        return self.stored_bytes - self.reference_other_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.weight_bytes / max(self.weight_numel, 1)

    def to_report(self) -> dict:
        return dataclasses.asdict(self) | {"weight_bytes": self.weight_bytes, "bits_per_weight": self.bits_per_weight}


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Stored bytes of a tensor from its type and shape (sub-byte types packed)."""
    return _tensor_bytes(t)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The graph's tensors, and the list-valued ``Constant`` attributes as the tensors they stand for."""
    tensor_proto = pb().TensorProto
    yield from graph_tensors(graph)
    for g in iter_graphs(graph):
        for node in g.node:
            if node.op_type != "Constant":
                continue
            for attr in node.attribute:
                if attr.name in ("value_floats", "value_ints"):
                    dtype = tensor_proto.FLOAT if attr.name == "value_floats" else tensor_proto.INT64
                    values = attr.floats if attr.name == "value_floats" else attr.ints
                    yield tensor_proto(name=attr.name, data_type=dtype, dims=[len(values)])
                elif attr.name in _ATTR_TENSORS:
                    yield tensor_proto(name=attr.name, data_type=tensor_proto.DataType.Value(_ATTR_TENSORS[attr.name]))


def stored_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every tensor the model stores: initializers and ``Constant`` values, in subgraphs and functions too."""
    out = list(_graph_tensors(model.graph))
    for fn in model.functions:
        out.extend(_graph_tensors(pb().GraphProto(node=list(fn.node), name=fn.name)))
    return out


def stored_bytes(model: onnx.ModelProto) -> int:
    """The bytes of :func:`stored_tensors`."""
    bits = data_type_bits()
    return sum(_tensor_bytes(t, bits) for t in stored_tensors(model))


def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    if not isinstance(model, (str, os.PathLike)):
        return model
    proto = pb().ModelProto()
    with open(os.fspath(model), "rb") as f:  # as onnx.load(..., load_external_data=False) reads it
        proto.ParseFromString(f.read())
    return proto


def file_bytes(path: str | os.PathLike, model: onnx.ModelProto | None = None) -> int:
    """The file and the external data files it names (``model``: the file's proto, when already read)."""
    model = _load(path) if model is None else model
    folder = os.path.dirname(os.fspath(path))
    files = {e.value for t in stored_tensors(model) for e in t.external_data if e.key == "location"}
    return os.path.getsize(path) + sum(os.path.getsize(os.path.join(folder, f)) for f in files)


def reference_weights(reference: str | os.PathLike | onnx.ModelProto, min_size: int) -> tuple[int, int]:
    """Elements and stored bytes of the reference's weights: what a weight quantizer quantizes (bq-onnx's own
    finder, whose rule is the usual one: float tensors of at least ``min_size`` elements read as
    MatMul/Gemm/Conv/Gather weights; biases and norms are not weights), in every graph (subgraph weights too, under
    whatever name the finder gives a repeated one)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass

    from bq_onnx.stages.weights import find_weights

    model = ir.serde.deserialize_model(_load(reference))
    # weights held in Constant nodes (paddle2onnx) are weights too
    LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=min_size)(model)
    values = [w.value.const_value for w in find_weights(model, WeightsConfig(min_size=min_size)).weights]
    return sum(v.size for v in values if v is not None), sum(v.nbytes for v in values if v is not None)


def count(model: str | os.PathLike | onnx.ModelProto, reference: str | os.PathLike | onnx.ModelProto,
          min_size: int = WeightsConfig.min_size) -> Count:
    """Count ``model``'s stored bytes per weight of the FP32 ``reference`` (see the module docstring)."""
    m, ref = _load(model), _load(reference)
    weights, weight_bytes = reference_weights(ref, min_size)
    other = stored_bytes(ref) - weight_bytes
    size = file_bytes(model, m) if isinstance(model, (str, os.PathLike)) else m.ByteSize()
    return Count(stored_bytes(m), other, weights, size)


#: ops that read quantized weights: op -> (input index of the codes, input indices of their scales and zero points)
QUANTIZED_INPUTS = {
    "DequantizeLinear": (0, (1, 2)),
    "MatMulNBits": (1, (2, 3)),
    "GatherBlockQuantized": (0, (2, 3)),
    "MatMulInteger": (1, (3,)),
    "ConvInteger": (1, (3,)),
    "QLinearMatMul": (3, (4, 5)),
    "QLinearConv": (3, (4, 5)),
}
_FLOAT_TYPES = ("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE")


def _code_elements(node: onnx.NodeProto, codes: onnx.TensorProto) -> int:
    """Weight elements the codes of a quantized op stand for (MatMulNBits and GatherBlockQuantized pack codes into
    bytes: their K x N, or 8 / bits per byte)."""
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "MatMulNBits":
        return attrs.get("K", 0) * attrs.get("N", 0)
    n = math.prod(codes.dims)
    if node.op_type == "GatherBlockQuantized" and codes.data_type == pb().TensorProto.UINT8:
        return n * 8 // attrs.get("bits", 4)
    return n


def count_alone(model: str | os.PathLike | onnx.ModelProto, min_size: int = WeightsConfig.min_size,
                proto: onnx.ModelProto | None = None, found: Survey | None = None) -> Count:
    """The count of a model without its FP32 reference (any tool's output): its weights are the codes its
    quantized ops read (DequantizeLinear, MatMulNBits, MatMulInteger, QLinear*, GatherBlockQuantized: what
    those codes stand for, at least ``min_size`` elements) with their scales and zero points, and the float weights
    left (the finder's rule, as :func:`reference_weights`); every other stored tensor is not counted. Graph
    constants a quantizer adds are left out here, which :func:`count` against the reference counts. ``proto``: the
    file's proto, when already read; ``found``: its weight survey at ``min_size``, when already made (a graph of
    1e6 nodes takes seconds to survey)."""
    from bq_onnx.proto_graph import survey

    m = _load(model) if proto is None else proto
    named: dict[str, onnx.TensorProto] = {}
    for g in iter_graphs(m.graph):
        named.update((t.name, t) for t in g.initializer if t.name not in named)
        for node in g.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.type == pb().AttributeProto.TENSOR:
                        named.setdefault(node.output[0], attr.t)
    floats = {pb().TensorProto.DataType.Value(t) for t in _FLOAT_TYPES}
    weight_bytes: dict[str, int] = {}
    numel = 0
    for g in iter_graphs(m.graph):
        for node in g.node:
            codes_at, meta_at = QUANTIZED_INPUTS.get(node.op_type, (None, ()))
            if codes_at is None or len(node.input) <= codes_at:
                continue
            codes = named.get(node.input[codes_at])
            if codes is None or codes.data_type in floats or node.input[codes_at] in weight_bytes:
                continue
            n = _code_elements(node, codes)
            if n < min_size:
                continue
            numel += n
            for i in (codes_at, *meta_at):
                if i < len(node.input) and node.input[i] in named:
                    weight_bytes[node.input[i]] = tensor_bytes(named[node.input[i]])
    found = survey(m, min_size) if found is None else found
    for c in found.weights:
        if c.name not in weight_bytes:
            numel += math.prod(c.shape)
            weight_bytes[c.name] = found.initializer_bytes[c.name]
    total = stored_bytes(m)
    size = file_bytes(model, m) if isinstance(model, (str, os.PathLike)) else m.ByteSize()
    return Count(total, total - sum(weight_bytes.values()), numel, size)


def ir_stored_bytes(model: ir.Model) -> int:
    """Every tensor an IR model stores, as :func:`stored_tensors` counts a proto (without serializing it)."""
    import onnx_ir as ir

    total = 0
    graphs: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for graph in graphs:
        if isinstance(graph, ir.Graph):
            total += _ir_initializer_bytes(graph)
        for node in ir.traversal.RecursiveGraphIterator(graph):
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    total += attr.value.nbytes
                elif attr.type == ir.AttributeType.TENSORS:
                    total += sum(t.nbytes for t in attr.value)
                elif attr.type == ir.AttributeType.GRAPH:
                    total += _ir_initializer_bytes(attr.value)
                elif attr.type == ir.AttributeType.GRAPHS:
                    total += sum(_ir_initializer_bytes(g) for g in attr.value)
                elif node.op_type == "Constant" and attr.name in ("value_floats", "value_ints"):
                    total += (4 if attr.name == "value_floats" else 8) * len(attr.value)
                elif node.op_type == "Constant" and attr.name in ("value_float", "value_int"):
                    total += 4 if attr.name == "value_float" else 8
    return total


def _ir_initializer_bytes(graph: ir.Graph) -> int:
    return sum(v.const_value.nbytes for v in graph.initializers.values() if v.const_value is not None)
