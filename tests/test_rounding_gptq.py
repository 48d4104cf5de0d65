"""GPTQ rounding (bq_onnx.rounding.gptq) against an independent float64 reference: the greedy least-squares
recursion re-solved from scratch at every row (no Cholesky), brute force on tiny problems, and round-to-nearest."""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx.quantizers import Spec, quantize, quantize_spec
from bq_onnx.rounding import DAMPING, PRECISION_FLOOR, gptq_round, output_error


def _problem(seed: int, k: int = 24, n: int = 6, rows: int = 200):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, k)) @ rng.standard_normal((k, k)) * 0.4 + rng.standard_normal((rows, 1))
    a = x.T @ x / rows
    w = rng.standard_normal((k, n)).astype(np.float32)
    return rng, a, w


def _levels(qt, k: int, n: int) -> np.ndarray:
    """Every level of element (k, n) of a scalar design, indexed by code (brute force over the codes)."""
    kb = k // qt.block_size
    codes = np.arange(1 << qt.bits)
    if qt.kind == "uniform":
        zp = np.float32(qt.implicit_zero_point) if qt.symmetric else np.float32(qt.zero_point[kb, n])
        lv = (codes.astype(np.float32) - zp) * qt.scale[kb, n]
        if qt.symmetric and qt.bits >= 2:
            lv[0] = np.inf  # code 0 is not used by the symmetric grid
        return lv
    lv = qt.codebook[codes] * qt.scale[kb, n]
    return lv if qt.offset is None else lv + qt.offset[kb, n]


def _reference(w, qt, a, h=None):
    """GPTQ as the greedy recursion it is: row k takes the level nearest to its optimal continuous value given the
    rows already fixed, ``w_R - H_RR^-1 H_RF (q_F - w_F)``; then per column the undamped-better of it and nearest."""
    k, n = w.shape
    w64 = w.astype(np.float64)
    ad = a + DAMPING * np.mean(np.diag(a)) * np.eye(k)
    out = qt.codes.copy()
    for col in range(n):
        if h is None:
            hm = ad
            judge = a
        else:
            s = np.sqrt(np.maximum(h[:, col], PRECISION_FLOOR * h[:, col].mean()))
            hm = ad / np.sqrt(np.outer(np.diag(ad), np.diag(ad))) * np.outer(s, s)
            judge = a / np.sqrt(np.outer(np.diag(a), np.diag(a))) * np.outer(s, s)
        q = np.zeros(k)
        for r in range(k):
            e_f = q[:r] - w64[:r, col]
            e_r = -np.linalg.solve(hm[r:, r:], hm[r:, :r] @ e_f) if r else np.zeros(k - r)
            target = np.float32(w64[r, col] + e_r[0])
            lv = _levels(qt, r, col)
            dist = np.abs(lv.astype(np.float64) - np.float64(target))
            code = int(np.argmin(dist))  # first = lowest code on ties
            out[r, col] = code
            q[r] = lv[code]
        near = qt.dequantize()[:, col].astype(np.float64) - w64[:, col]
        comp = q - w64[:, col]
        if near @ judge @ near <= comp @ judge @ comp:
            out[:, col] = qt.codes[:, col]
    return out


@pytest.mark.parametrize("method", ["uniform", "uniform-sym", "lloyd", "nf"])
@pytest.mark.parametrize("weighted", [False, True])
def test_codes_match_the_float64_recursion(method, weighted):
    rng, a, w = _problem(1)
    h = rng.uniform(0.05, 3.0, w.shape) if weighted else None
    qt = quantize(w, 3, method, 8, h)
    got = gptq_round(w, qt, a, h)
    want = _reference(w, qt, a, h)
    assert np.mean(got.codes == want) > 0.99  # float32 ties at a level midpoint may differ; nothing else
    assert (got.codes != qt.codes).any()


def test_grouped_a_is_each_group_on_its_own_columns():
    rng, a0, w = _problem(2, n=6)
    _, a1, _ = _problem(3)
    qt = quantize(w, 3, "uniform", 8)
    both = gptq_round(w, qt, np.stack([a0, a1]))
    from bq_onnx.qtensor import take_columns

    left = gptq_round(w[:, :3], take_columns(qt, 0, 3), a0)
    right = gptq_round(w[:, 3:], take_columns(qt, 3, 6), a1)
    assert np.array_equal(both.codes, np.concatenate([left.codes, right.codes], axis=1))


SPECS = [Spec("uniform"), Spec("uniform-sym"), Spec("lloyd"), Spec("gaussian"), Spec("percentile"),
         Spec("vq", 2), Spec("uniform", outliers=0.01), Spec("vq", 2, outliers=0.01)]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_never_worse_than_nearest_and_better_on_most(spec):
    better = 0
    for seed in range(12):
        _, a, w = _problem(10 + seed, k=32, n=8)
        qt = quantize_spec(w, 3, spec, 16)
        got = gptq_round(w, qt, a)
        near, comp = output_error(w, qt.dequantize(), a), output_error(w, got.dequantize(), a)
        assert comp <= near * (1 + 1e-12)
        better += comp < near
        # the grid is untouched: only codes (and outlier residuals) change
        for name in ("scale", "zero_point", "codebook", "offset", "outlier_index"):
            x, y = getattr(qt, name), getattr(got, name)
            assert (x is None and y is None) or np.array_equal(x, y)
    assert better >= 9  # strictly below on most problems


