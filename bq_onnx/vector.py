"""Vector codebooks: ``d`` consecutive weights along the reduction axis share one index into a k-means codebook.

Plain numpy; nothing here knows about ONNX. Paper 003 eq. 4.1: the codebook minimizing the total squared error
of the vectors is a k-means problem. Here the error is weighted per *element* by the posterior precision, so the
objective is ``sum_i sum_j h_ij (c_{a(i),j} - x_ij)**2``: assignment uses that diagonal-weighted distance and a
centroid coordinate is the ``h``-weighted mean of its cell. Both steps never raise the objective (tested).

Layout in the canonical ``(K, N)`` view: rows ``[v*d, (v+1)*d)`` of column ``n`` form vector ``(v, n)``; a ragged
last vector (``K % d != 0``) is padded with weight-0 entries that the decode slices off. Each block of
``block_size`` rows (a multiple of ``d``) has an fp16 absmax scale, like the scalar Lloyd codebook: the vectors are
fitted in scaled space ``u = w / s`` with weights ``h * s**2`` (the error in weight space).

Which ``(bits, d)`` are offered (:func:`vector_dims`): ``bits * d <= MAX_INDEX_BITS`` (4096 centroids: k-means cost
grows with the codebook, and 2 bits x 8 = 65536 centroids would take minutes per tensor in numpy) and the fp16
codebook at most ``CODEBOOK_SHARE`` of the tensor's payload (a codebook larger than that is paid for by every
weight, so it rarely wins and would crowd small tensors).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from bq_onnx.qtensor import QuantizedTensor, num_blocks, to_fp16_exact

DIMS: tuple[int, ...] = (2, 4, 8)
"""Vector lengths offered by the allocation tables and ``--quantizer vq``."""

MAX_INDEX_BITS = 12
"""Largest index (``bits * d``) fitted: 4096 centroids."""

CODEBOOK_SHARE = 0.25
"""Largest fp16 codebook, as a share of the tensor's payload bits, that :func:`vector_dims` offers."""

FIT_SAMPLE = 1 << 15
"""Tensors with more vectors fit the codebook on a seeded subsample of this many (codes use all vectors)."""

N_INIT = 3
"""k-means restarts (k-means++ seeds) for codebooks of up to :data:`RESTART_MAX_K` vectors; the lowest weighted
error wins. Larger codebooks get one (their cost grows with the codebook, their spread between seeds shrinks)."""

RESTART_MAX_K = 256

MAX_ITER = 30
"""Lloyd iterations per restart (stops earlier when no assignment changes)."""

_CHUNK = 1 << 21
"""Vector x centroid distances computed at once (16 MiB of float64)."""

FP16_MAX = 65504.0


@dataclasses.dataclass
class KMeans:
    """A weighted k-means fit: ``centroids`` ``(k, d)``, ``labels`` ``(n,)``, the final weighted error ``loss`` and
    the error after every assignment of the winning restart (``history``, non-increasing)."""

    centroids: np.ndarray
    labels: np.ndarray
    loss: float
    history: list[float]


def vector_dims(bits: int, numel: int, share: float = CODEBOOK_SHARE) -> tuple[int, ...]:
    """The vector lengths of :data:`DIMS` offered at ``bits`` per weight for a tensor of ``numel`` weights: at most
    :data:`MAX_INDEX_BITS` index bits and a codebook of at most ``share`` of the payload."""
    if bits < 1:
        return ()
    out = []
    for d in DIMS:
        if bits * d > MAX_INDEX_BITS:
            continue
        if codebook_bits(bits, d) > share * numel * bits:
            continue
        out.append(d)
    return tuple(out)


def codebook_bits(bits: int, d: int) -> int:
    """Stored bits of one fp16 codebook of ``2**(bits*d)`` vectors of length ``d``."""
    return 16 * d << (bits * d)


