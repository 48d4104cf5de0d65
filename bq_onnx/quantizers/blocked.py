"""The blocked view every scalar quantizer works on (one row per block), its validation, fp16 rounding of
metadata, and the 0-bit case (each block stored as its mean) that every method falls back to."""

from __future__ import annotations

import dataclasses

import numpy as np

from bq_onnx.qtensor import QuantizedTensor, num_blocks, to_fp16_exact
from bq_onnx.quantizers import parallel

FP16_MAX = 65504.0
"""Largest finite fp16 value; metadata is clamped to ``[-FP16_MAX, FP16_MAX]`` before fp16 rounding."""


def quantize_mean(
    w: np.ndarray, block_size: int = 32, weights: np.ndarray | None = None, *, method: str = "mean"
) -> QuantizedTensor:
    """0 bits: each block decodes to its weighted mean (fp16); a block with all weights 0 to its plain mean.

    ``method`` is only recorded in the result (every method's 0-bit case lands here).
    """
    return _mean_result(_prepare(w, 0, block_size, weights), method)


@dataclasses.dataclass
class _Blocked:
    """``w`` as one row per block: row ``b = block_row * N + column``, the ``(nb, N)`` metadata order.

    Padding slots of the ragged last block row hold a copy of a real element of the same block (so min and
    max are unaffected) and weight 0.
    """

    x: np.ndarray  # (B, G) float32
    wt: np.ndarray | None  # (B, G) float64 scaled by a power of two to max < 1, 0 on padding; None: 1 on real elements
    valid: np.ndarray | None  # (B, G) float32 1/0; None when nothing is padded
    count: np.ndarray  # (B,) real elements per block
    shape: tuple[int, int]
    g: int
    nb: int
    block_size: int

    @property
    def nrows(self) -> int:
        return self.x.shape[0]

    @property
    def eff_wt(self) -> np.ndarray | None:
        """Element weights including the padding mask; None means all ones."""
        return self.wt if self.wt is not None else self.valid

    def per_block(self, v: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(v, dtype=np.float32).reshape(self.nb, self.shape[1]))

    def unblock(self, a: np.ndarray) -> np.ndarray:
        k, n = self.shape
        a = a.reshape(self.nb, n, self.g).transpose(0, 2, 1).reshape(self.nb * self.g, n)
        return np.ascontiguousarray(a[:k])


def _to_rows(a: np.ndarray, g: int, nb: int, fill: bool) -> np.ndarray:
    k, n = a.shape
    pad = nb * g - k
    if pad:
        tail = np.broadcast_to(a[(nb - 1) * g], (pad, n)) if fill else np.zeros((pad, n), a.dtype)
        a = np.concatenate([a, tail])
    return np.ascontiguousarray(a.reshape(nb, g, n).transpose(0, 2, 1).reshape(nb * n, g))


def _check_bits(bits: int, low: int = 0) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not low <= bits <= 8:
        raise ValueError(f"bits must be an integer in {low}..8, got {bits!r}")


