"""BLAS runs on one thread inside the pipeline unless the user chose a count (bq_onnx/blas.py)."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from bq_onnx import blas


def _blas_threads() -> list[int]:
    return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]


def test_single_threaded_inside_and_restored_after(monkeypatch):
    for name in blas.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    if not _blas_threads():
        pytest.skip("no BLAS library loaded by numpy here")
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        with blas.single_threaded():
            assert set(_blas_threads()) == {1}
        assert _blas_threads() == before


def test_a_count_the_user_set_is_left_alone(monkeypatch):
    if not _blas_threads():
        pytest.skip("no BLAS library loaded by numpy here")
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        with blas.single_threaded():
            assert _blas_threads() == before


def test_optimize_runs_blas_on_one_thread(monkeypatch):
    """The pipeline's stages see one BLAS thread (a stage is wrapped by a spy that records it), and the caller's
    setting is back afterwards."""
    import bq_onnx
    from bq_onnx import pipeline
    from tests.conftest import MODELS

    for name in blas.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    if not _blas_threads():
        pytest.skip("no BLAS library loaded by numpy here")
    seen = []
    real = pipeline.find_weights

    def spy(*args, **kwargs):
        seen.append(set(_blas_threads()))
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "find_weights", spy)
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        bq_onnx.optimize(MODELS / "lenet.onnx", bits=4, no_guard=True)
        assert _blas_threads() == before
    assert seen and all(s == {1} for s in seen)
