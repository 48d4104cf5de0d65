"""What onnxruntime's constant folding would make of a model's packed codes, and when not to let it.

A weight stored bit-packed (1..3 bits where the target has no container, or codebook indexes) is decoded by a
graph of float ops over its codes (``bq_onnx.decode``). onnxruntime constant-folds that graph when a session is
created, and the folding holds every intermediate (a float32 lane per bit of every packed byte) at once: a 64 MiB
weight at ``--bits 4`` (int4 slices mixed with 3-bit packed ones) took 1.19 GiB to load, and its uniform 3-bit
candidate 2.4 GiB (``benchmarks/streaming_memory.md``), far past issue 21's bound of 1.5 x model + 1 GiB. Run
unfolded, the same graph decodes at each run through buffers the executor frees as it goes (+0.3 GiB for the
first). The result is the same graph's result; only the MatMul kernels differ (a weight that is not a constant is
not pre-packed), by float32 rounding.
"""

from __future__ import annotations

import onnx_ir as ir

#: Models whose packed codes could fold to more float bytes than this (:func:`folded_decode_bytes`) are run
#: unfolded where only memory matters (checks and measurements, never timings): folding costs about 25x the
#: float bytes it makes, so this keeps a folded session's transient near 0.4 GiB at most.
FOLDED_DECODE_BYTES = 16 * 2**20

#: Integer initializers that are codes: packed bytes and codebook indexes (read by decode ops), or containers
#: (read by ``DequantizeLinear``, which onnxruntime never folds: it fuses them into its quantized kernels).
_CODE_TYPES = frozenset({ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT4, ir.DataType.INT4,
                         ir.DataType.UINT2, ir.DataType.INT2})

#: float32 bytes per packed byte at most: 8 one-bit codes of 4 bytes each.
_FLOAT_BYTES_PER_PACKED_BYTE = 32


def folded_decode_bytes(model: ir.Model) -> int:
    """An upper bound on the float32 bytes constant folding makes of ``model``'s codes: every byte of an integer
    initializer that some node other than ``DequantizeLinear`` reads, as eight 1-bit codes (exact for 1 bit,
    8/3 times the truth for 3-bit codes). Reads no tensor data."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None or tensor.dtype not in _CODE_TYPES:  # a rewritten model's values carry no type
                continue
            if any(node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx") for node, _ in
                   value.uses()):
                total += tensor.nbytes * _FLOAT_BYTES_PER_PACKED_BYTE
    return total


def folds_too_much(model: ir.Model) -> bool:
    """Whether a session that only checks or measures ``model`` should run it unfolded (see the module)."""
    return folded_decode_bytes(model) > FOLDED_DECODE_BYTES
