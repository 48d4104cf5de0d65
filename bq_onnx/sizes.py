"""Size accounting: payload bits, metadata bits and bytes on disk, per layer and in total.

*Payload* is what the bit width promises (``bits`` per weight) plus sparse outliers (an index and an fp16 value
each: per-weight data, so they count against ``--bits``). *Metadata* is everything else a layer stores (scales,
zero points, codebooks, offsets); a vector codebook is ``2**(bits*d)`` fp16 vectors of length ``d``, stored once
per tensor and width however many slices share it. *Stored* bytes are what the written initializers really take,
container waste included (3-bit codes in an int4 container take 4 bits in the native format).

What the native format stores depends on the target (:class:`Storage`, :func:`storage_of`): measured with
onnxruntime 1.32 and OpenVINO 2026.4 (``tests/test_containers.py``), fp16 scales cast to float *before* the
``DequantizeLinear`` decode exactly in both and keep onnxruntime's MatMulNBits fusion (a Cast after it does not:
OpenVINO then rounds differently and onnxruntime stops fusing); ``int2``/``uint2`` codes (opset 25) run in
onnxruntime only (OpenVINO's ONNX reader: "Unsupported data type INT2"), so only ``--target onnxruntime`` stores
1..2-bit grids in them. int4 codes plus their scales cost at least 4.16 bits per weight, so on the default target
and OpenVINO (no int2) a budget that no allocation in containers meets (``--bits 4`` and below, as a rule) is met by
storing the 1..3-bit grids, which have no container of their size there, packed at exactly their width with their
zero points, as compact does, decoded by standard ops in the graph (:data:`Storage.packed`,
:func:`bq_onnx.targets.pack_low_widths`). Those tensors are decoded to float when the runtime loads the model
(smaller file, not less RAM); wherever containers meet the budget, every layer stays one (MatMulNBits fusion kept).
``--target onnxruntime`` packs its 3-bit grids the same way where no allocation at 3 bits or more in containers
meets the budget: int2 alone would meet it, but would buy 2 or 4 bits per weight
(:func:`bq_onnx.targets.pack_low_widths`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor

INT2_OPSET = 25
"""The first opset whose DequantizeLinear reads int2/uint2 codes."""


@dataclasses.dataclass(frozen=True)
class Storage:
    """What one output stores per code and per scale: the format, and in native the target's containers."""

    format: str
    int2: bool = False  # native: 1..2-bit grids in int2/uint2 containers (opset 25)
    scale_bits: int = 16  # native: fp16 scales (a Cast before DequantizeLinear), 32 where a target needs fp32
    blocked_int4: bool = False  # native: int4 only blocked (TensorRT), so a ragged last block is padded
    packed: bool = False  # native: 1..3-bit uniform grids with no container of their size stored packed (exact bits)
    nbits: bool = False  # native onnxruntime: a MatMul's weight becomes MatMulNBits (fp32 scales, zero points stored)


def as_storage(fmt: str | Storage) -> Storage:
    """A format name (the default target's storage) or a :class:`Storage` as it is."""
    return fmt if isinstance(fmt, Storage) else Storage(fmt)


def storage_of(config, derived=None) -> Storage:
    """The storage an :class:`~bq_onnx.config.OptimizeConfig` writes: the format, and in native what its target
    runs (no target: what both onnxruntime and OpenVINO run) and, from ``derived`` (a
    :class:`~bq_onnx.context.Derived`), whether 1..3-bit grids are packed (:func:`bq_onnx.targets.pack_low_widths`)."""
    fmt, target = config.storage.format, config.target.target
    packed = bool(derived is not None and derived.packed_codes)
    if fmt != "native" or not target:
        return Storage(fmt, packed=packed)
    from bq_onnx.runtimes.profiles import get_profile

    p = get_profile(target)
    return Storage(fmt, int2={"int2", "uint2"} <= p.containers, scale_bits=16 if p.fp16_scales else 32,
                   blocked_int4=p.int4_blocked_only, packed=packed and p.packed_codes,
                   nbits=p.name == "onnxruntime")  # the pipeline lowers to MatMulNBits for onnxruntime alone


