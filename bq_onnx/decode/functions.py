"""Model-local decode functions of the ``compact`` format, in the custom domain ``bq``.

One function per (decode kind, bit width) actually used, built from standard ops only (see :mod:`.ops`), with the
model's own opset; vector codebooks get one per (vector length, index bits), and sparse outliers one ``AddOutliers``
applied to the dense decode. Inputs: the packed codes, the metadata, and a ``layout = [K, N, nb, G]`` int64 vector;
output: the float32 ``(K, N)`` view. onnxruntime inlines and constant-folds them at session creation; OpenVINO needs
them inlined first (the OpenVINO runtime adapter does that).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.decode.ops import (
    BlockDims,
    add_outliers,
    expand_blocks,
    layout_vector,
    unpack_codes,
    vector_rows,
)
from bq_onnx.emitter import FunctionEmitter, i64

DOMAIN = "bq"
DOMAIN_VERSION = 1


def function_name(kind: str, bits: int, symmetric: bool, has_offset: bool, double_scales: bool = False) -> str:
    """Uniform decodes of double-quantized scales (byte codes times per-column super scales) carry ``Dq``. Every
    decode folds to constants in both runtimes (:func:`bq_onnx.decode.ops.unpack_codes`), so one function per
    kind and width serves weights read as constants (OpenVINO's recurrent layers) and the others alike."""
    if kind == "mean":
        return "DecodeMean"
    if kind == "uniform":
        return f"DecodeUniform{'Sym' if symmetric else ''}{'Dq' if double_scales else ''}{bits}"
    return f"DecodeCodebook{'Offset' if has_offset else ''}{bits}"


def table_widths(*widths: int) -> list[int]:
    """The widths whose byte tables (:func:`bq_onnx.decode.ops.byte_tables`) a decode reads, in input order: the
    caller builds each once per graph and passes it, so no function body repeats the table's graph (8 bits: a byte
    is a code, no table)."""
    return sorted({w for w in widths if w < 8})


def table_input(bits: int) -> str:
    return f"tables{bits}"


def input_names(kind: str, symmetric: bool, has_offset: bool, double_scales: bool = False, bits: int = 8
                ) -> list[str]:
    if kind == "mean":
        return ["mean", "layout"]
    tables = [table_input(w) for w in table_widths(bits)]
    if kind == "uniform":
        scale = ["scale_code", "super_scale"] if double_scales else ["scale"]
        return ["packed", *([] if symmetric else ["zero"]), *scale, *tables, "layout"]
    return ["packed", "codebook", "scale"] + (["offset"] if has_offset else []) + [*tables, "layout"]


def _tables_from_inputs(em: FunctionEmitter, inputs: dict[str, ir.Value]) -> None:
    """The byte tables a decode's unpacking asks for are its inputs, not nodes of its body."""
    for name, value in inputs.items():
        if name.startswith("tables"):
            em.derived[("byte_tables", int(name[len("tables"):]))] = value


def build_function(kind: str, bits: int, symmetric: bool, has_offset: bool, opset: int,
                   double_scales: bool = False) -> ir.Function:
    """``double_scales``: the scale of block ``(j, c)`` is ``float(scale_code[j, c]) * float(super_scale[c])``, a
    float32 product that is exact (8-bit code, 11-bit fp16 mantissa), as :func:`bq_onnx.qtensor.decode_scales` does."""
    name = function_name(kind, bits, symmetric, has_offset, double_scales)
    em = FunctionEmitter("")
    inputs = {n: ir.Value(name=n) for n in input_names(kind, symmetric, has_offset, double_scales, bits)}
    _tables_from_inputs(em, inputs)
    dims = BlockDims.from_layout(em, inputs["layout"])

    def per_row(value: ir.Value) -> ir.Value:
        return expand_blocks(em, em.op("Cast", [value], to=ir.DataType.FLOAT), dims)

    def block_scales() -> ir.Value:  # [nb, N] float
        if not double_scales:
            return em.op("Cast", [inputs["scale"]], to=ir.DataType.FLOAT)
        code = em.op("Cast", [inputs["scale_code"]], to=ir.DataType.FLOAT)
        sup = em.op("Cast", [inputs["super_scale"]], to=ir.DataType.FLOAT)
        return em.op("Mul", [code, sup], "scale")

    if kind == "mean":
        out = per_row(inputs["mean"])
    else:
        codes = unpack_codes(em, inputs["packed"], bits, dims.count)
        if kind == "uniform":  # per block, as (nb, G, N) against (nb, 1, N): no per-row copies of the metadata
            pads = em.op("Concat", [dims.zero, em.op("Sub", [dims.padded_count, dims.count])], "pads", axis=0)
            codes = em.op("Reshape", [em.op("Pad", [codes, pads]), dims.nb_g_n])  # ragged rows: code 0, cut below
            codes = em.op("Cast", [codes], to=ir.DataType.FLOAT)
            if symmetric:
                zero = em.const(np.array(1 << (bits - 1), dtype=np.float32), "zero_point")
            else:
                zero = unpack_codes(em, inputs["zero"], bits, dims.block_count)
                zero = em.op("Cast", [em.op("Reshape", [zero, dims.nb_1_n])], to=ir.DataType.FLOAT)
            blocks = em.op("Mul", [em.op("Sub", [codes, zero]), em.op("Reshape", [block_scales(), dims.nb_1_n])])
            out = em.op("Slice", [em.op("Reshape", [blocks, dims.rows_n]), dims.zero, dims.k, dims.zero], "rows")
        else:
            index = em.op("Cast", [codes], to=ir.DataType.INT32)
            table = em.op("Cast", [inputs["codebook"]], to=ir.DataType.FLOAT)
            levels = em.op("Reshape", [em.op("Gather", [table, index], axis=0), dims.kn])
            out = em.op("Mul", [levels, per_row(inputs["scale"])])
            if has_offset:
                out = em.op("Add", [out, per_row(inputs["offset"])])
    out.name = "weight"
    graph = ir.Graph(
        list(inputs.values()), [out], nodes=em.tape.nodes, opset_imports={"": opset}, name=name
    )
    return ir.Function(DOMAIN, name, graph=graph, attributes=[])


OUTLIER_FUNCTION = "AddOutliers"


def vector_function_name(dim: int, index_bits: int) -> str:
    return f"DecodeVector{dim}x{index_bits}"


def vector_layout(k: int, n: int, block_size: int, dim: int) -> np.ndarray:
    """``[K, N, nb, G, Kv]``: the scalar layout plus the number of vectors per column."""
    return np.append(layout_vector(k, n, block_size), -(-k // dim)).astype(np.int64)


def vector_table_widths(index_bits: int) -> list[int]:
    """The widths of a vector decode's two index streams (low 8 bits, the rest) that read a byte table."""
    return table_widths(min(index_bits, 8), *([index_bits - 8] if index_bits > 8 else []))


def build_vector_function(dim: int, index_bits: int, opset: int) -> ir.Function:
    """Decode of a vector codebook: packed indices (low 8 bits, then the high ``index_bits - 8`` bits in a second
    stream when wider), the fp16 codebook ``(2**index_bits, dim)``, fp16 scales and ``[K, N, nb, G, Kv]``."""
    name = vector_function_name(dim, index_bits)
    em = FunctionEmitter("")
    tables = [table_input(w) for w in vector_table_widths(index_bits)]
    names = ["packed"] + (["packed_high"] if index_bits > 8 else []) + ["codebook", "scale", *tables, "layout"]
    inputs = {n: ir.Value(name=n) for n in names}
    _tables_from_inputs(em, inputs)
    dims = BlockDims.from_layout(em, inputs["layout"])
    kv = em.op("Slice", [inputs["layout"], em.const(i64(4)), em.const(i64(5))], "dim")
    n = em.op("Slice", [inputs["layout"], em.const(i64(1)), em.const(i64(2))], "dim")
    count = em.op("Mul", [kv, n], "count")
    codes = em.op("Cast", [unpack_codes(em, inputs["packed"], min(index_bits, 8), count)], to=ir.DataType.INT32)
    if index_bits > 8:
        high = em.op("Cast", [unpack_codes(em, inputs["packed_high"], index_bits - 8, count)], to=ir.DataType.INT32)
        codes = em.op("Add", [codes, em.op("Mul", [high, em.const(np.array(256, dtype=np.int32), "byte")])])
    index = em.op("Reshape", [codes, em.op("Concat", [kv, n], axis=0)])
    table = em.op("Cast", [inputs["codebook"]], to=ir.DataType.FLOAT)
    rows = vector_rows(em, index, table, dims.rows_n, dims.k)
    scale = expand_blocks(em, em.op("Cast", [inputs["scale"]], to=ir.DataType.FLOAT), dims)
    out = em.op("Mul", [rows, scale])
    out.name = "weight"
    graph = ir.Graph(list(inputs.values()), [out], nodes=em.tape.nodes, opset_imports={"": opset}, name=name)
    return ir.Function(DOMAIN, name, graph=graph, attributes=[])


def build_outlier_function(opset: int) -> ir.Function:
    """The sparse add: ``(weight, index, value) -> weight`` with ``flat[index] += value``."""
    em = FunctionEmitter("")
    inputs = {n: ir.Value(name=n) for n in ("dense", "index", "value")}
    out = add_outliers(em, inputs["dense"], inputs["index"], inputs["value"])
    out.name = "weight"
    graph = ir.Graph(list(inputs.values()), [out], nodes=em.tape.nodes, opset_imports={"": opset},
                     name=OUTLIER_FUNCTION)
    return ir.Function(DOMAIN, OUTLIER_FUNCTION, graph=graph, attributes=[])
