"""Output probes: a zero tensor added after a layer's output, so that the gradient with respect to the probe is
the gradient with respect to that output. K-FAC reads its ``G`` factor from them, the batched per-sample
gradients their ``d_n``. Probes need static output shapes, so the model is specialised to one calibration
batch's input shapes and shape-inferred; a layer whose output shape stays unknown gets no probe."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.context import WeightInfo
from bq_onnx.graph import broadcast_sum, specialise

PROBE_SUFFIX = ".bq_probe"


@dataclasses.dataclass
class ProbeSite:
    """Where one weight's layer input and output gradient are read."""

    weight: str
    op: str
    activation: str  # value name of the layer input
    probe: str  # probe initializer name (its gradient = dL/d output)
    attrs: dict
    in_axis: int  # channel/feature axis of the activation (MatMul/Gemm)


def _static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or any(not isinstance(d, int) for d in value.shape):
        return None
    return tuple(int(d) for d in value.shape)


def add_probes(model: ir.Model, weights: Sequence[WeightInfo], sample: Mapping[str, np.ndarray | Sequence[int | None]],
               gather: bool = False) -> list[ProbeSite]:
    """Specialise ``model`` (in place) to ``sample``'s shapes and add a zero probe after each MatMul, Gemm and
    Conv layer (and, with ``gather``, after each embedding lookup: its site's activation is the index tensor; a
    lookup broadcast over the samples by an ``Add`` is probed after the ``Add``)."""
    specialise(model, sample)
    sites = []
    shared: dict[int, str] = {}  # id of a value already probed -> its probe (lookups summed by one Add share it)
    for info in weights:
        use = next(iter(info.value.uses()), None)
        if use is None:
            continue
        node, idx = use.node, use.idx
        if node.graph is not model.graph:  # read inside a subgraph: no probe there (one sample per run instead)
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type == "MatMul" and idx == 1 and len(info.layout.shape) == 2:
            axis = -1
        elif node.op_type == "Gemm" and idx == 1:
            axis = 0 if attrs.get("transA", 0) else 1
        elif node.op_type == "Conv" and idx == 1 and len(info.layout.shape) == 4:
            axis = 1
        elif gather and node.op_type == "Gather" and idx == 0 and int(attrs.get("axis", 0)) == 0:
            axis = 0
        else:
            continue
        op, out = node.op_type, node.outputs[0]
        shape = _static_shape(out)
        reads = node.inputs[1] if node.op_type == "Gather" else node.inputs[0]
        if shape is None or reads is None or reads.name is None:
            continue
        if node.op_type == "Gather":  # rows shared by the samples, or looked up from a computed shape: probed after
            add = broadcast_sum(node)  # the Add that broadcasts them over the samples (its gradient is theirs)
            summed = None if add is None else _static_shape(add.outputs[0])
            ids = _static_shape(reads)
            if summed is not None and ids is not None and shape[0] in (1, summed[0]) and shape[1:] == summed[1:] \
                    and ids[0] == shape[0]:
                node, out, shape = add, add.outputs[0], summed
        if id(out) in shared:
            sites.append(ProbeSite(info.name, op, reads.name, shared[id(out)], attrs, axis))
            continue
        probe = ir.Value(name=info.name + PROBE_SUFFIX, const_value=ir.tensor(np.zeros(shape, np.float32)))
        shared[id(out)] = probe.name
        model.graph.register_initializer(probe)
        add = ir.Node("", "Add", [out, probe], num_outputs=1, name=info.name + ".bq_probe_add")
        probed = add.outputs[0]
        probed.name = out.name + PROBE_SUFFIX
        probed.shape, probed.type = out.shape, out.type
        model.graph.insert_after(node, add)
        was_output = out.is_graph_output()
        out.replace_all_uses_with(probed, replace_graph_outputs=True)
        add.replace_input_with(0, out)
        if was_output:  # keep the graph's output name
            old_name = out.name
            out.name, probed.name = old_name + ".bq_raw", old_name
        sites.append(ProbeSite(info.name, op, reads.name, probe.name, attrs, axis))
    return sites
