"""Lower 4- and 2-bit DequantizeLinear -> MatMul pairs to ``com.microsoft.MatMulNBits`` (target onnxruntime).

onnxruntime 1.31 fuses DequantizeLinear + MatMul into MatMulNBits for only one MatMul per graph (its own
quantizer's QDQ output included; benchmarks/runtime_latency.md; 1.32 too, measured ad hoc), and an unfused pair
dequantizes the whole weight on every run: 8-9x slower than FP32 on a 4x2048^2 MLP. Writing MatMulNBits directly,
as onnxruntime's own quantizer does by default, gives every layer the compressed kernel. Same numbers:
``(code - zp) * scale`` with the stored codes, zero points and scales; only the layout changes
(``B[N, blocks, G*bits/8]``, first code in the lowest bits; int2 codes, written for ``--target onnxruntime``,
become ``bits=2``). fp16 scales (stored fp16, cast to float in front of the DequantizeLinear) become fp32:
MatMulNBits takes scales of the activation's type, so these weights store 32-bit scales (the budget stage counts
what is written).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.ort_fusion import fusable_blocking, sole_matmul_b

DOMAIN = "com.microsoft"


#: code type -> (bits, signed)
_CODES = {ir.DataType.UINT4: (4, False), ir.DataType.INT4: (4, True), ir.DataType.UINT2: (2, False),
          ir.DataType.INT2: (2, True)}


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``8 // bits`` codes along the last axis -> one byte, first code in the lowest bits (the last axis is padded
    with zeros to a whole byte)."""
    per = 8 // bits
    v = values.astype(np.uint8)
    pad = -v.shape[-1] % per
    if pad:
        v = np.concatenate([v, np.zeros((*v.shape[:-1], pad), np.uint8)], axis=-1)
    out = np.zeros((*v.shape[:-1], v.shape[-1] // per), np.uint8)
    for i in range(per):
        out |= (v[..., i::per] << (bits * i)).astype(np.uint8)
    return out




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
        if not fusable_blocking(dq):
            return False
        g = int(dq.attributes["block_size"].value)
        codes_v, scale_v = dq.inputs[0], dq.inputs[1]
        zp_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        cast = scale_v.producer() if scale_v is not None else None
        if cast is not None and cast.op_type == "Cast" and cast.domain in ("", "ai.onnx") and len(scale_v.uses()) == 1:
            scale_v = cast.inputs[0]  # an fp16 scale cast to float: read the fp16 values
        else:
            cast = None
        if codes_v is None or codes_v.const_value is None or scale_v.const_value is None:
            return False
        codes_type, scale_type = codes_v.const_value.dtype, scale_v.const_value.dtype
        float_scale = ir.DataType.FLOAT16 if cast is not None else ir.DataType.FLOAT
        if codes_type not in _CODES or scale_type != float_scale:
            return False
        if zp_v is not None and zp_v.const_value is None:
            return False
        matmul = sole_matmul_b(dq)
        if matmul is None:
            return False
        k, n = (int(d) for d in codes_v.const_value.shape)
        if k % g:
            return False
        blocks = k // g
        bits, signed = _CODES[codes_type]
        codes = np.asarray(codes_v.const_value.numpy()).astype(np.int16)
        if signed:  # symmetric: signed codes, zero point 0 -> unsigned with zp 2**(bits-1)
            half = 1 << (bits - 1)
            codes, zero = codes + half, np.full((blocks, n), half, np.int16)
        else:
            zero = np.asarray(zp_v.const_value.numpy()).astype(np.int16) if zp_v is not None \
                else np.zeros((blocks, n), np.int16)
        b = _pack(codes.T.reshape(n, blocks, g), bits)  # [N, blocks, G * bits / 8]
        zp_packed = _pack(zero.T, bits)  # [N, ceil(blocks * bits / 8)]
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
                       attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", bits),
                                   ir.AttrInt64("block_size", g)],
                       num_outputs=1, name=(matmul.name or base) + ".nbits")
        graph.insert_before(matmul, node)
        result = matmul.outputs[0]
        new = node.outputs[0]
        new.shape, new.type = result.shape, result.type
        was_output = result.is_graph_output()
        result.replace_all_uses_with(new, replace_graph_outputs=True)
        name = result.name
        graph.remove([matmul, dq, *([cast] if cast is not None else [])], safe=True)
        new.name = name if was_output or name else new.name
        for value in (codes_v, scale_v, zp_v):
            if value is not None and not list(value.uses()) and value.name in graph.initializers:
                graph.initializers.pop(value.name)
        return True
