"""Quantizer numerics, checked against independent float64 references.

Every code must be the nearest level of the stored metadata in decoded float32 space (ties to the lower code);
that is checked by a brute-force argmin over all levels of each block, built here from the metadata alone.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

from bq_onnx import quantizers as q
from bq_onnx.qtensor import QuantizedTensor, expand_blocks, num_blocks, to_fp16_exact
from bq_onnx.quantizers import blocked, lloyd

METHODS = q.METHODS
PAPER003_V = np.array([3.2, -1.4, 2.5, -0.9, 1.8, -3.7, 0.0, 4.0, 2.2, -1.3])
PAPER003_PUBLISHED = [6, 2, 5, 2, 5, 0, 3, 7, 5, 2]
NF4_PUBLISHED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]
DISTS = ("normal", "outliers", "positive", "negative", "discrete", "grid", "offset", "constant", "zeros", "tiny",
         "subnormal-scale", "beyond-fp16", "huge", "mixed")
INEXACT = ("huge", "mixed")  # float64 distances round when |w| >> |level|: brute-force argmin is not exact


# ------------------------------------------------------------------------------------------------------------
# Independent references


def make_data(rng: np.random.Generator, dist: str, k: int, n: int) -> np.ndarray:
    x = rng.standard_normal((k, n))
    if dist == "outliers":
        x[rng.random((k, n)) < 0.05] *= 50.0
    elif dist == "positive":
        x = np.abs(x) + 0.1
    elif dist == "negative":
        x = -np.abs(x)
    elif dist == "discrete":
        x = rng.integers(-2, 3, (k, n)) * 0.5
    elif dist == "grid":  # many exact ties between levels
        x = rng.integers(-16, 17, (k, n)) * 0.125
    elif dist == "offset":  # mean >> std: levels collapse after adding the offset
        x = 1000.0 + x * 1e-3
    elif dist == "subnormal-scale":
        x = x * 1e-7
    elif dist == "beyond-fp16":  # scales clamp to the fp16 maximum
        x = x * 7e4
    elif dist == "constant":
        x = np.full((k, n), rng.choice([-3.3, 0.7, 1e-3]))
    elif dist == "zeros":
        x = np.zeros((k, n))
    elif dist == "tiny":
        x = x * 1e-6
    elif dist == "huge":
        x = x * 1e30
    elif dist == "mixed":
        x = x * np.where(rng.random((k, n)) < 0.5, 1e20, 1e-20)
    return (x * 0.05 if dist in ("normal", "outliers", "positive", "negative") else x).astype(np.float32)


def make_weights(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    wt = rng.exponential(1.0, (k, n))
    wt[rng.random((k, n)) < 0.2] = 0.0
    return wt


def level_table(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """Allowed codes ``(L,)`` and every element's decoded level for each of them, ``(K, N, L)`` float32."""
    k, _ = qt.shape
    m = 1 << qt.bits
    s = expand_blocks(qt.scale, k, qt.block_size)[..., None]
    if qt.kind == "uniform":
        if qt.symmetric:
            allowed = np.arange(1 if qt.bits >= 2 else 0, m)
            zp = np.float32(m >> 1)
        else:
            allowed = np.arange(m)
            zp = expand_blocks(qt.zero_point.astype(np.float32), k, qt.block_size)[..., None]
        lv = (allowed.astype(np.float32) - zp) * s
    else:
        allowed = np.arange(m)
        lv = qt.codebook[allowed] * s
        if qt.offset is not None:
            lv = lv + expand_blocks(qt.offset, k, qt.block_size)[..., None]
    return allowed, lv.astype(np.float32)


def check_nearest(w: np.ndarray, qt: QuantizedTensor, exact_index: bool = True) -> None:
    allowed, lv = level_table(qt)
    d = np.abs(lv.astype(np.float64) - w.astype(np.float64)[..., None])
    pos = np.searchsorted(allowed, qt.codes.astype(np.int64))
    assert np.all(allowed[np.minimum(pos, allowed.size - 1)] == qt.codes), "code outside the allowed range"
    chosen = np.take_along_axis(lv, pos[..., None], -1)[..., 0]
    np.testing.assert_array_equal(qt.dequantize(), chosen)
    if exact_index:
        np.testing.assert_array_equal(qt.codes, allowed[np.argmin(d, axis=-1)])
    else:  # float64 distances are not exact for |w| >> levels: check optimality of the distance only
        np.testing.assert_array_equal(np.take_along_axis(d, pos[..., None], -1)[..., 0], d.min(axis=-1))


