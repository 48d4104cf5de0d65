"""The ``compact`` format: exact b-bit packing (any b in 1..8), 0-bit blocks and codebooks.

Smallest file: codes take exactly ``bits`` per weight (plus padding to a group of 8 values), zero points are
packed at the same width, scales/offsets/codebooks are fp16; uniform scales of tensors with at least 3 blocks per
column are double-quantized by default (``--scales double``): a uint8 code per block and an fp16 super scale per
column, decoded as their float32 product. Decoding is a ``bq`` domain function per weight.
onnxruntime unpacks at session creation, so this saves disk and download, not RAM (DESIGN.md).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.decode.functions import (
    DOMAIN,
    DOMAIN_VERSION,
    OUTLIER_FUNCTION,
    build_function,
    build_outlier_function,
    build_vector_function,
    function_name,
    table_widths,
    vector_function_name,
    vector_layout,
    vector_table_widths,
)
from bq_onnx.decode.ops import byte_tables, layout_vector, outlier_arrays
from bq_onnx.decode.rewrite import RewritePass
from bq_onnx.emitter import GraphEmitter
from bq_onnx.packing import pack_bits
from bq_onnx.qtensor import QuantizedTensor


class RewriteCompactPass(RewritePass):
    format = "compact"

    @staticmethod
    def _function(model: ir.Model, fname: str, build) -> None:
        if (DOMAIN, fname, "") not in model.functions:
            fn = build(model.opset_imports[""])
            model.functions[fn.identifier()] = fn
        model.opset_imports[DOMAIN] = DOMAIN_VERSION

    def emit_outliers(self, em: GraphEmitter, x: ir.Value, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        self._function(model, OUTLIER_FUNCTION, build_outlier_function)
        index, value = outlier_arrays(qt.outlier_index, qt.outlier_value, qt.shape[0] * qt.shape[1])
        inputs = [x, em.tensor(index, f"{name}.bq_outlier_index"), em.tensor(value, f"{name}.bq_outlier_value")]
        return em.op(OUTLIER_FUNCTION, inputs, OUTLIER_FUNCTION, domain=DOMAIN)

    def _vector(self, em: GraphEmitter, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        """Indices packed at exactly ``bits * d`` bits: the low 8 in one stream, the rest in a second."""
        k, n = qt.shape
        d, ib = qt.vector_dim, qt.index_bits
        fname = vector_function_name(d, ib)
        self._function(model, fname, lambda opset: build_vector_function(d, ib, opset))
        codes = qt.codes.astype(np.uint16)
        inputs = [em.tensor(pack_bits(codes & 0xFF, min(ib, 8)), f"{name}.bq_packed")]
        if ib > 8:
            inputs.append(em.tensor(pack_bits(codes >> 8, ib - 8), f"{name}.bq_packed_high"))
        inputs.append(em.tensor(qt.codebook.astype(np.float16), f"{name}.bq_codebook", reuse=True))
        inputs.append(em.tensor(qt.scale.astype(np.float16), f"{name}.bq_scale"))
        layout = em.const(vector_layout(k, n, qt.block_size, d), "layout")
        return em.op(fname, [*inputs, *_tables(em, vector_table_widths(ib)), layout], fname, domain=DOMAIN)

    def emit(self, em: GraphEmitter, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        if qt.kind == "float16":  # fp16 values need no decode function: a Cast, as in native
            return em.op("Cast", [em.tensor(qt.offset.astype(np.float16), f"{name}.bq_fp16")], to=ir.DataType.FLOAT)
        if qt.kind == "vector":
            return self._vector(em, qt, name, model)
        k, n = qt.shape
        has_offset = qt.kind == "codebook" and qt.offset is not None
        double = qt.double_scales
        fname = function_name(qt.kind, qt.bits, qt.symmetric, has_offset, double)
        if (DOMAIN, fname, "") not in model.functions:
            fn = build_function(qt.kind, qt.bits, qt.symmetric, has_offset, model.opset_imports[""], double)
            model.functions[fn.identifier()] = fn
        model.opset_imports[DOMAIN] = DOMAIN_VERSION
        layout = em.const(layout_vector(k, n, qt.block_size), "layout")
        if qt.kind == "mean":
            inputs = [em.tensor(qt.offset.astype(np.float16), f"{name}.bq_mean")]
        else:
            inputs = [em.tensor(pack_bits(qt.codes, qt.bits), f"{name}.bq_packed")]
            if qt.kind == "uniform":
                if not qt.symmetric:
                    inputs.append(em.tensor(pack_bits(qt.zero_point, qt.bits), f"{name}.bq_zero"))
            else:
                inputs.append(em.tensor(qt.codebook.astype(np.float16), f"{name}.bq_codebook"))
            if double:  # a byte per block, an fp16 super scale per column: their product is the scale
                inputs.append(em.tensor(qt.scale_code, f"{name}.bq_scale_code"))
                inputs.append(em.tensor(qt.super_scale.astype(np.float16), f"{name}.bq_super_scale"))
            else:
                inputs.append(em.tensor(qt.scale.astype(np.float16), f"{name}.bq_scale"))
            if has_offset:
                inputs.append(em.tensor(qt.offset.astype(np.float16), f"{name}.bq_offset"))
            inputs += _tables(em, table_widths(qt.bits))
        return em.op(fname, [*inputs, layout], fname, domain=DOMAIN)


def _tables(em: GraphEmitter, widths: list[int]) -> list[ir.Value]:
    """The byte tables a decode function reads, built once per graph (:func:`bq_onnx.decode.ops.byte_tables`)."""
    return [em.derive(("byte_tables", w), lambda w=w: byte_tables(em, w)) for w in widths]
