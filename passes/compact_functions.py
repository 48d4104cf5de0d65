"""Model-local decode functions of the ``compact`` format, in the custom domain ``bq``.

One function per (decode kind, bit width) actually used, built from standard ops only (see decode_ops), with
the model's own opset. Inputs: the packed codes, the metadata, and a ``layout = [K, N, nb, G]`` int64 vector;
output: the float32 ``(K, N)`` view. onnxruntime inlines and constant-folds them at session creation;
OpenVINO needs them inlined first (the OpenVINO runtime adapter does that).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.passes.decode_ops import BlockDims, Emitter, expand_blocks, unpack_codes

DOMAIN = "bq"
DOMAIN_VERSION = 1


def function_name(kind: str, bits: int, symmetric: bool, has_offset: bool) -> str:
    if kind == "mean":
        return "DecodeMean"
    if kind == "uniform":
        return f"DecodeUniform{'Sym' if symmetric else ''}{bits}"
    return f"DecodeCodebook{'Offset' if has_offset else ''}{bits}"


def input_names(kind: str, symmetric: bool, has_offset: bool) -> list[str]:
    if kind == "mean":
        return ["mean", "layout"]
    if kind == "uniform":
        return ["packed", "scale", "layout"] if symmetric else ["packed", "zero", "scale", "layout"]
    return ["packed", "codebook", "scale"] + (["offset"] if has_offset else []) + ["layout"]


def build_function(kind: str, bits: int, symmetric: bool, has_offset: bool, opset: int) -> ir.Function:
    name = function_name(kind, bits, symmetric, has_offset)
    em = Emitter("", in_function=True)
    inputs = {n: ir.Value(name=n) for n in input_names(kind, symmetric, has_offset)}
    dims = BlockDims.from_layout(em, inputs["layout"])

    def per_row(value: ir.Value) -> ir.Value:
        return expand_blocks(em, em.op("Cast", [value], to=ir.DataType.FLOAT), dims)

    if kind == "mean":
        out = per_row(inputs["mean"])
    else:
        codes = unpack_codes(em, inputs["packed"], bits, dims.count)
        if kind == "uniform":
            codes = em.op("Reshape", [codes, dims.kn])
            if symmetric:
                zero = em.const(np.array(1 << (bits - 1), dtype=np.float32), "zero_point")
            else:
                zero = expand_blocks(em, unpack_codes(em, inputs["zero"], bits, dims.block_count), dims)
            out = em.op("Mul", [em.op("Sub", [codes, zero]), per_row(inputs["scale"])])
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