def check_valid(w: np.ndarray, qt: QuantizedTensor, bits: int, method: str, block: int) -> None:
    k, n = w.shape
    nb = num_blocks(k, block)
    assert qt.bits == bits and qt.shape == (k, n) and qt.block_size == block and qt.method == method
    deq = qt.dequantize()
    assert deq.dtype == np.float32 and deq.shape == (k, n) and np.isfinite(deq).all()
    if bits == 0:
        assert qt.kind == "mean" and qt.offset.shape == (nb, n)
        np.testing.assert_array_equal(qt.offset, to_fp16_exact(qt.offset))
        return
    assert qt.codes.dtype == np.uint8 and int(qt.codes.max()) < (1 << bits)
    np.testing.assert_array_equal(qt.scale, to_fp16_exact(qt.scale))
    assert (qt.scale >= 0).all()
    if qt.kind == "uniform":
        assert qt.symmetric == (method == "uniform-sym")
        if qt.symmetric and bits >= 2:
            assert qt.codes.min() >= 1
    else:
        assert qt.kind == "codebook"
        np.testing.assert_array_equal(qt.codebook, to_fp16_exact(qt.codebook))
        assert np.all(np.diff(qt.codebook) >= 0)
        assert (qt.offset is not None) == (method == "gaussian")
        if qt.offset is not None:
            np.testing.assert_array_equal(qt.offset, to_fp16_exact(qt.offset))


def same(a: QuantizedTensor, b: QuantizedTensor) -> bool:
    fields = ("codes", "scale", "zero_point", "codebook", "offset")
    for f in fields:
        x, y = getattr(a, f), getattr(b, f)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return False
    return a.kind == b.kind and a.symmetric == b.symmetric


def block_errors(w, qt, weights=None) -> np.ndarray:
    """Per-block weighted squared error, ``(nb, N)``."""
    k, n = w.shape
    d = (qt.dequantize().astype(np.float64) - w.astype(np.float64)) ** 2
    if weights is not None:
        d = d * weights
    nb = num_blocks(k, qt.block_size)
    g = min(qt.block_size, k)
    d = np.concatenate([d, np.zeros((nb * g - k, n))])
    return d.reshape(nb, g, n).sum(axis=1)


def quantile_init(u: np.ndarray, v: np.ndarray, m: int) -> np.ndarray:
    """Weighted quantiles at (i + 1/2) / m: the first sorted value whose cumulative weight reaches them."""
    order = np.argsort(u, kind="stable")
    u, v = u[order], v[order]
    cum = np.cumsum(v)
    return np.array([u[min(np.argmax(cum >= (i + 0.5) / m * cum[-1]), u.size - 1)] for i in range(m)])


def ref_lloyd(u: np.ndarray, v: np.ndarray, c: np.ndarray, l1: bool) -> np.ndarray:
    """Plain float64 Lloyd from levels ``c``: brute-force assignment, loop until the assignment repeats."""
    m = c.size
    c = np.array(c, dtype=np.float64)
    order = np.argsort(u, kind="stable")  # the median below scans each cell in value order
    u, v = u[order], v[order]
    assign = None
    for _ in range(10_000):
        new = np.argmin(np.abs(u[:, None] - c[None, :]), axis=1)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        for i in range(m):
            cell = assign == i
            wsum = v[cell].sum()
            if wsum <= 0:
                continue
            if l1:
                cw = np.cumsum(v[cell])
                c[i] = u[cell][np.argmax(cw >= wsum / 2)]
            else:
                c[i] = (v[cell] * u[cell]).sum() / wsum
    return np.sort(c)


def objective(c: np.ndarray, u: np.ndarray, v: np.ndarray, l1: bool = False) -> float:
    d = np.abs(u[:, None] - np.asarray(c, dtype=np.float64)[None, :]).min(axis=1)
    return float((v * (d if l1 else d * d)).sum())


def lloyd_fit_data(w: np.ndarray, block: int, weights: np.ndarray, l1: bool) -> tuple[np.ndarray, np.ndarray]:
    """The normalized values and fit weights the Lloyd methods must use, built independently."""
    k, _ = w.shape
    nb = num_blocks(k, block)
    g = min(block, k)
    a = np.abs(w.astype(np.float64))
    amax = np.stack([a[j * g:(j + 1) * g].max(axis=0) for j in range(nb)])
    s = expand_blocks(to_fp16_exact(amax), k, block).astype(np.float64)
    keep = s > 0
    u = w.astype(np.float64)[keep] / s[keep]
    return u, weights[keep] * (s[keep] if l1 else s[keep] ** 2)


