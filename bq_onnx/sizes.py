"""Size accounting: payload bits, metadata bits and bytes on disk, per layer and in total.

*Payload* is what the bit width promises (``bits`` per weight) plus sparse outliers (an index and an fp16 value
each: per-weight data, so they count against ``--bits``). *Metadata* is everything else a layer stores (scales,
zero points, codebooks, offsets); a vector codebook is ``2**(bits*d)`` fp16 vectors of length ``d``, stored once
per tensor and width however many slices share it. *Stored* bytes are what the written initializers really take,
container waste included (3-bit codes in an int4 container take 4 bits in the native format).
"""

from __future__ import annotations

import numpy as np

from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor


def container_bits(bits: int) -> int:
    """Bits one code takes in the native format's ``DequantizeLinear`` container: int4 for 1..4, int8 for 5..8
    (int2 is not used: OpenVINO does not read it, DESIGN.md), uint16 above (vector indices)."""
    return 0 if bits <= 0 else 4 if bits <= 4 else 8 if bits <= 8 else 16


def stored_payload_bits(qt: QuantizedTensor, fmt: str) -> int:
    """Bits the format stores for the codes and outliers of ``qt``: the container in native (ragged blocks
    padded to whole ones), the packed width in compact (a whole number of bytes)."""
    k, n = qt.shape
    if qt.kind == "mean":
        return 0
    if fmt != "native":
        return 8 * -(-qt.codes.size // 8) * qt.index_bits + qt.outlier_bits  # pack_bits pads to 8 codes
    rows = qt.codes.shape[0]
    if qt.kind == "uniform" and qt.num_blocks > 1 and qt.num_blocks * qt.block_size != k:
        rows = qt.num_blocks * qt.block_size
    return container_bits(qt.index_bits) * rows * n + qt.outlier_bits


def metadata_bits(qt: QuantizedTensor, fmt: str) -> int:
    """Bits of per-block and per-tensor metadata, as each format stores them."""
    return block_metadata_bits(qt, fmt) + codebook_bits(qt)


def codebook_bits(qt: QuantizedTensor) -> int:
    """Bits of the per-tensor codebook (0 for uniform and mean): shared by every column of the tensor."""
    if qt.kind == "codebook":
        return 16 * (1 << qt.bits)
    if qt.kind == "vector":
        return 16 * int(qt.codebook.size)
    return 0


def block_metadata_bits(qt: QuantizedTensor, fmt: str) -> int:
    """Bits of the per-block metadata (scales, zero points, offsets), as each format stores them."""
    nb, n = qt.num_blocks, qt.shape[1]
    blocks = nb * n
    if qt.kind == "mean":
        return 16 * blocks
    bits = 0
    if qt.kind == "uniform":
        bits += (32 if fmt == "native" else 16) * blocks  # DequantizeLinear scales are fp32 in native
        if not qt.symmetric:
            container = (4 if qt.bits <= 4 else 8) if fmt == "native" else qt.bits
            bits += container * blocks
    else:
        bits += 16 * blocks
        if qt.offset is not None:
            bits += 16 * blocks
    return bits


def layer_record(
    name: str,
    q: QuantizedTensor | QuantizedPieces,
    fmt: str,
    stored: dict[str, int],
    shape: tuple[int, ...],
    original_bytes: int,
) -> dict:
    """One row of the report: everything about one quantized weight, JSON-ready."""
    pieces = q.pieces if isinstance(q, QuantizedPieces) else ((0, q.shape[1], q),)
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
        "format": fmt,
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
        # (codebooks, vector codebooks, outliers, 0-bit means, compact functions) is folded to float at load
        "dequantized_at_load": fmt != "native"
        or any(p.kind != "uniform" or p.num_outliers for _, _, p in pieces),
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
