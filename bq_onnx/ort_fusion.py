"""What onnxruntime's DequantizeLinear + MatMul -> MatMulNBits fusion takes (1.32, measured:
``benchmarks/ort_fusion.md``): one rule for the pass that lowers to MatMulNBits itself and the fast layout that
keeps exactly the DequantizeLinear ops the fusion will take."""

from __future__ import annotations

import onnx_ir as ir


def fusable_blocking(dq: ir.Node) -> bool:
    """Blocks onnxruntime's DQ + MatMul -> MatMulNBits fusion takes: along axis 0, a power of two of at least 16."""
    attrs = {k: a.value for k, a in dq.attributes.items()}
    g = int(attrs.get("block_size", 0))
    return attrs.get("axis", 1) == 0 and g >= 16 and not g & (g - 1)


def sole_matmul_b(dq: ir.Node) -> ir.Node | None:
    """The standard MatMul that alone reads ``dq``'s output, as its input B (not a graph output), or None."""
    out = dq.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return None
    node, index = uses[0].node, uses[0].idx
    return node if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and index == 1 else None
