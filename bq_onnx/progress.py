"""Progress bars on long steps (stderr, only when asked and attached to a terminal or forced)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], desc: str, enabled: bool) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit="tensor", file=sys.stderr, leave=False, dynamic_ncols=True)
