"""How a node reads one of its inputs: as data it computes with, or as a shape, scale, index or other control
value that must stay exact (a quantized Resize scale or Slice start would change what the graph does, not
perturb a number)."""

from __future__ import annotations

#: (op type) -> {input index: what that input is}; inputs not listed are data.
CONTROL_INPUTS: dict[str, dict[int, str]] = {
    "Reshape": {1: "shape"},
    "Expand": {1: "shape"},
    "ConstantOfShape": {0: "shape"},
    "Tile": {1: "repeats"},
    "Resize": {1: "roi", 2: "scales", 3: "sizes"},
    "Upsample": {1: "scales"},
    "Slice": {1: "starts", 2: "ends", 3: "axes", 4: "steps"},
    "Pad": {1: "pads", 2: "constant value", 3: "axes"},
    "TopK": {1: "k"},
    "Squeeze": {1: "axes"},
    "Unsqueeze": {1: "axes"},
    "Split": {1: "split"},
    "ReduceSum": {1: "axes"},
    "ReduceMean": {1: "axes"},
    "ReduceMax": {1: "axes"},
    "ReduceMin": {1: "axes"},
    "ReduceProd": {1: "axes"},
    "ReduceL1": {1: "axes"},
    "ReduceL2": {1: "axes"},
    "ReduceLogSum": {1: "axes"},
    "ReduceLogSumExp": {1: "axes"},
    "ReduceSumSquare": {1: "axes"},
    "CumSum": {1: "axis"},
    "Gather": {1: "indices"},
    "GatherElements": {1: "indices"},
    "GatherND": {1: "indices"},
    "ScatterElements": {1: "indices"},
    "ScatterND": {1: "indices"},
    "OneHot": {0: "indices", 1: "depth"},
    "Range": {0: "start", 1: "limit", 2: "delta"},
    "Clip": {1: "min", 2: "max"},
    "Trilu": {1: "k"},
    "Compress": {1: "condition"},
    "Where": {0: "condition"},
    "NonMaxSuppression": {1: "scores", 2: "max boxes", 3: "IoU threshold", 4: "score threshold"},
    "RoiAlign": {1: "rois", 2: "batch indices"},
    "QuantizeLinear": {1: "scale", 2: "zero point"},
    "DequantizeLinear": {1: "scale", 2: "zero point"},
    "LSTM": {4: "sequence lengths"},
    "GRU": {4: "sequence lengths"},
    "RNN": {4: "sequence lengths"},
    "Dropout": {1: "ratio", 2: "training mode"},
    "BlackmanWindow": {0: "size"},
    "HannWindow": {0: "size"},
    "HammingWindow": {0: "size"},
    "STFT": {1: "frame step", 3: "frame length"},
    "DFT": {1: "dft length", 2: "axis"},
}

#: Ops that read only an input's shape: the decoded tensor has the same one, so they neither need nor forbid it.
SHAPE_ONLY = frozenset({"Shape", "Size"})


def control_role(op_type: str, domain: str, input_index: int) -> str | None:
    """What a standard op reads at ``input_index`` when that is not data (``"shape"``, ``"scales"`` ...), else
    None. Custom-domain ops are unknown: they get None here and no layout elsewhere."""
    if domain not in ("", "ai.onnx"):
        return None
    return CONTROL_INPUTS.get(op_type, {}).get(input_index)


#: Roles whose value decides the graph's structure (what is computed where), not a number in a result: a tensor
#: whose values reach one through value-carrying ops is never a weight. Data-like control inputs (NMS scores,
#: Where's condition, Clip bounds) are not here: a whole detector feeds its NMS scores.
STRUCTURAL_ROLES = frozenset({
    "shape", "repeats", "roi", "scales", "sizes", "starts", "ends", "axes", "steps", "pads", "k", "split", "axis",
    "depth", "start", "limit", "delta", "size", "frame step", "frame length", "dft length", "sequence lengths",
})

#: Ops that hand their inputs' values on (elementwise arithmetic, layout, casts): a value reaching a structural
#: input through them is still the tensor's value. Reductions, matrix products and comparisons end the path.
VALUE_CARRIERS = frozenset({
    "Identity", "Cast", "CastLike", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Concat", "Slice",
    "Gather", "Split", "Expand", "Tile", "Mul", "Add", "Sub", "Div", "Neg", "Abs", "Floor", "Ceil", "Round", "Sqrt",
    "Pow", "Max", "Min", "Clip", "Relu", "Reciprocal", "Exp", "Log",
})


def structural_sources(nodes) -> dict[int, str]:
    """``id(value)`` -> ``"<role> by <op>:<name>"`` for every value whose numbers reach a structural input of one of
    ``nodes`` (onnx-ir nodes, any graph) through :data:`VALUE_CARRIERS` only. One backward walk: linear time."""
    found: dict[int, str] = {}
    stack = []
    for node in nodes:
        if node.domain not in ("", "ai.onnx"):
            continue
        for idx, role in CONTROL_INPUTS.get(node.op_type, {}).items():
            if role in STRUCTURAL_ROLES and idx < len(node.inputs) and node.inputs[idx] is not None:
                value = node.inputs[idx]
                if id(value) not in found:
                    found[id(value)] = f"{role} by {node.op_type}:{node.name or '?'}"
                    stack.append(value)
    while stack:
        value = stack.pop()
        producer = value.producer()
        if producer is None or producer.op_type not in VALUE_CARRIERS or producer.domain not in ("", "ai.onnx"):
            continue
        for idx, source in enumerate(producer.inputs):
            if source is None or id(source) in found:
                continue
            if CONTROL_INPUTS.get(producer.op_type, {}).get(idx):  # e.g. Gather's indices: not carried on
                continue
            found[id(source)] = found[id(value)]
            stack.append(source)
    return found
