"""A MatMul whose weight is decoded in column pieces becomes one MatMul per piece, outputs concatenated.

The native rewrite stores a weight in several pieces where one ``DequantizeLinear`` cannot hold it: slices of
output channels at widths in different containers (int4 and int8), a 0-bit or codebook slice, or a weight over
:data:`bq_onnx.passes.rewrite_native.MAX_DQ_ELEMENTS` codes (onnxruntime refuses the fusion of a 2^31-code one:
"QDQ blockwise quantization shape exceeds the MLAS int32 index range"). The decoded pieces meet in a
``Concat`` along the columns, which no runtime fuses: onnxruntime dequantizes the whole weight on every call or,
after the fast layout, folds it to float at session creation (FP32 memory and speed).

``MatMul(x, Concat(w_1, ..., w_m, axis=1)) == Concat(MatMul(x, w_1), ..., MatMul(x, w_m), axis=-1)`` for a 2-D
weight, exactly (each output column is the same dot product). Written that way, every piece that is a blockwise
``DequantizeLinear`` feeds its own MatMul, which onnxruntime fuses into MatMulNBits and OpenVINO reads as a
compressed fully-connected layer. Only Concats of constant-derived pieces (weights, not activations) are split.
"""

from __future__ import annotations

import onnx_ir as ir

_STANDARD = ("", "ai.onnx")
#: Elements a piece must have on average for the split to pay: a choice between pieces of ~200,000 elements, where
#: the split runs 0.52x FP32 against 7.15x unsplit (``benchmarks/output_speed_pieces.md``), and tiny ones, where many
#: MatMulNBits calls cost more than one float MatMul folded at load (not measured by a repository command).
MIN_PIECE_ELEMENTS = 1 << 16
#: How many producer steps back a piece may go to reach only constants: a decode is a few ops deep, a packed one
#: about 20 through its byte table (16 missed it, so a weight with packed pieces stayed one float MatMul).
_DEPTH = 64


class SplitMatMulPass(ir.passes.InPlacePass):
    """``MatMul(x, Concat(pieces, axis=1))`` of a decoded 2-D weight -> ``Concat(MatMul(x, piece)..., axis=-1)``."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        count = 0
        for graph in model.graphs():
            for node in list(graph):
                if node.op_type == "MatMul" and node.domain in _STANDARD:
                    count += _split(graph, node, f"bq.split{count}")
        return ir.passes.PassResult(model, modified=count > 0)


def _split(graph: ir.Graph, matmul: ir.Node, tag: str) -> bool:
    x, w = matmul.inputs[0], matmul.inputs[1]
    concat = w.producer() if w is not None else None
    if concat is None or concat.op_type != "Concat" or concat.domain not in _STANDARD or x is None:
        return False
    if len(list(w.uses())) != 1 or w.is_graph_output():
        return False
    pieces = list(concat.inputs)
    axis = concat.attributes.get("axis")
    if len(pieces) < 2 or axis is None or any(p is None for p in pieces) or w.shape is None or len(w.shape) != 2:
        return False  # a 2-D weight: its pieces are 2-D too
    if axis.value not in (1, -1) or not all(isinstance(d, int) for d in w.shape.dims):
        return False
    if w.shape[0] * w.shape[1] < MIN_PIECE_ELEMENTS * len(pieces):
        return False  # small pieces: one float MatMul (folded at load) is faster than many fused ones
    seen: dict[int, bool] = {}  # the pieces share their decode's table: each value walked once
    if not all(_constant_derived(p, _DEPTH, seen) for p in pieces):
        return False
    out = matmul.outputs[0]
    products = []
    for i, piece in enumerate(pieces):  # names unique per split (exporters leave MatMuls unnamed)
        node = ir.Node("", "MatMul", [x, piece], name=f"{tag}/col{i}")
        node.outputs[0].name = f"{tag}/col{i}"
        if out.dtype is not None:
            node.outputs[0].dtype = out.dtype
        graph.insert_before(matmul, node)
        products.append(node.outputs[0])
    joined = ir.Node("", "Concat", products, attributes=[ir.AttrInt64("axis", -1)], name=f"{tag}/cols")
    graph.insert_before(matmul, joined)
    if out.dtype is not None:
        joined.outputs[0].dtype = out.dtype
    joined.outputs[0].shape = out.shape
    if out.is_graph_output():
        outputs = graph.outputs
        outputs[outputs.index(out)] = joined.outputs[0]
    ir.convenience.replace_all_uses_with(out, joined.outputs[0])
    joined.outputs[0].name, out.name = out.name, f"{out.name}.bq_unsplit"
    graph.remove(matmul, safe=True)
    if not list(concat.outputs[0].uses()):
        graph.remove(concat, safe=True)
    return True


def _constant_derived(value: ir.Value, depth: int, seen: dict[int, bool]) -> bool:
    """Whether ``value`` is computed from initializers and constants only (within ``depth`` producer steps)."""
    if value.const_value is not None or value.is_initializer():
        return True
    if id(value) in seen:
        return seen[id(value)]
    node = value.producer()
    if node is None or depth == 0:
        return False
    if node.op_type == "Constant" and node.domain in _STANDARD:
        return True
    seen[id(value)] = result = all(v is None or _constant_derived(v, depth - 1, seen) for v in node.inputs)
    return result
