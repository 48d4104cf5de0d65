"""The standard-op graphs that turn stored codes back into weights, shared by both storage formats.

Only ops that onnxruntime and OpenVINO both compute exactly are used: ``BitwiseAnd`` masks, ``Cast``, float
``Mul``/``Sub``/``Add``, ``MatMul`` of 0/1 bits by powers of two, ``Gather``, ``Reshape``/``Expand``/``Slice``.
No ``BitShift``, no integer ``Div``, no 64-bit arithmetic on data (DESIGN.md: OpenVINO gets those wrong).

Every builder takes an :class:`~bq_onnx.emitter.Emitter`: a ``GraphEmitter`` writes into the main graph
(constants become shared initializers), a ``FunctionEmitter`` into a function body (constants become
``Constant`` nodes), so the same builder serves both.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bq_onnx.emitter import Emitter, i64
from bq_onnx.layout import WeightLayout
from bq_onnx.qtensor import num_blocks


@dataclasses.dataclass
class BlockDims:
    """Shape tensors that expand per-block metadata ``(nb, N)`` to rows ``(K, N)``."""

    nb_1_n: ir.Value
    nb_g_n: ir.Value
    rows_n: ir.Value  # [-1, N]
    k: ir.Value  # [K]
    zero: ir.Value  # [0]
    kn: ir.Value  # [K, N]
    count: ir.Value  # [K*N]
    block_count: ir.Value  # [nb*N]
    ragged: bool = True
    single_block: bool = False

    @classmethod
    def constant(cls, em: Emitter, k: int, n: int, g: int) -> BlockDims:
        nb = num_blocks(k, g)
        return cls(
            em.const(i64(nb, 1, n), "shape"),
            em.const(i64(nb, g, n), "shape"),
            em.const(i64(-1, n), "shape"),
            em.const(i64(k), "k"),
            em.const(i64(0), "zero"),
            em.const(i64(k, n), "shape"),
            em.const(i64(k * n), "count"),
            em.const(i64(nb * n), "count"),
            ragged=nb * g != k,
            single_block=nb == 1,
        )

    @classmethod
    def from_layout(cls, em: Emitter, layout: ir.Value) -> BlockDims:
        """Inside a function: ``layout = [K, N, nb, G]`` (int64) is the decode's last input."""

        def pick(i: int) -> ir.Value:
            return em.op("Slice", [layout, em.const(i64(i)), em.const(i64(i + 1))], "dim")

        k, n, nb, g = (pick(i) for i in range(4))
        one, minus_one = em.const(i64(1)), em.const(i64(-1))
        return cls(
            em.op("Concat", [nb, one, n], "shape", axis=0),
            em.op("Concat", [nb, g, n], "shape", axis=0),
            em.op("Concat", [minus_one, n], "shape", axis=0),
            k,
            em.const(i64(0)),
            em.op("Concat", [k, n], "shape", axis=0),
            em.op("Mul", [k, n], "count"),
            em.op("Mul", [nb, n], "count"),
        )


def layout_vector(k: int, n: int, g: int) -> np.ndarray:
    return i64(k, n, num_blocks(k, g), g)


def expand_blocks(em: Emitter, per_block: ir.Value, dims: BlockDims) -> ir.Value:
    """``(nb, N)`` -> ``(K, N)``: repeat each block row G times, drop the ragged tail.

    With a single block the ``(1, N)`` row is returned as is: it broadcasts against ``(K, N)``.
    """
    if dims.single_block:
        return em.op("Reshape", [per_block, em.const(i64(1, -1), "shape")])
    x = em.op("Reshape", [per_block, dims.nb_1_n])
    x = em.op("Expand", [x, dims.nb_g_n])
    x = em.op("Reshape", [x, dims.rows_n])
    if dims.ragged:
        x = em.op("Slice", [x, dims.zero, dims.k, dims.zero], "rows")
    return x