# ------------------------------------------------------------------------------------------------------------
# Papers: worked example, NF4, Gaussian grid


def test_paper003_example_floor_reproduces_published_codes():
    np.testing.assert_array_equal(q.uniform_codes(PAPER003_V, -4, 4, 3, rounding="floor"), PAPER003_PUBLISHED)


def test_paper003_example_nearest_is_definition_1_1():
    grid = [Fraction(-4) + Fraction(8 * i, 7) for i in range(8)]  # exact: 0.0 is a true tie between 3 and 4
    brute = [min(range(8), key=lambda i, a=Fraction(str(a)): abs(a - grid[i])) for a in PAPER003_V]  # (1.1)
    codes = q.uniform_codes(PAPER003_V, -4, 4, 3)
    np.testing.assert_array_equal(codes, brute)
    # The published vector differs from (1.1) where z = 5.6875 (2.5) and 2.7125 (-0.9): it floors.
    np.testing.assert_array_equal(codes, [6, 2, 6, 3, 5, 0, 3, 7, 5, 2])
    assert codes.dtype == np.uint8


def test_uniform_codes_clips_and_degenerate_range():
    np.testing.assert_array_equal(q.uniform_codes(np.array([-9.0, 9.0, 0.5, 0.6]), 0, 1, 2), [0, 3, 1, 2])
    np.testing.assert_array_equal(q.uniform_codes(np.array([1.0, 2.0]), 1.0, 1.0, 4), [0, 0])
    with pytest.raises(ValueError):
        q.uniform_codes(np.array([1.0]), 1.0, 0.0, 4)
    with pytest.raises(ValueError):
        q.uniform_codes(np.array([1.0]), 0.0, 1.0, 4, rounding="up")


def test_nf4_matches_published_values():
    np.testing.assert_allclose(q.nf_grid(4), NF4_PUBLISHED, atol=1e-4)
    w = np.linspace(-1, 1, 64, dtype=np.float32).reshape(32, 2)
    np.testing.assert_array_equal(q.quantize(w, 4, "nf").codebook, to_fp16_exact(q.nf_grid(4)))


@pytest.mark.parametrize("bits", range(1, 9))
def test_nf_grid_structure(bits):
    grid = q.nf_grid(bits)
    m = 1 << bits
    assert grid.shape == (m,) and np.all(np.diff(grid) > 0)
    assert grid[0] == -1.0 and grid[-1] == 1.0
    if bits == 1:
        np.testing.assert_array_equal(grid, [-1.0, 1.0])
        return
    assert np.count_nonzero(grid == 0) == 1
    assert (grid > 0).sum() == m // 2 and (grid < 0).sum() == m // 2 - 1
    pos = norm.ppf(np.linspace(1 - (1 / (2 * m) + 1 / (2 * (m - 1))) / 2, 0.5, m // 2 + 1)[:-1])
    np.testing.assert_allclose(grid[grid > 0][::-1], pos / pos[0], rtol=1e-12)


@pytest.mark.parametrize("bits", range(1, 9))
def test_gaussian_grid_matches_scipy(bits):
    m = 2**bits
    bounds = [float(norm.ppf(i / m)) for i in range(1, m)]
    ref = [float(norm.ppf(1 / (2 * m)))]
    ref += [(bounds[i] + bounds[i + 1]) / 2 for i in range(m - 2)]
    ref += [float(norm.ppf((2 * m - 1) / (2 * m)))]
    grid = q.gaussian_grid(bits)
    np.testing.assert_allclose(grid, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grid, -grid[::-1], atol=1e-12)


def test_gaussian_metadata_is_block_mean_and_std():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 3)) * 0.2 + 0.1).astype(np.float32)
    qt = q.quantize(w, 3, "gaussian", 16)  # blocks of 16, 16, 8 rows
    np.testing.assert_array_equal(qt.codebook, to_fp16_exact(q.gaussian_grid(3)))
    for j, (a, b) in enumerate([(0, 16), (16, 32), (32, 40)]):
        blk = w[a:b].astype(np.float64)
        np.testing.assert_array_equal(qt.offset[j], to_fp16_exact(blk.mean(axis=0)))
        np.testing.assert_array_equal(qt.scale[j], to_fp16_exact(blk.std(axis=0)))


