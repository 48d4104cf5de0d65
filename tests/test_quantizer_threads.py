"""The range search and the nearest-code pass run by chunks of block rows on threads, with the candidates'
metadata computed for all candidates at once: the result must be byte-identical to the one-candidate-at-a-time
search and the same whatever the thread count."""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx.quantizers import UNIFORM_SHRINK, UNIFORM_SIDE_SHRINK, quantize_nf, quantize_uniform, quantize_uniform_sym
from bq_onnx.quantizers.blocked import _prepare, _row_chunks
from bq_onnx.quantizers.parallel import run_chunks, set_threads, threads
from bq_onnx.quantizers.uniform import _Search, _search_asymmetric, _uniform_meta


@pytest.fixture(autouse=True)
def _restore_threads():
    yield
    set_threads(None)


def _tensor(k: int, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.exponential(1.0, (1, n))).astype(np.float32)
    w[:, 0] = 0.25  # a constant column: the constant candidate
    return w, rng.random((k, n)) ** 3


def _fields(qt) -> list[np.ndarray]:
    return [np.asarray(v) for v in (qt.codes, qt.scale, qt.zero_point, qt.offset) if v is not None]


def _search_one_by_one(search: _Search, lo0: np.ndarray, hi0: np.ndarray, m: int):
    """The asymmetric search as first written: one candidate's metadata and score at a time."""
    best_lo, best_hi = lo0.copy(), hi0.copy()

    def consider(lo, hi):
        win = search.consider(*_uniform_meta(lo, hi, m), 0, m - 1)
        best_lo[win], best_hi[win] = lo[win], hi[win]

    for p in UNIFORM_SHRINK:
        consider(lo0 * p, hi0 * p)
    lo1, hi1 = best_lo.copy(), best_hi.copy()
    for q in UNIFORM_SIDE_SHRINK:
        consider(lo1 * q, hi1)
        consider(lo1, hi1 * q)
    return best_lo, best_hi


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("weighted", [False, True])
def test_vectorized_search_equals_one_by_one(bits: int, weighted: bool) -> None:
    w, h = _tensor(300, 70, bits)  # ragged last block (300 = 9 * 32 + 12)
    bl = _prepare(w, bits, 32, h if weighted else None)
    m = 1 << bits
    lo0 = np.minimum(bl.x.min(axis=1), 0).astype(np.float64)
    hi0 = np.maximum(bl.x.max(axis=1), 0).astype(np.float64)
    rows = slice(0, bl.nrows)
    got = _search_asymmetric(_Search(bl, rows), lo0, hi0, m)
    want = _search_one_by_one(_Search(bl, rows), lo0, hi0, m)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@pytest.mark.parametrize("quantizer", [quantize_uniform, quantize_uniform_sym, quantize_nf])
def test_same_bytes_whatever_the_thread_count(quantizer) -> None:
    w, h = _tensor(2100, 80, 7)  # several chunks of block rows at block size 32
    assert len(list(_row_chunks(_prepare(w, 4, 32, None).nrows, 32))) > 2
    results = []
    for count in (1, 2, 3):
        set_threads(count)
        assert threads() == count
        results.append([_fields(quantizer(w, bits, 32, h)) for bits in (2, 4)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a, b))


def test_run_chunks_nested_and_errors() -> None:
    set_threads(2)
    seen: list[int] = []

    def outer(i: int) -> None:
        run_chunks(seen.append, [10 * i, 10 * i + 1])  # nested: runs in line, never waits on the pool

    run_chunks(outer, range(4))
    assert sorted(seen) == [0, 1, 10, 11, 20, 21, 30, 31]

    def fail(i: int) -> None:
        if i == 2:
            raise ValueError("chunk 2")

    with pytest.raises(ValueError, match="chunk 2"):
        run_chunks(fail, range(4))


def test_design_cache_reuses_equal_calls_inside_a_scope_only():
    """The tables, the quantize stage and the guard ask for the same design: inside one run it is computed once
    (same object back), keyed by content (an equal copy hits, other importance or width misses), nothing is kept
    outside a scope, and the cached result equals a fresh computation."""
    from bq_onnx.quantizers import Spec, quantize_spec
    from bq_onnx.quantizers import cache as design_cache

    w, h = _tensor(96, 12, 5)
    spec = Spec("uniform")
    assert quantize_spec(w, 4, spec, 32, h) is not quantize_spec(w, 4, spec, 32, h)  # no scope: no cache
    with design_cache.scope():
        first = quantize_spec(w, 4, spec, 32, h)
        assert quantize_spec(w.copy(), 4, spec, 32, h.copy()) is first
        assert quantize_spec(w, 3, spec, 32, h) is not first and quantize_spec(w, 4, spec, 32, h * 2) is not first
        assert quantize_spec(w, 4, spec, 64, h) is not first
        assert design_cache.stats()["hits"] == 1 and design_cache.stats()["entries"] == 4
    assert design_cache.stats()["entries"] == 0 and not design_cache.active()
    fresh = quantize_spec(w, 4, spec, 32, h)
    for a, b in zip(_fields(first), _fields(fresh), strict=True):
        np.testing.assert_array_equal(a, b)
