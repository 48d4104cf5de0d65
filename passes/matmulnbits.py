"""Lower 4-bit DequantizeLinear -> MatMul pairs to onnxruntime's ``com.microsoft.MatMulNBits`` (target onnxruntime).

onnxruntime 1.31 fuses DequantizeLinear + MatMul into MatMulNBits for only one MatMul per graph (its own
quantizer's QDQ output included; benchmarks/runtime_latency.md), and an unfused pair dequantizes the whole weight
on every run: 8-9x slower than FP32 on a 4x2048^2 MLP. Writing MatMulNBits directly, as onnxruntime's own
quantizer does by default, gives every layer the compressed kernel. Same numbers: ``(code - zp) * scale``
with the stored codes, zero points and scales; only the layout changes (``B[N, blocks, G/2]``, low nibble first).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

DOMAIN = "com.microsoft"


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pairs along the last axis -> one byte, first value in the low nibble (last axis must be even)."""
    v = values.astype(np.uint8)
    return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)


class LowerMatMulNBitsPass(ir.passes.InPlacePass):
    """Replace ``MatMul(A, DequantizeLinear(codes4, scale, [zp], axis=0, block_size=G))`` by MatMulNBits."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        count = 0
        for dq in list(graph):
            lowered = self._lower(graph, dq)
            count += lowered
        if count:
            model.opset_imports.setdefault(DOMAIN, 1)
        return ir.passes.PassResult(model, modified=bool(count))

    @staticmethod
    def _lower(graph: ir.Graph, dq: ir.Node) -> bool:
        if dq.op_type != "DequantizeLinear" or dq.domain not in ("", "ai.onnx"):
            return False
        attrs = {k: a.value for k, a in dq.attributes.items()}
        g = attrs.get("block_size", 0)
        if attrs.get("axis", 1) != 0 or g < 16 or g & (g - 1):
            return False
        codes_v, scale_v = dq.inputs[0], dq.inputs[1]
        zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        if codes_v is None or codes_v.const_value is None or scale_v.const_value is None:
            return False
        codes_type, scale_type = codes_v.const_value.dtype, scale_v.const_value.dtype
        if codes_type not in (ir.DataType.UINT4, ir.DataType.INT4) or scale_type != ir.DataType.FLOAT:
            return False
        if zp_v is not None and zp_v.const_value is None:
            return False
        out = dq.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            return False
        matmul, index = uses[0].node, uses[0].idx
        if matmul.op_type != "MatMul" or matmul.domain not in ("", "ai.onnx") or index != 1:
            return False
        k, n = (int(d) for d in codes_v.const_value.shape)
        if k % g:
            return False
        blocks = k // g
        codes = np.asarray(codes_v.const_value.numpy()).astype(np.int16)
        if codes_type == ir.DataType.INT4:  # symmetric: signed codes, zero point 0 -> unsigned with zp 8
            codes, zero = codes + 8, np.full((blocks, n), 8, np.int16)
        else:
            zero = np.asarray(zp_v.const_value.numpy()).astype(np.int16) if zp_v is not None \
                else np.zeros((blocks, n), np.int16)
        b = _pack_nibbles(codes.T.reshape(n, blocks, g))  # [N, blocks, G/2]
        zp_cols = zero.T  # [N, blocks]
        if blocks % 2:
            zp_cols = np.concatenate([zp_cols, np.zeros((n, 1), np.int16)], axis=1)
        zp_packed = _pack_nibbles(zp_cols)  # [N, ceil(blocks / 2)]
        scales = np.ascontiguousarray(np.asarray(scale_v.const_value.numpy(), np.float32).T)  # [N, blocks]
        base = codes_v.name.removesuffix(".bq_codes")
        inits = [
            ir.Value(name=f"{base}.bq_nbits_b", const_value=ir.tensor(b, name=f"{base}.bq_nbits_b")),
            ir.Value(name=f"{base}.bq_nbits_scales", const_value=ir.tensor(scales, name=f"{base}.bq_nbits_scales")),
            ir.Value(name=f"{base}.bq_nbits_zero", const_value=ir.tensor(zp_packed, name=f"{base}.bq_nbits_zero")),
        ]
        for value in inits:
            graph.register_initializer(value)
        node = ir.Node(DOMAIN, "MatMulNBits", [matmul.inputs[0], *inits],
                       attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", 4),
                                   ir.AttrInt64("block_size", g)],
                       num_outputs=1, name=(matmul.name or base) + ".nbits")
        graph.insert_before(matmul, node)
        result = matmul.outputs[0]
        new = node.outputs[0]
        new.shape, new.type = result.shape, result.type
        was_output = result.is_graph_output()
        result.replace_all_uses_with(new, replace_graph_outputs=True)
        name = result.name
        graph.remove([matmul, dq], safe=True)
        new.name = name if was_output or name else new.name
        for value in (codes_v, scale_v, zp_v):
            if value is not None and not list(value.uses()) and value.name in graph.initializers:
                graph.initializers.pop(value.name)
        return True