def weight_storage(st: Storage, info) -> Storage:
    """The storage of one weight (a :class:`~bq_onnx.context.WeightInfo`): ``st`` less :attr:`Storage.nbits`
    unless a MatMul in the main graph alone reads it as its B input, as
    :class:`passes.matmulnbits.LowerMatMulNBitsPass` needs (whether its blocking fits is the tensor's, see
    :func:`nbits_lowered`)."""
    if not st.nbits:
        return st
    uses = list(info.value.uses())
    sole_b = (not info.scope and len(uses) == 1 and uses[0].node.op_type == "MatMul"
              and uses[0].node.domain in ("", "ai.onnx") and uses[0].idx == 1)
    return st if sole_b else dataclasses.replace(st, nbits=False)


def nbits_lowered(qt: QuantizedTensor, st: Storage) -> bool:
    """Whether MatMulNBits stores ``qt`` (``st.nbits``: a sole MatMul's B): int4 or int2 codes in blocks of a power of
    two of at least 16 rows that divide the reduction (:func:`bq_onnx.ort_fusion.fusable_blocking`; a ragged last
    block stays DequantizeLinear). An estimate per tensor: a tensor the allocation splits into pieces of several
    widths is not lowered (its fp16 scales cost less than priced)."""
    g = qt.block_size
    return (st.nbits and st.format == "native" and qt.kind == "uniform" and not qt.num_outliers
            and 0 < qt.bits <= 4 and not is_packed(qt, st) and g >= 16 and not g & (g - 1)
            and qt.num_blocks * g == qt.shape[0])


def container_bits(bits: int, int2: bool = False) -> int:
    """Bits one code takes in the native format's ``DequantizeLinear`` container: int2 for 1..2 where the target
    runs it, int4 for 1..4, int8 for 5..8, uint16 above (vector indices)."""
    if bits <= 0:
        return 0
    if bits <= 2 and int2:
        return 2
    return 4 if bits <= 4 else 8 if bits <= 8 else 16


def is_packed(qt: QuantizedTensor, fmt: str | Storage) -> bool:
    """Whether the native format stores ``qt`` packed at its exact width (a 1..3-bit uniform grid whose container
    would be wider, on a storage that packs them): the compact format's packing inside a native file."""
    st = as_storage(fmt)
    return (st.format == "native" and st.packed and qt.kind == "uniform" and 0 < qt.bits < 4
            and container_bits(qt.bits, st.int2) != qt.bits)