def weighted_distances(x: np.ndarray, w: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``D[i, k] = sum_j w_ij (x_ij - c_kj)**2`` (float64), directly (small ``k``: k-means++ seeding, tests)."""
    diff = x[:, None, :] - c[None, :, :]
    return np.einsum("ikj,ikj,ij->ik", diff, diff, w)


def assign(x: np.ndarray, w: np.ndarray, c: np.ndarray, wx: np.ndarray | None = None) -> np.ndarray:
    """Nearest centroid of every vector under the weighted distance (ties to the lower index), over bounded
    chunks; ``wx = w * x`` when already computed.

    ``sum_j w (x - c)**2 = [w | w x] @ [c**2 ; -2 c] + sum_j w x**2``; the last term does not change the argmin.
    The product is one ``einsum`` (numpy's own loop, not BLAS: for these skinny ``(n, 2d)`` matrices
    multithreaded BLAS is ten times slower on a busy machine).
    """
    n, k = x.shape[0], c.shape[0]
    wx = w * x if wx is None else wx
    a = np.ascontiguousarray(np.hstack([w, wx]))
    b = np.ascontiguousarray(np.vstack([(c * c).T, -2.0 * c.T]))
    labels = np.empty(n, dtype=np.int64)
    step = max(1, _CHUNK // max(k, 1))
    for lo in range(0, n, step):
        labels[lo : lo + step] = np.argmin(np.einsum("ij,jk->ik", a[lo : lo + step], b), axis=1)
    return labels


def weighted_loss(x: np.ndarray, w: np.ndarray, c: np.ndarray, labels: np.ndarray) -> float:
    """``sum_i sum_j w_ij (c_{labels_i, j} - x_ij)**2`` computed directly (float64)."""
    diff = c[labels] - x
    return float(np.sum(w * diff * diff))


def update(x: np.ndarray, w: np.ndarray, labels: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Centroid step: each coordinate becomes the ``w``-weighted mean of its cell; a coordinate whose cell has no
    weight keeps its value (so the step never raises the error)."""
    k, d = c.shape
    new = c.copy()
    for j in range(d):
        den = np.bincount(labels, weights=w[:, j], minlength=k)
        num = np.bincount(labels, weights=w[:, j] * x[:, j], minlength=k)
        ok = den > 0
        new[ok, j] = num[ok] / den[ok]
    return new


def kmeans_pp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding with the weighted distance: the first seed by vector weight, each next one with
    probability proportional to its distance to the nearest seed so far. When every vector coincides with a seed
    (fewer distinct vectors than ``k``), the rest repeat chosen vectors (their cells stay empty)."""
    n = x.shape[0]
    vw = w.sum(axis=1)
    p = vw / vw.sum() if vw.sum() > 0 else np.full(n, 1.0 / n)
    centers = np.empty((k, x.shape[1]))
    first = int(rng.choice(n, p=p))
    centers[0] = x[first]
    dist = weighted_distances(x, w, centers[:1])[:, 0]
    for i in range(1, k):
        total = dist.sum()
        if not total > 0:
            centers[i:] = x[rng.choice(n, size=k - i)]
            break
        pick = int(np.searchsorted(np.cumsum(dist), rng.random() * total, side="right"))
        pick = min(pick, n - 1)
        centers[i] = x[pick]
        np.minimum(dist, weighted_distances(x, w, centers[i : i + 1])[:, 0], out=dist)
    return centers


def weighted_kmeans(
    x: np.ndarray,
    w: np.ndarray | None,
    k: int,
    *,
    seed: int = 0,
    n_init: int | None = None,
    max_iter: int = MAX_ITER,
    init: np.ndarray | None = None,
) -> KMeans:
    """k-means of the rows of ``x`` ``(n, d)`` under per-element weights ``w`` (default ones), ``k`` centroids.

    Restart ``r`` draws from ``np.random.default_rng([seed, r])``: deterministic for a seed. Each restart is
    k-means++ then Lloyd iterations until no label changes (or ``max_iter``); the restart with the lowest weighted
    error wins (ties: the earlier one). ``n_init`` defaults to :data:`N_INIT` up to :data:`RESTART_MAX_K`
    centroids, else 1. ``init`` ``(k, d)``: one run from these centroids instead (a warm start).
    """
    x = np.asarray(x, dtype=np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, dtype=np.float64)
    if x.ndim != 2 or w.shape != x.shape or x.shape[0] == 0 or k < 1:
        raise ValueError(f"need x (n, d) with n >= 1, weights of the same shape and k >= 1; got {x.shape}, {w.shape}")
    if not (np.isfinite(x).all() and np.isfinite(w).all()) or (w < 0).any():
        raise ValueError("x and weights must be finite, weights non-negative")
    if n_init is None:
        n_init = N_INIT if k <= RESTART_MAX_K else 1
    wx = w * x
    best: KMeans | None = None
    for r in range(1 if init is not None else max(1, n_init)):
        if init is not None:
            c = np.array(init, dtype=np.float64).reshape(k, x.shape[1])
        else:
            c = kmeans_pp(x, w, k, np.random.default_rng([seed, r]))
        labels = assign(x, w, c, wx)
        history = [weighted_loss(x, w, c, labels)]
        for _ in range(max_iter):
            c = update(x, w, labels, c)
            new = assign(x, w, c, wx)
            history.append(weighted_loss(x, w, c, new))
            if np.array_equal(new, labels):
                break
            labels = new
        fit = KMeans(c, labels, history[-1], history)
        if best is None or fit.loss < best.loss:
            best = fit
    return best


def quantize_vector(
    w: np.ndarray,
    bits: int,
    dim: int,
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    n_init: int | None = None,
    max_iter: int = MAX_ITER,
    init: np.ndarray | None = None,
) -> QuantizedTensor:
    """One weighted k-means codebook of ``2**(bits*dim)`` vectors for the tensor ``w`` ``(K, N)``.

    ``block_size`` must be a multiple of ``dim`` (or cover ``K``): a vector never straddles two scales. The
    codebook is fitted on scaled vectors (absmax fp16 scale per block; blocks with scale 0 decode to 0 and are
    left out) with weights ``weights * s**2``, rounded to fp16, and each vector then takes the code whose
    *decoded* vector ``codebook[c] * s`` has the least weighted squared error (ties: the lower code). ``bits``
    must be >= 1 and ``bits * dim <= MAX_INDEX_BITS``; 0 bits is the scalar quantizers' mean. ``init``: a
    codebook to start one k-means run from (the outlier refit starts from the plain fit's).
    """
    arr = np.asarray(w, dtype=np.float32)
    if arr.ndim != 2 or arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"w must be a finite, non-empty 2-D (K, N) array, got shape {arr.shape}")
    if isinstance(bits, bool) or not 1 <= int(bits) <= 8:
        raise ValueError(f"vector codebooks need bits in 1..8, got {bits!r}")
    if not 1 <= int(dim) <= 8:
        raise ValueError(f"vector length must be in 1..8, got {dim!r}")
    bits, dim = int(bits), int(dim)
    if bits * dim > MAX_INDEX_BITS:
        raise ValueError(f"{bits} bits x {dim} = {1 << (bits * dim)} centroids: more than the "
                         f"{1 << MAX_INDEX_BITS} fitted (bits * d <= {MAX_INDEX_BITS}); use a shorter vector")
    k, n = arr.shape
    if block_size < 1 or (block_size < k and block_size % dim):
        raise ValueError(f"block_size {block_size} must be a positive multiple of the vector length {dim}")
    h = np.ones((k, n)) if weights is None else np.asarray(weights, dtype=np.float64)
    if h.shape != (k, n) or not np.isfinite(h).all() or (h < 0).any():
        raise ValueError(f"weights must be finite, non-negative, shape {(k, n)}")
    g = min(block_size, k)
    nb = num_blocks(k, g)
    kv = -(-k // dim)
    pad = kv * dim - k
    wp = np.concatenate([arr, np.zeros((pad, n), np.float32)]) if pad else arr
    hp = np.concatenate([h, np.zeros((pad, n))]) if pad else h
    if hp.max() > 0:
        hp = hp / hp.max()
    # per-block absmax scale (fp16); padding rows are zeros and do not change it
    amax = np.zeros((nb, n), dtype=np.float64)
    for b in range(nb):
        amax[b] = np.abs(arr[b * g : (b + 1) * g]).max(axis=0)
    scale = to_fp16_exact(np.clip(amax, 0, FP16_MAX))
    rows_scale = np.repeat(scale.astype(np.float64), g, axis=0)[:k]
    if pad:  # the padding of a ragged last vector shares its block's scale
        rows_scale = np.concatenate([rows_scale, np.repeat(rows_scale[-1:], pad, axis=0)])
    # vectors (v, n) -> rows v * n + n, coordinates j
    def vecs(a: np.ndarray) -> np.ndarray:
        return a.reshape(kv, dim, n).transpose(0, 2, 1).reshape(kv * n, dim)

    xw = vecs(wp.astype(np.float64))
    s = vecs(rows_scale)[:, 0]
    hw = vecs(hp)
    live = s > 0
    u = np.zeros_like(xw)
    u[live] = xw[live] / s[live, None]
    fw = hw * (s * s)[:, None]
    fw[~live] = 0.0
    if not (fw.sum(axis=1) > 0).any():  # no weight anywhere: count the real elements equally
        fw = vecs(np.concatenate([np.ones((k, n)), np.zeros((pad, n))]) if pad else np.ones((k, n)))
        fw = fw * (s > 0)[:, None]
    fit = np.flatnonzero(fw.sum(axis=1) > 0)
    centroids = 1 << (bits * dim)
    if fit.size == 0:
        codebook = np.zeros((centroids, dim), dtype=np.float32)
    else:
        if fit.size > FIT_SAMPLE:
            fit = np.sort(np.random.default_rng(seed).choice(fit, FIT_SAMPLE, replace=False))
        km = weighted_kmeans(u[fit], fw[fit], centroids, seed=seed, n_init=n_init, max_iter=max_iter, init=init)
        codebook = to_fp16_exact(np.clip(km.centroids, -FP16_MAX, FP16_MAX))
    codes = _nearest_vectors(xw, hw, s, codebook)
    dtype = np.uint8 if bits * dim <= 8 else np.uint16
    return QuantizedTensor(
        kind="vector", bits=bits, shape=(k, n), block_size=int(block_size),
        codes=np.ascontiguousarray(codes.reshape(kv, n).astype(dtype)), scale=scale.astype(np.float32),
        codebook=codebook.astype(np.float32), method=f"vq{dim}", vector_dim=dim,
    )


def _nearest_vectors(x: np.ndarray, h: np.ndarray, s: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Per vector the code whose decoded vector ``codebook[c] * s`` (exact in float32: fp16 x fp16) has the least
    ``h``-weighted squared error to ``x``; vectors with ``s == 0`` or no weight take code 0."""
    cb = codebook.astype(np.float64)
    # sum_j h (cb s - x)^2 = [h s^2 | -2 h x s] @ [cb^2 ; cb] + const (see :func:`assign`)
    a = np.ascontiguousarray(np.hstack([h * (s * s)[:, None], -2.0 * h * x * s[:, None]]))
    b = np.ascontiguousarray(np.vstack([(cb * cb).T, cb.T]))  # (2d, k)
    n = x.shape[0]
    codes = np.zeros(n, dtype=np.int64)
    step = max(1, _CHUNK // cb.shape[0])
    for lo in range(0, n, step):
        codes[lo : lo + step] = np.argmin(np.einsum("ij,jk->ik", a[lo : lo + step], b), axis=1)
    return codes
