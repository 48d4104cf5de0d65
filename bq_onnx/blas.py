"""BLAS on one thread while bq-onnx computes: its own parallelism (the chunked quantizer passes, onnxruntime's
intra-op threads) already uses every core, and OpenBLAS's threads beside them oversubscribe the CPU
(``benchmarks/speed.md``: fewer CPU seconds on both MiniLM encoders with one, same output bytes). A thread count the
user set in the environment (``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``) is left as it is."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

USER_SETTINGS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
"""Environment variables by which a user chooses the BLAS thread count; where one is set it is honoured."""


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """BLAS limited to one thread inside (restored after; nested uses are harmless)."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
