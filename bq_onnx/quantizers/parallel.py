"""Chunks of block rows on a pool of threads: numpy releases the GIL inside its loops, so the range search and
the nearest-code pass of one tensor use every core. Each chunk reads and writes only its own rows, so the result
is the same whatever the thread count (``tests/test_quantizer_threads.py`` checks it byte for byte)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

MAX_DEFAULT_THREADS = 8
"""Threads used by default: one per CPU core the process may run on, at most this many."""

_state = threading.local()  # .inside: this thread is a pool worker (a nested call runs its chunks in line)
_lock = threading.Lock()
_count: int | None = None  # set_threads; None: default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def default_threads() -> int:
    """One thread per CPU core this process may use, at most :data:`MAX_DEFAULT_THREADS`."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_DEFAULT_THREADS))


def set_threads(count: int | None) -> None:
    """Threads for the chunked passes from now on (``None`` or 0: :func:`default_threads`; 1: no pool)."""
    global _count
    _count = count or None


def threads() -> int:
    """The thread count :func:`run_chunks` uses now."""
    return _count or default_threads()


def run_chunks(work: Callable[[T], None], chunks: Iterable[T]) -> None:
    """``work(chunk)`` for every chunk, on the pool when there are several threads and chunks (in line inside a
    pool worker, so nesting never waits on itself); the first exception is raised after every chunk is done."""
    items = list(chunks)
    n = threads()
    if n <= 1 or len(items) < 2 or getattr(_state, "inside", False):
        for item in items:
            work(item)
        return
    pool = _get_pool(n)
    futures = [pool.submit(_in_worker, work, item) for item in items]
    errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _in_worker(work: Callable[[T], None], item: T) -> None:
    _state.inside = True
    try:
        work(item)
    finally:
        _state.inside = False


def _get_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _lock:
        if _pool is None or _pool_size != n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="bq-onnx-chunks")
            _pool_size = n
        return _pool
