"""The ``compact`` format: exact b-bit packing (any b in 1..8), 0-bit blocks and codebooks.

Smallest file: codes take exactly ``bits`` per weight (plus padding to a group of 8 values), zero points are
packed at the same width, scales/offsets/codebooks are fp16. Decoding is a ``bq`` domain function per weight.
onnxruntime unpacks at session creation, so this saves disk and download, not RAM (DESIGN.md).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.packing import pack_bits
from bq_onnx.passes.compact_functions import DOMAIN, DOMAIN_VERSION, build_function, function_name
from bq_onnx.passes.decode_ops import Emitter, layout_vector
from bq_onnx.passes.rewrite import RewritePass
from bq_onnx.qtensor import QuantizedTensor


class RewriteCompactPass(RewritePass):
    format = "compact"

    def emit(self, em: Emitter, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        k, n = qt.shape
        has_offset = qt.kind == "codebook" and qt.offset is not None
        fname = function_name(qt.kind, qt.bits, qt.symmetric, has_offset)
        if (DOMAIN, fname, "") not in model.functions:
            fn = build_function(qt.kind, qt.bits, qt.symmetric, has_offset, model.opset_imports[""])
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
            inputs.append(em.tensor(qt.scale.astype(np.float16), f"{name}.bq_scale"))
            if has_offset:
                inputs.append(em.tensor(qt.offset.astype(np.float16), f"{name}.bq_offset"))
        return em.op(fname, [*inputs, layout], fname, domain=DOMAIN)
