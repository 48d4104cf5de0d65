"""Progress bars on long steps (stderr, only when asked and attached to a terminal or forced), and an opt-in
memory trace (``BQ_ONNX_MEMTRACE=1``: one stderr line per pipeline step with resident and peak memory) that the
scale benchmark reads to find where memory goes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_START = time.perf_counter()


def progress(items: Iterable[T], desc: str, enabled: bool) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)


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