def _prepare(w: np.ndarray, bits: int, block_size: int, weights: np.ndarray | None) -> _Blocked:
    _check_bits(bits)
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    arr = np.asarray(w)
    if arr.ndim != 2:
        raise ValueError(f"w must be 2-D (K, N), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise ValueError(f"w must be real numeric, got {arr.dtype}")
    k, n = arr.shape
    if k == 0 or n == 0:
        raise ValueError(f"w must not be empty, got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        w32 = arr.astype(np.float32, copy=False)
    if not np.isfinite(w32).all():
        raise ValueError("w contains NaN or Inf (or values beyond the float32 range)")
    g = min(int(block_size), k)
    nb = num_blocks(k, int(block_size))
    wt = None
    if weights is not None:
        wa = np.asarray(weights, dtype=np.float64)
        if wa.shape != (k, n):
            raise ValueError(f"weights must have shape {(k, n)}, got {wa.shape}")
        if not np.isfinite(wa).all() or (wa < 0).any():
            raise ValueError("weights must be finite and non-negative")
        wt = _to_rows(wa, g, nb, fill=False)
        if np.shares_memory(wt, wa):  # a reshape, not a copy: the caller's array is never scaled in place
            wt = wt.copy()
        np.ldexp(wt, -weight_exponent(wa), out=wt)
    x = _to_rows(w32, g, nb, fill=True)
    count = np.full(nb * n, g, dtype=np.int64)
    valid = None
    rem = k - (nb - 1) * g
    if rem != g:
        valid = np.ones(x.shape, dtype=np.float32)
        valid[(nb - 1) * n :, rem:] = 0.0
        count[(nb - 1) * n :] = rem
    return _Blocked(x=x, wt=wt, valid=valid, count=count, shape=(k, n), g=g, nb=nb, block_size=int(block_size))


def weight_exponent(weights: np.ndarray) -> int:
    """The ``e`` for which ``weights * 2**-e`` has its largest value in ``[0.5, 1)`` (0 for all zeros).

    Why a power of two: scaling by one is exact, so every weighted error, sum and comparison of a design is the
    same whether its weights are scaled by the whole tensor's largest value or by one slice's (a column-separable
    design computed slice by slice gives the whole tensor's bytes, :func:`bq_onnx.quantizers.spec.by_columns`)."""
    top = float(weights.max())
    return int(np.frexp(top)[1]) if top > 0 else 0


def _fp16(x: np.ndarray) -> np.ndarray:
    """Nearest fp16 value as float32, after clamping to the finite fp16 range."""
    return to_fp16_exact(np.clip(np.asarray(x, dtype=np.float64), -FP16_MAX, FP16_MAX))


def _block_mean(bl: _Blocked, weighted: bool) -> np.ndarray:
    x = bl.x.astype(np.float64)
    plain = (x.sum(axis=1) if bl.valid is None else (x * bl.valid).sum(axis=1)) / bl.count
    if not weighted or bl.wt is None:
        return plain
    ws = bl.wt.sum(axis=1)
    wx = (x * bl.wt).sum(axis=1)
    return np.where(ws > 0, wx / np.where(ws > 0, ws, 1.0), plain)


def _block_percentile(bl: _Blocked, q: float) -> np.ndarray:
    if bl.valid is None:
        return np.percentile(bl.x, q, axis=1).astype(np.float64)
    split = (bl.nb - 1) * bl.shape[1]
    out = np.empty(bl.nrows)
    if split:
        out[:split] = np.percentile(bl.x[:split], q, axis=1)
    out[split:] = np.percentile(bl.x[split:, : int(bl.count[-1])], q, axis=1)
    return out


def _segment_sums(a: np.ndarray, b0: np.ndarray, b1: np.ndarray) -> np.ndarray:
    """Sums of ``a[b0[i]:b1[i]]`` for ordered, contiguous segments that cover ``a``."""
    out = np.zeros(b0.size)
    nonempty = b1 > b0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(a, b0[nonempty])
    return out


def _mean_result(bl: _Blocked, method: str) -> QuantizedTensor:
    return QuantizedTensor(
        kind="mean", bits=0, shape=bl.shape, block_size=bl.block_size,
        offset=bl.per_block(_fp16(_block_mean(bl, weighted=True))), method=method,
    )


_CHUNK = 1 << 16
"""Elements per chunk of block rows in the search and code passes (keeps the temporaries in cache)."""


def _row_chunks(nrows: int, g: int):
    """Slices of block rows holding about :data:`_CHUNK` elements (at most), as many as a multiple of the pool's
    threads where there are several: a 384x384 weight's three chunks kept one of two threads idle a third of the
    time. Every pass over them computes each row on its own, so the chunks never change a result."""
    step = max(1, _CHUNK // g)
    count, threads = -(-nrows // step), parallel.threads()
    if count > 1 and threads > 1:
        step = -(-nrows // (-(-count // threads) * threads))
    for a in range(0, nrows, step):
        yield slice(a, min(a + step, nrows))