def stored_payload_bits(qt: QuantizedTensor, fmt: str | Storage) -> int:
    """Bits the format stores for the codes and outliers of ``qt``: the container in native (ragged blocks
    stored as a per-axis tail, padded to whole ones only where int4 must stay blocked), the packed width in compact
    (a whole number of bytes)."""
    k, n = qt.shape
    st = as_storage(fmt)
    if qt.kind == "mean":
        return 0
    if qt.kind == "float16":
        return 16 * k * n + qt.outlier_bits
    if st.format != "native" or is_packed(qt, st):
        return 8 * -(-qt.codes.size // 8) * qt.index_bits + qt.outlier_bits  # pack_bits pads to 8 codes
    rows = qt.codes.shape[0]
    int2 = st.int2 and qt.kind == "uniform"  # codebook and vector indices stay in int4/int8 (Gather decodes)
    box = container_bits(qt.index_bits, int2)
    if qt.kind == "uniform" and st.blocked_int4 and box == 4 and qt.num_blocks * qt.block_size != k:
        rows = qt.num_blocks * qt.block_size
    return box * rows * n + qt.outlier_bits


def metadata_bits(qt: QuantizedTensor, fmt: str | Storage) -> int:
    """Bits of per-block and per-tensor metadata, as each format stores them."""
    return block_metadata_bits(qt, fmt) + codebook_bits(qt)


def codebook_bits(qt: QuantizedTensor) -> int:
    """Bits of the per-tensor codebook (0 for uniform and mean): shared by every column of the tensor."""
    if qt.kind == "codebook":
        return 16 * (1 << qt.bits)
    if qt.kind == "vector":
        return 16 * int(qt.codebook.size)
    return 0


def block_metadata_bits(qt: QuantizedTensor, fmt: str | Storage) -> int:
    """Bits of the per-block metadata (scales, zero points, offsets), as each format stores them; double-quantized
    scales (compact) count their per-column fp16 super scales here too."""
    st = as_storage(fmt)
    nb, n = qt.num_blocks, qt.shape[1]
    blocks = nb * n
    if qt.kind == "mean":
        return 16 * blocks
    if qt.kind == "float16":
        return 0
    bits = 0
    if nbits_lowered(qt, st):  # fp32 scales [N, blocks]; zero points [N, ceil(blocks * bits / 8)] bytes, always
        box = container_bits(qt.bits, st.int2)
        return 32 * blocks + 8 * n * -(-nb * box // 8)
    if qt.kind == "uniform":
        packed = st.format != "native" or is_packed(qt, st)
        if qt.double_scales:  # a byte code per block, an fp16 super scale per column (compact only)
            bits += 8 * blocks + 16 * n
        else:
            bits += (16 if packed else st.scale_bits) * blocks
        if not qt.symmetric:
            container = qt.bits if packed else container_bits(qt.bits, st.int2)
            bits += container * blocks
    else:
        bits += 16 * blocks
        if qt.offset is not None:
            bits += 16 * blocks
    return bits


def layer_record(
    name: str,
    q: QuantizedTensor | QuantizedPieces,
    fmt: str | Storage,
    stored: dict[str, int],
    shape: tuple[int, ...],
    original_bytes: int,
) -> dict:
    """One row of the report: everything about one quantized weight, JSON-ready."""
    pieces = q.pieces if isinstance(q, QuantizedPieces) else ((0, q.shape[1], q),)
    st = as_storage(fmt)
    numel = int(np.prod(q.shape))
    payload = sum(p.payload_bits for _, _, p in pieces)
    books = {p.codebook.tobytes(): codebook_bits(p) for _, _, p in pieces if p.codebook is not None}
    meta = sum(block_metadata_bits(p, fmt) for _, _, p in pieces) + sum(books.values())
    stored_bytes = int(sum(stored.values()))
    first = pieces[0][2]
    kinds = sorted({p.kind for _, _, p in pieces})
    return {
        "name": name,
        "shape": list(shape),
        "view": list(q.shape),
        "bits": sum(p.shape[0] * p.shape[1] * p.bits for _, _, p in pieces) / numel if len(pieces) > 1 else first.bits,
        "kind": kinds[0] if len(kinds) == 1 else "+".join(kinds),
        "method": "+".join(dict.fromkeys(p.method for _, _, p in pieces))
        + ("+outliers" if any(p.num_outliers for _, _, p in pieces) else ""),
        "symmetric": bool(first.symmetric),
        "block_size": first.block_size,
        "format": st.format,
        "numel": numel,
        "payload_bits": payload,
        "metadata_bits": meta,
        "stored_bytes": stored_bytes,
        "original_bytes": int(original_bytes),
        "bits_per_weight": payload / numel,
        "bits_per_weight_with_metadata": (payload + meta) / numel,
        "stored_bits_per_weight": 8 * stored_bytes / numel,
        "pieces": [[start, stop, p.bits] for start, stop, p in pieces],
        "vector_dim": max(p.vector_dim if p.kind == "vector" else 1 for _, _, p in pieces),
        "outliers": sum(p.num_outliers for _, _, p in pieces),
        "outlier_bits": sum(p.outlier_bits for _, _, p in pieces),
        # runtimes run only plain DequantizeLinear (native uniform) on compressed weights; every other decode
        # (codebooks, vector codebooks, outliers, 0-bit means, packed codes, compact functions) is folded to float
        # at load
        "dequantized_at_load": st.format != "native"
        or any(p.kind != "uniform" or p.num_outliers or is_packed(p, st) for _, _, p in pieces),
        "packed_codes": any(is_packed(p, st) for _, _, p in pieces),  # native: codes packed at their width
        "tensors": dict(sorted(stored.items())),
    }


def totals(layers: list[dict]) -> dict:
    """Sums over layers, and bits per weight over all quantized weights."""
    numel = sum(r["numel"] for r in layers)
    payload = sum(r["payload_bits"] for r in layers)
    meta = sum(r["metadata_bits"] for r in layers)
    stored = sum(r["stored_bytes"] for r in layers)
    original = sum(r["original_bytes"] for r in layers)
    safe = max(numel, 1)
    return {
        "layers": len(layers),
        "numel": numel,
        "payload_bits": payload,
        "metadata_bits": meta,
        "stored_bytes": stored,
        "original_bytes": original,
        "bits_per_weight": payload / safe,
        "bits_per_weight_with_metadata": (payload + meta) / safe,
        "stored_bits_per_weight": 8 * stored / safe,
        "compression": original / stored if stored else 0.0,
    }