def unpack_codes(em: Emitter, packed: ir.Value, bits: int, count: ir.Value | None, foldable: bool = False
                 ) -> ir.Value:
    """Packed uint8 stream (8 values per ``bits`` bytes, LSB first) -> float codes ``[count]`` (``count`` None: every
    code of the stream, the padding to a multiple of 8 included, for a caller that slices it itself).

    ``foldable``: bits by float arithmetic only (``floor(x / 2^i) - 2 floor(x / 2^(i+1))``, exact for bytes)
    instead of ``BitwiseAnd``, which OpenVINO never constant-folds: its recurrent layers accept constant weights
    only, so a decode feeding one must fold away at load.
    """
    groups = em.op("Reshape", [packed, em.const(i64(-1, bits, 1), "shape")])
    if foldable:
        as_float = em.op("Cast", [groups], to=ir.DataType.FLOAT)
        shifts = (1.0 / (1 << np.arange(9))).astype(np.float32)
        low = em.op("Floor", [em.op("Mul", [as_float, em.const(shifts[:8].reshape(1, 1, 8), "inv_masks")])])
        high = em.op("Floor", [em.op("Mul", [as_float, em.const(shifts[1:].reshape(1, 1, 8), "inv_masks")])])
        bit_values = em.op("Sub", [low, em.op("Mul", [high, em.const(np.array(2.0, np.float32), "two")])], "bits")
    else:
        masks = em.const((1 << np.arange(8, dtype=np.uint8)).astype(np.uint8).reshape(1, 1, 8), "masks")
        set_bits = em.op("BitwiseAnd", [groups, masks])
        as_float = em.op("Cast", [set_bits], to=ir.DataType.FLOAT)
        inv = em.const((1.0 / (1 << np.arange(8))).astype(np.float32).reshape(1, 1, 8), "inv_masks")
        bit_values = em.op("Mul", [as_float, inv], "bits")  # exact 0/1
    per_value = em.op("Reshape", [bit_values, em.const(i64(-1, 8, bits), "shape")])
    powers = em.const((1 << np.arange(bits)).astype(np.float32), "powers")
    codes = em.op("MatMul", [per_value, powers], "codes")  # small integers, exact in float32
    flat = em.op("Reshape", [codes, em.const(i64(-1), "shape")])
    if count is None:
        return flat
    return em.op("Slice", [flat, em.const(i64(0)), count, em.const(i64(0))], "codes")


def restore_layout(em: Emitter, view: ir.Value, layout: WeightLayout) -> ir.Value:
    """``(K, N)`` view -> the tensor's own shape (Reshape + Transpose only where needed)."""
    x = view
    if len(layout.shape) != 2 or layout.transposed_shape != layout.view_shape:
        x = em.op("Reshape", [x, em.const(i64(*layout.transposed_shape), "shape")])
    if layout.needs_transpose:
        x = em.op("Transpose", [x], perm=list(layout.inverse_perm))
    return x


def vector_rows(em: Emitter, index: ir.Value, table: ir.Value, rows_n: ir.Value, k: ir.Value | None) -> ir.Value:
    """Vector decode: int32 indices ``(Kv, N)`` into a ``(C, d)`` codebook -> float rows ``(K, N)``.

    ``Gather`` gives ``(Kv, N, d)``; the ``d`` coordinates of a vector are consecutive rows, so the transpose to
    ``(Kv, d, N)`` and a reshape to ``(Kv*d, N)`` lay them out; ``k`` (int64 ``[K]``) slices a ragged last vector.
    """
    vectors = em.op("Gather", [table, index], "vectors", axis=0)
    if vectors.dtype != ir.DataType.FLOAT:
        vectors = em.op("Cast", [vectors], to=ir.DataType.FLOAT)
    rows = em.op("Reshape", [em.op("Transpose", [vectors], perm=[0, 2, 1]), rows_n], "rows")
    if k is not None:
        rows = em.op("Slice", [rows, em.const(i64(0)), k, em.const(i64(0))], "rows")
    return rows


def add_outliers(em: Emitter, base: ir.Value, index: ir.Value, value: ir.Value, shape: ir.Value | None = None
                 ) -> ir.Value:
    """Sparse add: ``flat[idx] = flat[idx] + value`` (Gather, Add, ScatterElements; int32 indices, float32
    arithmetic), reshaped back to ``shape`` (default ``Shape(base)``)."""
    shape = em.op("Shape", [base]) if shape is None else shape
    flat = em.op("Reshape", [base, em.const(i64(-1), "shape")], "flat")
    idx = em.op("Cast", [index], to=ir.DataType.INT32)
    add = em.op("Cast", [value], to=ir.DataType.FLOAT)
    updated = em.op("Add", [em.op("Gather", [flat, idx], axis=0), add], "outliers")
    out = em.op("ScatterElements", [flat, idx, updated], "scatter", axis=0)
    return em.op("Reshape", [out, shape])


def outlier_arrays(index: np.ndarray, value: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Stored outlier arrays: uint16 indices when every flat index fits (else int32), fp16 values."""
    dtype = np.uint16 if numel <= (1 << 16) else np.int32
    return index.astype(dtype), value.astype(np.float16)
