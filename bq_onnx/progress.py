"""Progress bars on long steps (stderr, only when asked and attached to a terminal or forced), and an opt-in
memory trace (``BQ_ONNX_MEMTRACE=1``: one stderr line per pipeline step with resident and peak memory) that the
scale benchmark reads to find where memory goes."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_START = time.perf_counter()


def progress(items: Iterable[T], desc: str, enabled: bool, unit: str = "tensors",
             size: Callable[[T], int] | None = None) -> Iterator[T]:
    """``items``, with a bar on stderr when ``enabled``: done/total in ``unit`` (a plural noun: tensors, samples,
    steps, configurations), elapsed time, time left and rate. ``size`` counts what one item is worth in ``unit``
    (a batch of samples: its sample count); the total is the sum over ``items`` (a sized collection; an iterator
    is listed first so that the total and the ETA are known)."""
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    listed = items if hasattr(items, "__len__") else list(items)
    total = sum(size(item) for item in listed) if size is not None else len(listed)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=sys.stderr, leave=False, dynamic_ncols=True,
               bar_format=BAR_FORMAT)
    try:
        for item in listed:
            yield item
            bar.update(size(item) if size is not None else 1)
    finally:
        bar.close()


#: "loss tables:  40%|####      | 12/30 tensors [00:04<00:06, 2.9 tensors/s]" (tqdm's default writes "12tensor").
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt}{unit} [{elapsed}<{remaining}, {rate_fmt}]"


def memory_status() -> dict[str, int]:
    """Resident (VmRSS), peak (VmHWM), anonymous and file-backed resident bytes of this process (Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def memtrace(step: str) -> None:
    """With ``BQ_ONNX_MEMTRACE`` set, print ``memtrace <seconds> <step> rss=.. hwm=.. anon=.. file=..`` (MiB)."""
    if not os.environ.get("BQ_ONNX_MEMTRACE"):
        return
    m = memory_status()
    mib = {k: v / 2**20 for k, v in m.items()}
    print(f"memtrace {time.perf_counter() - _START:.2f}s {step} rss={mib.get('VmRSS', 0):.0f} "
          f"hwm={mib.get('VmHWM', 0):.0f} anon={mib.get('RssAnon', 0):.0f} file={mib.get('RssFile', 0):.0f}",
          file=sys.stderr, flush=True)


def release_freed_memory() -> None:
    """Hand memory freed by a dropped session or cache back to the system (glibc keeps freed heap pages
    otherwise, and the next step would stack on top of them)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
