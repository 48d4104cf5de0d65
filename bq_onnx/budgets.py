"""Memory budgets, checked before anything is allocated from what a file declares.

A model or a data file is a stranger's claim about sizes: dims, npy headers, zip members. Every size the tool
allocates while reading one is first computed here with Python integers (no wrap-around: numpy's int64 product
of ``[2^32, 2^32]`` is 0), checked against what the bytes really present can hold, and compared with the memory
budget: ``--max-memory`` (bytes, or a percentage of the memory available), by default
:data:`DEFAULT_FRACTION` of the memory available when the budget is first asked for (``MemAvailable``, and any
``RLIMIT_AS``/``RLIMIT_DATA`` limit of the process, whichever is smallest). Over it: one line, exit 3 for a model
(:class:`ModelError`), exit 5 for data (:class:`DataError`).

Standard library only (the CLI parses ``--max-memory`` before numpy is imported).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
from collections.abc import Iterable, Iterator
from typing import Any

from bq_onnx.errors import BqError, UsageError

DEFAULT_FRACTION = 0.75
"""The default budget: this share of the memory available (physical, and the process's address-space limits)."""

#: the largest size a C ``size_t``/``ssize_t`` (and numpy's ``intp``) can count
C_SIZE_MAX = 2**63 - 1

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([a-z]*|%)", re.ASCII)

_limit: int | None = None  # set by --max-memory / memory_limit(); None: the default


def parse_memory(value: Any, flag: str = "--max-memory") -> int | None:
    """``"4G"``, ``"512MiB"``, ``"1.5GB"``, ``"123456"`` (bytes) or ``"50%"`` (of the memory available now) ->
    bytes; an int is bytes; None is the default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise UsageError(f"{flag} takes a size such as 4G, 512M or 50%, got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.strip().lower())
        if match is None or match.group(2) not in (*_UNITS, "%"):
            raise UsageError(f"{flag} takes a size such as 4G, 512M or 50%, got {value!r}")
        number, unit = float(match.group(1)), match.group(2)
        size = int(number / 100 * available_memory()) if unit == "%" else int(number * _UNITS[unit])
    if size <= 0:
        raise UsageError(f"{flag} must be > 0, got {value!r}")
    return size


def available_memory() -> int:
    """Bytes this process can still allocate: the smallest of the kernel's ``MemAvailable`` and what the
    process's ``RLIMIT_AS``/``RLIMIT_DATA`` leave (so a limit set by a parent, or a test, lowers the budget)."""
    candidates = []
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
                break
    if not candidates:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            candidates.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    used = _process_sizes()
    for limit, key in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft = resource.getrlimit(limit)[0]
        if soft != resource.RLIM_INFINITY:
            candidates.append(max(soft - used.get(key, 0), 0))
    return min(candidates) if candidates else 2**34


def _process_sizes() -> dict[str, int]:
    out: dict[str, int] = {}
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmSize", "VmData"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def memory_budget() -> int:
    """The budget in bytes: ``--max-memory``, else :data:`DEFAULT_FRACTION` of :func:`available_memory` (fixed
    the first time it is asked for, so one run compares every size with one number)."""
    global _limit
    if _limit is None:
        _limit = max(int(available_memory() * DEFAULT_FRACTION), 1)
    return _limit


def max_memory_set() -> int | None:
    """The budget as set so far (None: not set, each process takes its own default): what workers inherit."""
    return _limit


def set_max_memory(value: int | str | None) -> None:
    """Set the budget (``--max-memory``); None returns to the default."""
    global _limit
    _limit = parse_memory(value)


@contextlib.contextmanager
def memory_limit(value: int | str | None) -> Iterator[None]:
    """The budget set to ``value`` inside the block (the API's ``max_memory``), restored after."""
    global _limit
    saved = _limit
    set_max_memory(value)
    try:
        yield
    finally:
        _limit = saved


def checked_product(dims: Iterable[int]) -> int | None:
    """The number of elements of ``dims`` as an exact integer; None when a dimension is negative or the count
    is beyond what a C size can hold (no allocation could ever be made for it)."""
    count = 1
    for d in dims:
        d = int(d)
        if d < 0:
            return None
        count *= d
    return count if count <= C_SIZE_MAX else None


def nbytes(dims: Iterable[int], bits: int) -> int | None:
    """Bytes of a tensor of ``dims`` with ``bits`` per element (sub-byte types packed); None as in
    :func:`checked_product`."""
    count = checked_product(dims)
    if count is None:
        return None
    size = -(-count * bits // 8)
    return size if size <= C_SIZE_MAX else None


def human(size: int) -> str:
    """``size`` bytes as a short text (``6.0 GiB``)."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def require(size: int, what: str, error: type[BqError]) -> None:
    """Raise ``error`` (one line) when allocating ``size`` bytes for ``what`` would pass the budget."""
    budget = memory_budget()
    if size > budget:
        raise error(f"{what} needs {human(size)}, more than the memory budget of {human(budget)} "
                    f"(--max-memory; default {math.floor(DEFAULT_FRACTION * 100)}% of the memory available)")