def test_never_worse_under_the_posterior_metric():
    for seed in range(8):
        rng, a, w = _problem(40 + seed)
        h = rng.lognormal(0.0, 1.5, w.shape)
        qt = quantize(w, 2, "uniform", 8, h)
        got = gptq_round(w, qt, a, h)
        assert output_error(w, got.dequantize(), a, h) <= output_error(w, qt.dequantize(), a, h) * (1 + 1e-12)


def test_low_precision_weights_absorb_the_compensation():
    """Two correlated inputs: the error of row 0 is pushed onto row 1 more where row 1's precision is low."""
    rng, a, w = _problem(5, k=16, n=64)
    qt = quantize(w, 2, "uniform", 16)
    h_lo = np.ones(w.shape)
    h_lo[8:] = 0.05  # the second half of the rows: weakly pinned down
    moved_plain = np.abs(gptq_round(w, qt, a).dequantize() - qt.dequantize())[8:].sum()
    moved_bayes = np.abs(gptq_round(w, qt, a, h_lo).dequantize() - qt.dequantize())[8:].sum()
    assert moved_bayes > moved_plain


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_diagonal_a_is_round_to_nearest(spec):
    rng, a, w = _problem(7, k=32, n=8)
    h = rng.uniform(0.1, 2.0, w.shape)
    qt = quantize_spec(w, 3, spec, 16, h)
    got = gptq_round(w, qt, np.diag(np.diag(a)), h)
    assert np.array_equal(got.codes, qt.codes)
    assert np.array_equal(got.dequantize(), qt.dequantize())


def test_tiny_case_matches_brute_force():
    """K = 3: the last row's code is the exact minimiser of the damped quadratic over every level, given the first
    two rows' codes (a 1-D problem); the whole is never better than the exhaustive optimum."""
    hits = 0
    for seed in range(80):
        rng, a, w = _problem(100 + seed, k=3, n=1, rows=20)
        qt = quantize(w, 2, "uniform", 3)
        got = gptq_round(w, qt, a)
        if np.array_equal(got.codes, qt.codes):
            continue  # the safeguard kept nearest
        hits += 1
        ad = a + DAMPING * np.mean(np.diag(a)) * np.eye(3)
        dec = got.dequantize()[:, 0].astype(np.float64)
        w64 = w[:, 0].astype(np.float64)
        lv = _levels(qt, 2, 0)
        costs = []
        for level in lv:
            e = np.array([dec[0], dec[1], level]) - w64
            costs.append(e @ ad @ e)
        assert int(got.codes[2, 0]) == int(np.argmin(costs))
        every = [np.array([lv[i], lv[j], lv[m]]) - w64 for i in range(4) for j in range(4) for m in range(4)]
        best = min(e @ a @ e for e in every)
        assert best <= output_error(w, got.dequantize(), a) + 1e-12
    assert hits >= 10


def test_deterministic():
    _, a, w = _problem(9, k=40, n=12)
    qt = quantize_spec(w, 3, Spec("vq", 2, outliers=0.01), 16)
    one, two = gptq_round(w, qt, a), gptq_round(w, qt, a)
    assert one.codes.tobytes() == two.codes.tobytes()
    assert one.outlier_value.tobytes() == two.outlier_value.tobytes()


def test_bad_shapes_are_refused():
    _, a, w = _problem(11)
    qt = quantize(w, 3, "uniform", 8)
    with pytest.raises(ValueError, match="A must be"):
        gptq_round(w, qt, a[:-1, :-1])
    with pytest.raises(ValueError, match="precision"):
        gptq_round(w, qt, a, np.ones((2, 2)))


def test_lazy_blocks_and_one_cholesky_match_the_recursion(monkeypatch):
    """K past several lazy blocks (the rows below a block are updated once per block), and the factor from one
    Cholesky of the reversed correlation is the upper Cholesky factor of ``C^-1`` computed the long way in float64."""
    import bq_onnx.rounding.gptq as g

    monkeypatch.setattr(g, "LAZY_ROWS", 8)
    rng, a, w = _problem(7, k=44, n=6)
    h = rng.uniform(0.05, 3.0, w.shape)
    for weighting in (None, h):
        qt = quantize(w, 3, "uniform", 8, weighting)
        got = gptq_round(w, qt, a, weighting)
        assert np.mean(got.codes == _reference(w, qt, a, weighting)) > 0.99
        assert (got.codes != qt.codes).any()
    rng, a, w = _problem(7, k=300, n=5, rows=900)
    metric = g.Metric(g.grouped_moments(a, 300, 5), None, 5, DAMPING)
    ad = a + DAMPING * np.mean(np.diag(a)) * np.eye(300)
    c = ad / np.sqrt(np.outer(np.diag(ad), np.diag(ad)))
    want = np.linalg.cholesky(np.linalg.inv(c)).T
    np.testing.assert_allclose(metric.u[0], want, rtol=1e-7, atol=1e-9 * np.abs(want).max())
    assert not np.tril(metric.u[0], -1).any()
