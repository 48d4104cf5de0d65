"""The standard-op graphs that turn stored codes back into weights, shared by both storage formats.

Only ops that onnxruntime and OpenVINO both compute exactly and fold on constants are used: ``Cast``, float
``Mul``/``Sub``/``Add``/``Floor``, ``Range``, ``Equal``, ``MatMul`` of 0/1 bits by powers of two,
``Gather``, uint8 ``Add`` of disjoint bits, ``Reshape``/``Expand``/``Slice``/``Split``/``Pad``. No ``BitwiseAnd``
(OpenVINO does not fold it), no ``BitShift``, no integer ``Div``, no 64-bit arithmetic on data (DESIGN.md: OpenVINO
gets those wrong).

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
    padded_count: ir.Value  # [nb*G*N]: the codes with a ragged last block filled up
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
            em.const(i64(nb * g * n), "count"),
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
            em.op("Mul", [em.op("Mul", [nb, g], "rows"), n], "count"),
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


def unpack_codes(em: Emitter, packed: ir.Value, bits: int, count: ir.Value | None) -> ir.Value:
    """Packed uint8 stream (8 values per ``bits`` bytes, LSB first) -> uint8 codes ``[count]`` (``count`` None: every
    code of the stream, the padding to a multiple of 8 included, for a caller that slices it itself); callers
    reshape them in uint8 and cast to float last (4 bytes a code only once).

    By byte lookup: byte ``j`` of a group indexes rows ``256 j ..`` of a table of what its bits add to each of the
    group's 8 codes (:func:`byte_tables`), and the ``bits`` parts are added in uint8 (disjoint bits: exact).
    Runtimes fold a constant decode at load and onnxruntime keeps every folded intermediate until its pass ends,
    so the intermediates' sizes are what opening the model costs: about ``2 + 1.5 bits`` bytes per code before
    the float codes, where unpacking bit by bit in float held ``4 bits`` bytes per code five times over (MiniLM-L6
    at ``--bits 3``: a 2.4 GB peak to open a 9 MB file, 1.0 GB now). No ``BitwiseAnd`` (OpenVINO never folds it, and its
    recurrent layers take constant weights only), no ``BitShift``, no integer division (DESIGN.md).
    """
    if bits == 8:  # a byte is a code
        return packed if count is None else em.op("Slice", [packed, em.const(i64(0)), count, em.const(i64(0))],
                                                  "codes")
    groups = em.op("Reshape", [packed, em.const(i64(-1, bits), "shape")])
    offsets = em.const((256 * np.arange(bits, dtype=np.int32)).reshape(1, bits), "byte_rows")
    index = em.op("Add", [em.op("Cast", [groups], to=ir.DataType.INT32), offsets], "index")
    parts = em.op("Gather", [em.derive(("byte_tables", bits), lambda: byte_tables(em, bits)), index], "parts",
                  axis=0)  # [G, bits, 8] uint8
    if bits == 1:
        total = parts
    else:
        pieces = em.ops("Split", [parts], bits, "part", axis=1, num_outputs=bits)
        total = pieces[0]
        for piece in pieces[1:]:
            total = em.op("Add", [total, piece], "codes")
    flat = em.op("Reshape", [total, em.const(i64(-1), "shape")], "codes")
    if count is None:
        return flat
    return em.op("Slice", [flat, em.const(i64(0)), count, em.const(i64(0))], "codes")


def bit_places(bits: int) -> np.ndarray:
    """``[2, bits, 8, 1]`` uint8: for bit ``i`` of a group's byte ``j``, the code it belongs to (``[0]``) and its
    value there (``[1]``, ``2^e`` for bit ``e`` of that code). The table's weights are a one-hot of the first
    times the second, built in the graph: ``16 bits`` stored bytes instead of the ``64 bits`` of the weights."""
    out = np.zeros((2, bits, 8, 1), dtype=np.uint8)
    for j in range(bits):
        for i in range(8):
            code, e = divmod(8 * j + i, bits)
            out[0, j, i, 0], out[1, j, i, 0] = code, 1 << e
    return out


def _arange(em: Emitter, limit: int, label: str) -> ir.Value:
    """``[0, 1, ..., limit - 1]`` as float32, computed (not stored)."""
    return em.op("Range", [em.const(np.array(0.0, np.float32), "start"),
                           em.const(np.array(float(limit), np.float32), "limit"),
                           em.const(np.array(1.0, np.float32), "delta")], label)


def byte_bits(em: Emitter) -> ir.Value:
    """``[256, 8]`` float: bit ``i`` of byte value ``v``, ``floor(v / 2^i) - 2 floor(v / 2^(i+1))`` from
    ``Range(0, 256)`` (exact in float32; OpenVINO computes ``Mod`` on these wrongly); one per graph, shared by every
    width's table."""
    values = _arange(em, 256, "byte_values")
    shifts = (1.0 / (1 << np.arange(9))).astype(np.float32)
    low = em.op("Floor", [em.op("Mul", [values, em.const(shifts[:8].reshape(8, 1), "inv_masks")])])
    high = em.op("Floor", [em.op("Mul", [values, em.const(shifts[1:].reshape(8, 1), "inv_masks")])])
    bits = em.op("Sub", [low, em.op("Mul", [high, em.const(np.array(2.0, np.float32), "two")])], "bits")
    return em.op("Transpose", [bits], "bits", perm=[1, 0])


def byte_tables(em: Emitter, bits: int) -> ir.Value:
    """``[256 bits, 8]`` uint8, row ``256 j + v``: what byte value ``v`` at a group's position ``j`` adds to its 8
    codes, ``byte_bits(v) @ weights[j]`` (``weights[j, i, k]`` = the value of bit ``i`` of byte ``j`` in code
    ``k``: a one-hot of :func:`bit_places` ``[0]`` times ``[1]``), computed at load (small integers, exact)."""
    places = em.op("Cast", [em.const(bit_places(bits), "bit_places")], to=ir.DataType.FLOAT)
    code_of, value_of = em.ops("Split", [places], 2, "places", axis=0, num_outputs=2)  # [1, bits, 8, 1] each
    codes = em.derive(("code_index",), lambda: _arange(em, 8, "Range"))
    weights = em.op("Mul", [em.op("Cast", [em.op("Equal", [code_of, codes])], to=ir.DataType.FLOAT), value_of])
    tables = em.op("MatMul", [em.derive(("byte_bits",), lambda: byte_bits(em)), weights])  # [1, bits, 256, 8]
    flat = em.op("Reshape", [tables, em.const(i64(256 * bits, 8), "shape")])
    return em.op("Cast", [flat], "tables", to=ir.DataType.UINT8)


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
