"""The ``native`` format: standard DequantizeLinear (opset 21) that runtimes execute on compressed weights.

Uniform grids become ``DequantizeLinear`` with ``block_size`` on axis 0 (per-axis when a column is one block,
except int4 on targets that run int4 only blocked, where K == block size stays one block), codes
in an int2 container for <= 2 bits where the target runs it (``--target onnxruntime``, opset 25), int4 for <= 4
and int8 for 5..8 (the allocated grid is kept; the container only sets storage). Scales are stored fp16 and cast
to float in front of the ``DequantizeLinear`` (exact in onnxruntime and OpenVINO, MatMulNBits fusion kept:
:mod:`bq_onnx.sizes`), fp32 on targets whose profile does not say fp16 scales.
Ragged blocks are padded to whole blocks and sliced after decoding, so every runtime's divisibility rule holds.
Where no allocation in containers meets the stored budget (:func:`bq_onnx.targets.pack_low_widths`), a 1..3-bit
grid with no container of its size on the target (int4 would store 4 bits: the default target and OpenVINO,
:func:`bq_onnx.sizes.is_packed`) is stored packed at its exact width with its zero points, as in the compact
format, and decoded inline by standard ops (a byte lookup, which both runtimes fold to constants).
Codebook and 0-bit layers use Gather/Mul/Add and dequantize at session creation; so do vector codebooks (Gather of
codebook rows, Transpose, Reshape, Mul) and sparse outliers (Gather, Add, ScatterElements after the dense decode),
which onnxruntime constant-folds and OpenVINO folds at load: they save disk, not RAM.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from bq_onnx.decode.ops import BlockDims, add_outliers, expand_blocks, outlier_arrays, unpack_codes, vector_rows
from bq_onnx.decode.rewrite import RewritePass
from bq_onnx.emitter import GraphEmitter, i64
from bq_onnx.packing import pack_bits
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, take_columns
from bq_onnx.sizes import container_bits, is_packed


def container(bits: int, signed: bool, int2: bool = False) -> tuple[ir.DataType, np.dtype]:
    """The ONNX code type of a ``bits``-wide grid and the numpy type its codes are written from."""
    if bits <= 2 and int2:  # onnx-ir writes 2-bit types from int8/uint8 arrays
        return (ir.DataType.INT2, np.int8) if signed else (ir.DataType.UINT2, np.uint8)
    if bits <= 4:
        return (ir.DataType.INT4, ml_dtypes.int4) if signed else (ir.DataType.UINT4, ml_dtypes.uint4)
    return (ir.DataType.INT8, np.int8) if signed else (ir.DataType.UINT8, np.uint8)


MAX_DQ_ELEMENTS = 2**30
"""Codes one ``DequantizeLinear`` holds at most: onnxruntime 1.32 refuses the DQ + MatMul fusion of a 2^31-element
weight ("QDQ blockwise quantization shape exceeds the MLAS int32 index range"), and a chunk of 2^31 - 32768 codes
crashed the verifying process (SIGSEGV) after the write (``benchmarks/streaming_memory.md``): half that, a margin
for index arithmetic in 32 bits that multiplies the element count by 2."""


class RewriteNativePass(RewritePass):
    format = "native"
    max_dq_elements = MAX_DQ_ELEMENTS  # a class attribute, so tests can lower it

    def groups(self, pieces: QuantizedPieces) -> list[QuantizedTensor]:
        """Runs of adjacent uniform pieces stored in the same container share one DequantizeLinear (so onnxruntime
        still fuses a single run into MatMulNBits); a run in another container, a 0-bit block (its fp16 mean) and
        any other kind are stored on their own and the decoded runs concatenated: no piece pays for a wider
        container than its own, as the tables count it."""
        out: list[QuantizedTensor] = []
        run: list[QuantizedTensor] = []
        int2 = self.storage.int2

        def key(q: QuantizedTensor) -> tuple | None:
            if q.kind != "uniform" or q.num_outliers:
                return None
            if is_packed(q, self.storage):  # packed runs join only at their own width
                return "packed", q.bits, q.symmetric, q.block_size
            return container_bits(q.bits, int2), q.symmetric, q.block_size

        for _, _, qt in pieces.pieces:
            if run and (key(qt) is None or key(qt) != key(run[-1])):
                out.append(self.merge(run))
                run = []
            if key(qt) is None:
                out.append(qt)
            else:
                run.append(qt)
        if run:
            out.append(self.merge(run))
        if len(out) > 1 and self._int4_into_consumer_only() and any(
                q.kind == "uniform" and container_bits(q.bits, int2) == 4 for q in out):
            whole = self.merge([qt for _, _, qt in pieces.pieces])  # int4 cannot feed a Concat there
            return [whole] if whole is not None else out
        return out

    def chunks(self, qt: QuantizedTensor) -> list[QuantizedTensor]:
        """A ``DequantizeLinear`` weight of more than :data:`MAX_DQ_ELEMENTS` codes as slices of columns under it
        (onnxruntime refuses the MatMul fusion of a larger one at session creation; each slice then feeds its own
        MatMul: :mod:`bq_onnx.passes.split_matmul`). Not where int4 must feed its consumer directly (TensorRT)."""
        k, n = qt.shape
        if (qt.kind != "uniform" or is_packed(qt, self.storage) or k * n <= self.max_dq_elements or n < 2
                or self._int4_into_consumer_only()):
            return [qt]
        step = max(1, self.max_dq_elements // k)
        return [take_columns(qt, start, min(start + step, n)) for start in range(0, n, step)]

    @staticmethod
    def merge(qts: list[QuantizedTensor]) -> QuantizedTensor | None:
        """Uniform slices of one symmetry and block size as one tensor at the widest grid (in the widest
        container); 0-bit slices become code ``zp - 1`` with scale ``-mean``. None if they cannot share one."""
        if len(qts) == 1:
            return qts[0]
        uniform = [q for q in qts if q.kind == "uniform"]
        if not uniform or any(q.kind not in ("uniform", "mean") or q.num_outliers for q in qts):
            return None
        symmetric = uniform[0].symmetric
        if any(q.symmetric != symmetric for q in uniform) or len({q.block_size for q in qts}) > 1:
            return None
        bits = max(q.bits for q in qts)
        zp_all = 1 << (bits - 1)
        codes, scales, zeros = [], [], []
        for q in qts:
            if q.kind == "mean":  # (c - zp) * s == mean with c - zp == -1 and s == -mean
                codes.append(np.full(q.shape, zp_all - 1 if symmetric else 0, dtype=np.uint8))
                scales.append(-q.offset)
                zeros.append(np.ones((q.num_blocks, q.shape[1]), dtype=np.uint8))
            elif symmetric:
                codes.append((q.codes.astype(np.int16) - q.implicit_zero_point + zp_all).astype(np.uint8))
                scales.append(q.scale)
            else:
                codes.append(q.codes)
                scales.append(q.scale)
                zeros.append(q.zero_point)
        return QuantizedTensor(
            "uniform",
            bits,
            (qts[0].shape[0], sum(q.shape[1] for q in qts)),
            qts[0].block_size,
            codes=np.concatenate(codes, axis=1),
            scale=np.concatenate(scales, axis=1).astype(np.float32),
            zero_point=None if symmetric else np.concatenate(zeros, axis=1),
            symmetric=symmetric,
            method=qts[0].method,
        )

    def emit(self, em: GraphEmitter, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        assert not qt.double_scales, "double-quantized scales are a compact-format design"
        k, n = qt.shape
        g, _nb = qt.block_size, qt.num_blocks
        if qt.kind == "uniform":
            st = self.storage
            if is_packed(qt, st):
                return self._packed(em, qt, name)
            return self._dequantize_linear(em, qt, name, self._blocked_int4(), st.int2, st.scale_bits)
        dims = BlockDims.constant(em, k, n, g)
        if qt.kind == "vector":
            return self._vector(em, qt, name, dims)
        if qt.kind == "float16":
            return em.op("Cast", [em.tensor(qt.offset.astype(np.float16), f"{name}.bq_fp16")], to=ir.DataType.FLOAT)
        if qt.kind == "mean":
            offset = em.tensor(qt.offset.astype(np.float16), f"{name}.bq_mean")
            x = expand_blocks(em, em.op("Cast", [offset], to=ir.DataType.FLOAT), dims)
            return em.op("Expand", [x, dims.kn]) if dims.single_block else x
        dtype, np_dtype = container(qt.bits, signed=False)
        codes = em.tensor(qt.codes.astype(np_dtype), f"{name}.bq_codes", dtype)
        table = em.tensor(qt.codebook.astype(np.float16), f"{name}.bq_codebook")
        scale = em.tensor(qt.scale.astype(np.float16), f"{name}.bq_scale")
        index = em.op("Cast", [codes], to=ir.DataType.INT32)
        levels = em.op("Cast", [em.op("Gather", [table, index], axis=0)], to=ir.DataType.FLOAT)
        full_scale = expand_blocks(em, em.op("Cast", [scale], to=ir.DataType.FLOAT), dims)
        x = em.op("Mul", [levels, full_scale])
        if qt.offset is not None:
            offset = em.tensor(qt.offset.astype(np.float16), f"{name}.bq_offset")
            x = em.op("Add", [x, expand_blocks(em, em.op("Cast", [offset], to=ir.DataType.FLOAT), dims)])
        return x

    def emit_outliers(self, em: GraphEmitter, x: ir.Value, qt: QuantizedTensor, name: str, model: ir.Model) -> ir.Value:
        k, n = qt.shape
        index, value = outlier_arrays(qt.outlier_index, qt.outlier_value, k * n)
        return add_outliers(em, x, em.tensor(index, f"{name}.bq_outlier_index"),
                            em.tensor(value, f"{name}.bq_outlier_value"), em.const(i64(k, n), "shape"))

    @staticmethod
    def _vector(em: GraphEmitter, qt: QuantizedTensor, name: str, dims: BlockDims) -> ir.Value:
        k, n = qt.shape
        ib = qt.index_bits
        if ib <= 8:
            dtype, np_dtype = container(ib, signed=False)
        else:
            dtype, np_dtype = ir.DataType.UINT16, np.uint16
        codes = em.tensor(qt.codes.astype(np_dtype), f"{name}.bq_codes", dtype)
        table = em.tensor(qt.codebook.astype(np.float16), f"{name}.bq_codebook", reuse=True)
        scale = em.tensor(qt.scale.astype(np.float16), f"{name}.bq_scale")
        index = em.op("Cast", [codes], to=ir.DataType.INT32)
        ragged = qt.codes.shape[0] * qt.vector_dim != k
        rows = vector_rows(em, index, table, dims.rows_n, dims.k if ragged else None)
        return em.op("Mul", [rows, expand_blocks(em, em.op("Cast", [scale], to=ir.DataType.FLOAT), dims)])

    @staticmethod
    def _packed(em: GraphEmitter, qt: QuantizedTensor, name: str) -> ir.Value:
        """Codes (and zero points) packed at ``bits`` each, as the compact format stores them, decoded in the graph:
        ``(codes - zero) * scale`` per block in float32, as :meth:`QuantizedTensor.dequantize` computes it.

        The zero points follow the codes in one stream at the same width (one unpack per layer, not two). The codes
        are viewed as ``(nb, G, N)`` (a ragged last block padded, its padding sliced off after) and the per-block
        zero points and scales as ``(nb, 1, N)``, which broadcast: no per-row expansion of the metadata (the same
        float operations, a dozen nodes fewer per layer)."""
        k, n = qt.shape
        bits, g = qt.bits, qt.block_size
        dims = BlockDims.constant(em, k, n, g)
        blocked = not dims.single_block
        if qt.symmetric:
            packed = em.tensor(pack_bits(qt.codes, bits), f"{name}.bq_packed")
            codes = unpack_codes(em, packed, bits, None if k * n % 8 == 0 else dims.count)
            zero = em.const(np.array(qt.implicit_zero_point, dtype=np.float32), "zero_point")
        else:
            stream = np.concatenate([qt.codes.reshape(-1), qt.zero_point.reshape(-1)])
            packed = em.tensor(pack_bits(stream, bits), f"{name}.bq_packed")
            both = unpack_codes(em, packed, bits, None)
            split = em.const(i64(k * n), "count")
            codes = em.op("Slice", [both, dims.zero, split, dims.zero], "codes")
            zero = em.op("Slice", [both, split, em.const(i64(stream.size), "count"), dims.zero], "zero")
            zero = em.op("Reshape", [zero, dims.nb_1_n]) if blocked else expand_blocks(em, zero, dims)
            zero = em.op("Cast", [zero], to=ir.DataType.FLOAT)
        scale = em.op("Cast", [em.tensor(qt.scale.astype(np.float16), f"{name}.bq_scale")], to=ir.DataType.FLOAT)

        def as_float(shape: ir.Value) -> ir.Value:  # the uint8 codes reshaped first: one float copy fewer
            return em.op("Cast", [em.op("Reshape", [codes, shape])], to=ir.DataType.FLOAT)

        if blocked:
            if dims.ragged:  # zero rows up to whole blocks
                rows = -(-k // g) * g
                codes = em.op("Pad", [codes, em.const(i64(0, (rows - k) * n), "pads")])
            x = em.op("Mul", [em.op("Sub", [as_float(dims.nb_g_n), zero]), em.op("Reshape", [scale, dims.nb_1_n])])
            if not dims.ragged:
                return em.op("Reshape", [x, dims.kn])
            return em.op("Slice", [em.op("Reshape", [x, dims.rows_n]), dims.zero, dims.k, dims.zero], "rows")
        return em.op("Mul", [em.op("Sub", [as_float(dims.kn), zero]), expand_blocks(em, scale, dims)])

    def _int4_into_consumer_only(self) -> bool:
        """Whether the target runs int4 only straight into its consumer (TensorRT): then one DequantizeLinear
        per weight, in the widest piece's container (the budget stage counts the padding that costs)."""
        target = self.ctx.config.target.target
        if not target:
            return False
        from bq_onnx.runtimes.profiles import get_profile

        return get_profile(target).int4_ops is not None

    def _blocked_int4(self) -> bool:
        """Whether the target runs int4 only blocked (TensorRT): then a single whole block stays blocked."""
        target = self.ctx.config.target.target
        if not target:
            return False
        from bq_onnx.runtimes.profiles import get_profile

        return get_profile(target).int4_blocked_only

    @staticmethod
    def _dequantize_linear(em: GraphEmitter, qt: QuantizedTensor, name: str, blocked_int4: bool = False,
                           int2: bool = False, scale_bits: int = 16) -> ir.Value:
        """``DequantizeLinear`` blocked on axis 0 (per-axis for one block). A ragged last block is its own
        per-axis ``DequantizeLinear`` concatenated below the whole blocks, so no code is stored twice and every
        runtime's divisibility rule holds; where int4 must stay blocked (TensorRT) it is padded and sliced."""
        k, n = qt.shape
        g, nb = qt.block_size, qt.num_blocks
        signed = qt.symmetric
        dtype, np_dtype = container(qt.bits, signed, int2)
        codes = qt.codes.astype(np.int16)
        if signed:
            codes = codes - qt.implicit_zero_point
        int4_blocked = blocked_int4 and container_bits(qt.bits, int2) == 4
        per_axis = nb == 1 and not (int4_blocked and k == g)
        ragged = not per_axis and nb * g != k
        zp = None if signed else qt.zero_point

        def dq(rows: slice, blocks: slice, suffix: str, blocked: bool, pad: int = 0) -> ir.Value:
            c, s = codes[rows], qt.scale[blocks]
            z = None if zp is None else zp[blocks]
            if pad:
                c = np.concatenate([c, np.zeros((pad, n), dtype=c.dtype)])
            if not blocked:
                s, z = s.reshape(n), None if z is None else z.reshape(n)
            if scale_bits == 16:  # fp16 values (qtensor), so fp16 storage is exact
                stored = em.tensor(s.astype(np.float16), f"{name}.bq_scale{suffix}")
                scale = em.op("Cast", [stored], "scale", to=ir.DataType.FLOAT)
                scale.dtype, scale.shape = ir.DataType.FLOAT, ir.Shape(stored.const_value.shape)
            else:
                scale = em.tensor(s, f"{name}.bq_scale{suffix}")
            inputs = [em.tensor(c.astype(np_dtype), f"{name}.bq_codes{suffix}", dtype), scale]
            if z is not None:
                inputs.append(em.tensor(z.astype(np_dtype), f"{name}.bq_zero{suffix}", dtype))
            if blocked:
                return em.op("DequantizeLinear", inputs, axis=0, block_size=g)
            return em.op("DequantizeLinear", inputs, axis=1)

        if not ragged:
            return dq(slice(None), slice(None), "", not per_axis)
        if int4_blocked:
            x = dq(slice(None), slice(None), "", True, pad=nb * g - k)
            return em.op("Slice", [x, em.const(i64(0)), em.const(i64(k), "k"), em.const(i64(0))], "rows")
        head = dq(slice(0, (nb - 1) * g), slice(0, nb - 1), "", True)
        tail = dq(slice((nb - 1) * g, k), slice(nb - 1, nb), ".tail", False)
        return em.op("Concat", [head, tail], "rows", axis=0)
