"""Size accounting: payload bits, metadata bits and bytes on disk, per layer and in total.

*Payload* is what the bit width promises (``bits`` per weight). *Metadata* is everything else a layer stores
(scales, zero points, codebooks, offsets). *Stored* bytes are what the written initializers really take,
container waste included (3-bit codes in an int4 container take 4 bits in the native format).
"""

from __future__ import annotations

import numpy as np

from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor


def metadata_bits(qt: QuantizedTensor, fmt: str) -> int:
    """Bits of per-block and per-tensor metadata, as each format stores them."""
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
        bits += 16 * blocks + 16 * (1 << qt.bits)
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
    payload = sum(int(np.prod(p.shape)) * p.bits for _, _, p in pieces)
    meta = sum(metadata_bits(p, fmt) for _, _, p in pieces)
    stored_bytes = int(sum(stored.values()))
    first = pieces[0][2]
    kinds = sorted({p.kind for _, _, p in pieces})
    return {
        "name": name,
        "shape": list(shape),
        "view": list(q.shape),
        "bits": payload / numel if len(pieces) > 1 else first.bits,
        "kind": kinds[0] if len(kinds) == 1 else "+".join(kinds),
        "method": first.method,
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
