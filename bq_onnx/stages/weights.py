"""Find the weights to quantize: large float initializers of the main graph and of every subgraph, read by
MatMul, Gemm, Conv, ConvTranspose, Gather or a recurrent layer's W/R (directly, or through Slice/Transpose/
Reshape-like layout ops: :mod:`bq_onnx.chains`), in one layout all their readers share; a tensor any reader uses
as a shape, scale or index is never one."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import onnx_ir as ir

from bq_onnx.config import WeightsConfig
from bq_onnx.context import WeightInfo
from bq_onnx.errors import UnsupportedError
from bq_onnx.escape import escape
from bq_onnx.exclusions import Exclusions
from bq_onnx.layout import WeightLayout
from bq_onnx.reads import structural_sources
from bq_onnx.weight_rules import QUANTIZED_OPS, Candidate, classify, quantized_ops_message, subgraph_label

__all__ = ["QUANTIZED_OPS", "Candidate", "FoundWeights", "find_weights", "scoped_graphs", "survey"]

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


@dataclasses.dataclass
class FoundWeights:
    """The weights to quantize, every candidate with its readers, and what the search has to say (weights kept
    in float, quantized ops seen)."""

    weights: list[WeightInfo]
    messages: list[str]
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    exclusions: list[dict] = dataclasses.field(default_factory=list)  # what each --exclude/--only/--keep-fp did


def scoped_graphs(graph: ir.Graph, path: str = "") -> Iterator[tuple[str, ir.Graph]]:
    """``graph`` and every subgraph below it (any depth), each with its path from the main graph."""
    yield path, graph
    for node in graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                subs = [(attr.name, attr.value)]
            elif attr.type == ir.AttributeType.GRAPHS:
                subs = [(f"{attr.name}[{i}]", g) for i, g in enumerate(attr.value)]
            else:
                continue
            for label, sub in subs:
                here = subgraph_label(node, label)
                yield from scoped_graphs(sub, f"{path}/{here}" if path else here)


def survey(model: ir.Model, config: WeightsConfig) -> FoundWeights:
    """Every float initializer of every graph, found a weight or skipped with why (the model is not changed); a
    ``--exclude``/``--only``/``--keep-fp`` pattern that matches no weight is a usage error."""
    messages = quantized_ops_message([n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)])
    graphs = list(scoped_graphs(model.graph))
    paths = {id(g): path for path, g in graphs}
    structural = structural_sources(ir.traversal.RecursiveGraphIterator(model.graph))
    weights: list[WeightInfo] = []
    candidates: list[Candidate] = []
    exclusions = Exclusions(config.exclude, config.only, config.keep_fp)
    for path, graph in graphs:
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if tensor is None or value.dtype not in FLOAT_TYPES:
                continue
            shape = tuple(int(d) for d in tensor.shape)
            candidate, axes = classify(name, value, path, shape, str(value.dtype.name).lower(), tensor.size, paths,
                                       config.min_size, exclusions, messages, structural)
            candidates.append(candidate)
            if axes is not None:
                weights.append(WeightInfo(name, value, WeightLayout(shape, axes), candidate.readers, path))
    exclusions.check()
    return FoundWeights(weights, messages + exclusions.messages(), candidates, exclusions.report())


def find_weights(model: ir.Model, config: WeightsConfig) -> FoundWeights:
    """Every quantizable weight of ``model`` (the model is not changed); none at all is an error."""
    found = survey(model, config)
    if not found.weights:
        detail = "; the model looks quantized already" if any("quantized ops" in m for m in found.messages) else ""
        excluded = sum(len(r.get("excluded", [])) for r in found.exclusions)
        detail += f"; --exclude/--only/--keep-fp kept all {excluded} in float" if excluded else ""
        single = [c.name for c in found.candidates if c.skipped.startswith("its reduction axes hold one element")]
        detail += (f"; {len(single)} read along an axis of one element ('{escape(single[0])}'...: one scale per "
                   f"weight would cost more than the weight)" if single else "")
        raise UnsupportedError(
            f"no quantizable weights (float initializers of at least {config.min_size} elements read by "
            f"MatMul, Gemm, Conv, ConvTranspose, Gather, LSTM, GRU or RNN){detail}"
        )
    return found
