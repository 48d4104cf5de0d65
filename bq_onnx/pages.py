"""Pages of weight files that onnxruntime mapped, handed back to the kernel (``MADV_PAGEOUT``).

Why (issue 21): a session created from a file with external data maps the weights and reads them where its runs
need them; each page read stays resident in this process as long as the session lives. The guard keeps one session
that reads the FP32 weights (its tensor probes swap one weight and read the rest) and runs the candidates on the
same session fed all their weights decoded: at 1 GiB of weights the probes' reads (1x the model, file-backed) stood
beside the candidate's decoded weights (1x, anonymous) during its runs. A page handed back is read again from the
file when a later run needs it; the bytes are the file's, so every output is the same. Only a clean page of a file
goes: a page a runtime wrote to (copy-on-write) has no file to come back from and stays, so this cannot change
what a session computes. Linux only (``/proc/self/maps``, ``madvise``); elsewhere, or on a kernel without
``MADV_PAGEOUT`` (5.4), nothing happens.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from collections.abc import Iterable

import numpy as np

MADV_PAGEOUT = 21
"""Linux's ``madvise`` advice: reclaim these pages (clean file pages are dropped, to be read again on access)."""


def page_out(folders: Iterable[str | os.PathLike]) -> int:
    """Hand back the resident pages of every file mapping of this process under ``folders``; returns the bytes of
    the mappings advised (0 where there are none, or off Linux)."""
    roots = tuple(os.path.join(os.fspath(f), "") for f in folders)
    if not roots:
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith(roots):
            continue
        with contextlib.suppress(ValueError):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if madvise(start, end - start, MADV_PAGEOUT) == 0:
                advised += end - start
    return advised


def is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` views a memory-mapped file (its pages the kernel's to drop, not this process's memory)."""
    while isinstance(array, np.ndarray):
        array = array.base
    return isinstance(array, mmap.mmap) or (isinstance(array, memoryview) and isinstance(array.obj, mmap.mmap))