# ------------------------------------------------------------------------------------------------------------
# Every method and width: valid, nearest, deterministic


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", range(0, 9))
def test_every_method_and_width(method, bits):
    rng = np.random.default_rng(bits * 10 + METHODS.index(method))
    w = make_data(rng, "outliers", 37, 6)
    weights = make_weights(rng, 37, 6)
    qt = q.quantize(w, bits, method, 16, weights)  # 37 = 2*16 + 5: ragged last block
    check_valid(w, qt, bits, method, 16)
    if bits:
        check_nearest(w, qt)
    assert same(qt, q.quantize(w, bits, method, 16, weights))
    err = q.quantization_error(w, qt, weights)
    assert err == pytest.approx(block_errors(w, qt, weights).sum(), rel=1e-12)


@settings(max_examples=600, deadline=None)
@given(
    method=st.sampled_from(METHODS),
    bits=st.integers(0, 8),
    k=st.integers(1, 40),
    n=st.integers(1, 4),
    block=st.sampled_from([1, 2, 3, 7, 8, 16, 32, 40, 64, 10_000]),
    dist=st.sampled_from(DISTS),
    weighted=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_shapes_are_valid_nearest_and_deterministic(method, bits, k, n, block, dist, weighted, seed):
    rng = np.random.default_rng(seed)
    w = make_data(rng, dist, k, n)
    weights = make_weights(rng, k, n) if weighted else None
    qt = q.quantize(w, bits, method, block, weights)
    check_valid(w, qt, bits, method, block)
    if bits:
        check_nearest(w, qt, exact_index=dist not in INEXACT)
    assert same(qt, q.quantize(w, bits, method, block, weights))


@pytest.mark.parametrize("method", METHODS)
def test_chunking_does_not_change_results(method, monkeypatch):
    rng = np.random.default_rng(13)
    w = make_data(rng, "outliers", 45, 7)
    weights = make_weights(rng, 45, 7)
    for bits in (1, 3, 8):
        ref = q.quantize(w, bits, method, 8, weights)
        with monkeypatch.context() as mp:
            mp.setattr(blocked, "_CHUNK", 5)  # chunks of one block row
            assert same(ref, q.quantize(w, bits, method, 8, weights))
            mp.setattr(blocked, "_CHUNK", 40)  # several rows, last chunk short
            assert same(ref, q.quantize(w, bits, method, 8, weights))


@pytest.mark.parametrize("method", METHODS)
def test_larger_tensor_is_nearest(method):
    w = make_data(np.random.default_rng(14), "outliers", 300, 260)  # several default-size chunks
    qt = q.quantize(w, 4, method, 64)
    check_valid(w, qt, 4, method, 64)
    check_nearest(w, qt)


def test_metadata_shapes_for_per_channel_and_blocks():
    w = make_data(np.random.default_rng(0), "normal", 20, 3)
    for block, nb in ((20, 1), (64, 1), (7, 3), (1, 20)):
        for method in METHODS:
            qt = q.quantize(w, 4, method, block)
            assert qt.scale.shape == (nb, 3) and qt.block_size == block


# ------------------------------------------------------------------------------------------------------------
# Uniform range search


def fp16_clamped(x: np.ndarray) -> np.ndarray:
    return to_fp16_exact(np.minimum(x, 65504.0))


def minmax_rtn(w: np.ndarray, bits: int, block: int, symmetric: bool) -> QuantizedTensor:
    """Plain min/max metadata (fp16), brute-force nearest codes."""
    k, n = w.shape
    nb, g, m = num_blocks(k, block), min(block, k), 1 << bits
    rows = [w[j * g:(j + 1) * g].astype(np.float64) for j in range(nb)]
    lo = np.stack([np.minimum(r.min(axis=0), 0) for r in rows])
    hi = np.stack([np.maximum(r.max(axis=0), 0) for r in rows])
    if symmetric:
        s = fp16_clamped(-lo if bits == 1 else np.maximum(-lo, hi) / (m // 2 - 1))
        qt = QuantizedTensor("uniform", bits, (k, n), block, codes=np.zeros((k, n), np.uint8), scale=s,
                             symmetric=True)
    else:
        s = fp16_clamped((hi - lo) / (m - 1))
        zp = np.where(s > 0, np.clip(np.rint(-lo / np.where(s > 0, s, 1)), 0, m - 1), 0).astype(np.uint8)
        qt = QuantizedTensor("uniform", bits, (k, n), block, codes=np.zeros((k, n), np.uint8), scale=s,
                             zero_point=zp)
    allowed, lv = level_table(qt)
    codes = allowed[np.argmin(np.abs(lv.astype(np.float64) - w.astype(np.float64)[..., None]), axis=-1)]
    return QuantizedTensor("uniform", bits, (k, n), block, codes=codes.astype(np.uint8), scale=qt.scale,
                           zero_point=qt.zero_point, symmetric=symmetric)


@settings(max_examples=300, deadline=None)
@given(
    method=st.sampled_from(["uniform", "uniform-sym"]),
    bits=st.integers(1, 8),
    k=st.integers(1, 70),
    block=st.sampled_from([4, 16, 32, 1000]),
    dist=st.sampled_from(["normal", "outliers", "positive", "discrete", "grid", "beyond-fp16", "constant"]),
    weighted=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_range_search_never_worse_than_minmax(method, bits, k, block, dist, weighted, seed):
    rng = np.random.default_rng(seed)
    w = make_data(rng, dist, k, 3)
    weights = make_weights(rng, k, 3) if weighted else None
    qt = q.quantize(w, bits, method, block, weights)
    base = minmax_rtn(w, bits, block, symmetric=method == "uniform-sym")
    e, e0 = block_errors(w, qt, weights), block_errors(w, base, weights)
    assert np.all(e <= e0 * (1 + 1e-12) + 1e-300)


@pytest.mark.parametrize("method", ["uniform", "uniform-sym"])
def test_range_search_helps_at_low_bits(method):
    w = make_data(np.random.default_rng(5), "normal", 256, 16)
    for bits in (2, 3, 4):
        e = q.quantization_error(w, q.quantize(w, bits, method, 64))
        e0 = q.quantization_error(w, minmax_rtn(w, bits, 64, symmetric=method == "uniform-sym"))
        assert e < 0.95 * e0


@pytest.mark.parametrize("method", ["uniform", "uniform-sym", "lloyd", "lloyd-l1", "gaussian"])
def test_error_decreases_with_bits(method):
    w = make_data(np.random.default_rng(11), "normal", 256, 16)
    errs = [q.quantization_error(w, q.quantize(w, b, method, 32)) for b in range(0, 9)]
    assert all(b <= a for a, b in zip(errs, errs[1:])), errs
    assert errs[8] < 1e-2 * errs[1]


def test_percentile_range_is_5th_to_95th():
    w = make_data(np.random.default_rng(2), "outliers", 100, 2)
    qt = q.quantize(w, 4, "percentile", 100)
    lo = np.minimum(np.percentile(w, 5, axis=0), 0)
    hi = np.maximum(np.percentile(w, 95, axis=0), 0)
    s = to_fp16_exact((hi - lo) / 15)
    np.testing.assert_array_equal(qt.scale[0], s)
    np.testing.assert_array_equal(qt.zero_point[0], np.clip(np.rint(-lo / s), 0, 15))
    check_nearest(w, qt)


def test_uniform_sym_one_bit_levels():
    w = np.array([[-2.0], [-1.0], [0.5], [3.0]], dtype=np.float32)
    qt = q.quantize(w, 1, "uniform-sym", 4)
    assert qt.symmetric and qt.implicit_zero_point == 1
    assert set(np.unique(qt.dequantize())) <= {0.0, -float(qt.scale[0, 0])}
    check_nearest(w, qt)


# ------------------------------------------------------------------------------------------------------------
# Lloyd


@pytest.mark.parametrize("l1", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_matches_reference(bits, l1):
    rng = np.random.default_rng(bits + 10 * l1)
    w = make_data(rng, "outliers", 48, 4)
    weights = make_weights(rng, 48, 4)
    u, v = lloyd_fit_data(w, 16, weights, l1)
    m = 1 << bits
    # The quantile start, built here independently.
    got = q.lloyd_codebook(u, v, bits, l1=l1, init="quantile")
    ref = ref_lloyd(u, v, quantile_init(u, v, m), l1)
    assert objective(got, u, v, l1) == pytest.approx(objective(ref, u, v, l1), rel=1e-6)
    # The default (companded) start: same iterations from the module's starting levels.
    start = q.lloyd_codebook(u, v, bits, l1=l1, max_iter=0)
    got = q.lloyd_codebook(u, v, bits, l1=l1)
    ref = ref_lloyd(u, v, start, l1)
    j_ref = objective(ref, u, v, l1)
    assert objective(got, u, v, l1) == pytest.approx(j_ref, rel=1e-6)
    # quantize() fits exactly that codebook on exactly that data, then rounds it to fp16.
    qt = q.quantize(w, bits, "lloyd-l1" if l1 else "lloyd", 16, weights)
    np.testing.assert_array_equal(qt.codebook, to_fp16_exact(got))
    np.testing.assert_allclose(qt.codebook, ref, rtol=2**-10, atol=1e-7)
    check_nearest(w, qt)
    if not l1:  # the stored (fp16) model costs what the fit promised, up to fp16 rounding
        assert q.quantization_error(w, qt, weights) == pytest.approx(j_ref, rel=2e-2)


def test_lloyd_companded_start_is_panter_dite():
    u = np.random.default_rng(40).standard_normal(200_000)
    for bits, l1, power in ((4, False, 1 / 3), (5, True, 1 / 2)):
        m = 1 << bits
        start = q.lloyd_codebook(u, None, bits, l1=l1, max_iter=0)
        # density ∝ p**power of N(0, 1), truncated to the sample range, is N(0, 1/power) truncated
        sd = np.sqrt(1 / power)
        lo, hi = norm.cdf(u.min() / sd), norm.cdf(u.max() / sd)
        expect = sd * norm.ppf(lo + (np.arange(m) + 0.5) / m * (hi - lo))
        np.testing.assert_allclose(start[2:-2], expect[2:-2], atol=0.06)  # the sparse tails are estimated worse
        quantile = q.lloyd_codebook(u, None, bits, l1=l1, init="quantile", max_iter=0)
        assert np.abs(start - expect).max() < 0.5 * np.abs(quantile - expect).max()


@pytest.mark.parametrize("l1", [False, True])
def test_lloyd_companded_start_beats_quantile_start_at_high_bits(l1):
    u = np.random.default_rng(41).standard_t(4, 50_000)
    for bits in (6, 8):
        a = objective(q.lloyd_codebook(u, None, bits, l1=l1), u, np.ones_like(u), l1)
        b = objective(q.lloyd_codebook(u, None, bits, l1=l1, init="quantile"), u, np.ones_like(u), l1)
        assert a < b


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_lloyd_levels_are_cell_means(bits):
    rng = np.random.default_rng(20 + bits)
    u, v = rng.standard_normal(500), rng.exponential(1.0, 500)
    c = q.lloyd_codebook(u, v, bits)
    cell = np.argmin(np.abs(u[:, None] - c[None, :]), axis=1)
    for i in np.unique(cell):
        sel = cell == i
        assert c[i] == pytest.approx((v[sel] * u[sel]).sum() / v[sel].sum(), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_lloyd_l1_levels_are_weighted_medians(bits):
    rng = np.random.default_rng(30 + bits)
    u, v = rng.standard_t(3, 400), rng.exponential(1.0, 400)
    c = q.lloyd_codebook(u, v, bits, l1=True)
    cell = np.argmin(np.abs(u[:, None] - c[None, :]), axis=1)
    for i in np.unique(cell):
        uc, vc = u[cell == i], v[cell == i]
        half = vc.sum() / 2
        assert vc[uc < c[i]].sum() <= half * (1 + 1e-12)
        assert vc[uc > c[i]].sum() <= half * (1 + 1e-12)


def test_lloyd_codebook_degenerate_inputs():
    np.testing.assert_array_equal(q.lloyd_codebook(np.array([]), None, 2), np.linspace(-1, 1, 4))
    np.testing.assert_array_equal(q.lloyd_codebook(np.full(5, 0.25), None, 3), np.full(8, 0.25))
    c = q.lloyd_codebook(np.array([1.0, 2.0, 3.0]), np.zeros(3), 1)  # no positive weight: all count
    assert c.shape == (2,) and np.all(np.diff(c) >= 0)
    with pytest.raises(ValueError):
        q.lloyd_codebook(np.array([1.0]), np.array([-1.0]), 2)
    with pytest.raises(ValueError):
        q.lloyd_codebook(np.array([1.0]), None, 2, init="random")
    with pytest.raises(ValueError):
        q.lloyd_codebook(np.array([1.0]), None, 2, init=np.zeros(3))
    two = np.array([1.0, 2.0])
    np.testing.assert_array_equal(q.lloyd_codebook(two, None, 1, init=np.array([1.7, 1.2])), [1.0, 2.0])
    np.testing.assert_array_equal(q.lloyd_codebook(two, None, 1, init=np.array([5.0, 0.0])), [1.5, 5.0])  # empty



def test_lloyd_subsample_is_seeded(monkeypatch):
    monkeypatch.setattr(lloyd, "LLOYD_FIT_SAMPLE", 50)
    w = make_data(np.random.default_rng(4), "outliers", 64, 8)
    for method in ("lloyd", "lloyd-l1"):
        a = q.quantize(w, 3, method, 16, seed=1)
        assert same(a, q.quantize(w, 3, method, 16, seed=1))
        check_nearest(w, a)
        assert not np.array_equal(a.codebook, q.quantize(w, 3, method, 16, seed=2).codebook)


# ------------------------------------------------------------------------------------------------------------
# Edge cases


@pytest.mark.parametrize("method", METHODS)
def test_all_zero_decodes_to_zero(method):
    w = np.zeros((10, 3), dtype=np.float32)
    for bits in range(9):
        qt = q.quantize(w, bits, method, 4)
        check_valid(w, qt, bits, method, 4)
        np.testing.assert_array_equal(qt.dequantize(), 0.0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("c", [-3.3, 0.7, 1e-3, 1234.5])
def test_constant_blocks(method, c):
    w = np.full((9, 2), c, dtype=np.float32)
    for bits in range(9):
        qt = q.quantize(w, bits, method, 4)
        check_valid(w, qt, bits, method, 4)
        if method == "uniform-sym" and bits == 1 and c > 0:
            np.testing.assert_array_equal(qt.dequantize(), 0.0)  # documented: no positive level
            continue
        np.testing.assert_allclose(qt.dequantize(), c, rtol=2**-9)
        if bits == 0 or method in ("gaussian", "nf"):
            np.testing.assert_array_equal(qt.dequantize(), to_fp16_exact(np.float32(c)))


@pytest.mark.parametrize("method", METHODS)
def test_fp16_exact_constant_decodes_exactly(method):
    w = np.full((8, 2), 0.75, dtype=np.float32)
    for bits in range(9):
        if method == "uniform-sym" and bits == 1:
            continue
        np.testing.assert_array_equal(q.quantize(w, bits, method, 8).dequantize(), w)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("shape,block", [((1, 1), 32), ((1, 7), 1), ((1, 7), 32), ((5, 1), 2)])
def test_tiny_shapes(method, shape, block):
    w = make_data(np.random.default_rng(sum(shape)), "normal", *shape)
    for bits in range(9):
        qt = q.quantize(w, bits, method, block)
        check_valid(w, qt, bits, method, block)
        if bits:
            check_nearest(w, qt)


@pytest.mark.parametrize("method", METHODS)
def test_zero_weights(method):
    rng = np.random.default_rng(8)
    w = make_data(rng, "normal", 24, 3)
    weights = make_weights(rng, 24, 3)
    weights[8:16, 1] = 0.0  # one whole block without weight
    for wt in (weights, np.zeros_like(weights)):
        for bits in (0, 2, 5):
            qt = q.quantize(w, bits, method, 8, wt)
            check_valid(w, qt, bits, method, 8)
            if bits:
                check_nearest(w, qt)
            else:
                blocks = w.astype(np.float64).reshape(3, 8, 3)
                wb = wt.reshape(3, 8, 3)
                ws = wb.sum(axis=1)
                mean = np.where(ws > 0, (blocks * wb).sum(axis=1) / np.where(ws > 0, ws, 1), blocks.mean(axis=1))
                np.testing.assert_array_equal(qt.offset, to_fp16_exact(mean))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("scale", [1e30, 1e-30, 3e38, 1e-42])
def test_extreme_magnitudes(method, scale):
    w = (make_data(np.random.default_rng(9), "normal", 20, 2) * np.float32(scale)).astype(np.float32)
    w[3, 0] = 0.0
    for bits in (0, 1, 4, 8):
        qt = q.quantize(w, bits, method, 8)
        check_valid(w, qt, bits, method, 8)
        if bits:
            check_nearest(w, qt, exact_index=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad):
    w = np.ones((4, 2), dtype=np.float32)
    w[1, 1] = bad
    for method in METHODS:
        with pytest.raises(ValueError):
            q.quantize(w, 4, method)
    with pytest.raises(ValueError):
        q.quantize(np.full((2, 2), 1e39), 4)  # beyond float32


def test_bad_arguments_raise():
    w = np.ones((4, 2), dtype=np.float32)
    for kwargs in ({"bits": 9}, {"bits": -1}, {"bits": 4, "method": "kmeans"}, {"bits": 4, "block_size": 0}):
        with pytest.raises(ValueError):
            q.quantize(w, **kwargs)
    with pytest.raises(ValueError):
        q.quantize(np.ones(4, dtype=np.float32), 4)
    with pytest.raises(ValueError):
        q.quantize(np.ones((0, 3), dtype=np.float32), 4)
    with pytest.raises(ValueError):
        q.quantize(w, 4, weights=np.ones((2, 4)))
    with pytest.raises(ValueError):
        q.quantize(w, 4, weights=-np.ones((4, 2)))
    with pytest.raises(ValueError):
        q.quantize(w, 4, weights=np.full((4, 2), np.nan))


def test_weights_steer_the_uniform_search():
    rng = np.random.default_rng(12)
    w = make_data(rng, "outliers", 64, 8)
    weights = np.ones_like(w, dtype=np.float64)
    weights[np.abs(w) > np.percentile(np.abs(w), 90)] = 100.0  # the large values matter most
    plain = q.quantize(w, 3, "uniform", 32)
    steered = q.quantize(w, 3, "uniform", 32, weights)
    assert q.quantization_error(w, steered, weights) < q.quantization_error(w, plain, weights)


def test_registry_gives_the_methods_in_the_clis_order():
    assert q.METHODS == ("uniform", "uniform-sym", "percentile", "gaussian", "nf", "lloyd", "lloyd-l1")
    assert tuple(q.SCALAR_QUANTIZERS) == q.METHODS
    assert (*q.METHODS, "vq", "vq2", "vq4", "vq8", "auto") == q.QUANTIZERS
    with pytest.raises(ValueError, match="unknown quantization method"):
        q.quantize(np.ones((4, 2)), 2, "kmeans")


def test_importance_is_scaled_by_a_power_of_two_so_a_slice_of_columns_scales_exactly_as_the_whole():
    """The blocked importance of a slice of output channels is the whole tensor's for those channels times a power
    of two, exactly (:func:`blocked.weight_exponent`): every weighted error and comparison of a slice's design is
    the whole design's, scaled exactly. Dividing by the largest value (as before) rounds differently per slice."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 40)).astype(np.float32)
    h = np.exp(rng.uniform(-40, 40, size=w.shape))  # 1e-17 .. 1e17
    h[:, 30:] *= 1e-9  # the last slice's largest value is far below the whole tensor's
    assert blocked.weight_exponent(np.array([0.75])) == 0 and blocked.weight_exponent(np.array([3.0])) == 2
    assert blocked.weight_exponent(np.zeros(3)) == 0
    whole = blocked._prepare(w, 3, 32, h).wt.reshape(3, 40, 32)
    for a, b in ((0, 10), (10, 30), (30, 40)):
        part = blocked._prepare(w[:, a:b], 3, 32, h[:, a:b]).wt.reshape(3, b - a, 32)
        shift = blocked.weight_exponent(h) - blocked.weight_exponent(h[:, a:b])
        assert np.array_equal(np.ldexp(whole[:, a:b], shift), part), (a, b)
        assert 0.5 <= part.max() < 1.0


@pytest.mark.parametrize(("bits", "block", "double"), [(4, 32, False), (3, 100, False), (2, 4096, False),
                                                       (4, 32, True), (8, 64, True)])
def test_a_big_weight_with_importance_is_designed_by_column_slices_with_the_same_bytes(monkeypatch, bits, block,
                                                                                        double):
    """A plain uniform design over ``SLICE_BYTES`` is computed slice by slice of output channels, its importance
    sliced with it (issue 21: the whole-tensor temporaries were about 8x the weight, the peak of a run with a
    posterior): the same bytes as one whole-tensor call, with one slice's temporaries."""
    import tracemalloc

    from bq_onnx.quantizers import spec as spec_module

    rng = np.random.default_rng(bits)
    w = rng.standard_normal((1000, 300)).astype(np.float32)
    w[:, 7] = 0.5  # a constant column: the constant-block candidate
    h = np.exp(rng.uniform(-12, 12, size=w.shape))
    h[:, 11] = 0.0  # an output channel that carries nothing
    design = q.Spec("uniform", double_scales=double)
    monkeypatch.setattr(spec_module, "SLICE_BYTES", 1 << 40)
    tracemalloc.start()
    whole = q.quantize_spec(w, bits, design, block, h)
    whole_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    monkeypatch.setattr(spec_module, "SLICE_BYTES", 4000 * 37)  # 37 columns a slice: a ragged last one
    tracemalloc.start()
    sliced = q.quantize_spec(w, bits, design, block, h)
    sliced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for field in ("codes", "scale", "zero_point", "scale_code", "super_scale", "offset", "codebook"):
        a, b = getattr(whole, field), getattr(sliced, field)
        assert (a is None and b is None) or np.array_equal(a, b), field
    assert (sliced.shape, sliced.symmetric, sliced.kind, sliced.block_size) == \
        (whole.shape, whole.symmetric, whole.kind, whole.block_size)
    assert sliced_peak < whole_peak / 3, (sliced_peak, whole_peak)
    outliers = q.quantize_spec(w, bits, q.Spec("uniform", outliers=0.01), block, h)  # not separable: whole
    assert outliers.outlier_index is not None
