"""The allocators by name: what ``--allocator`` offers and what :func:`allocate` dispatches on.

The dict's order is the order users see (the CLI's choices); :data:`METHODS` is derived from it, so a new
allocator is one module and one line here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bq_onnx.allocation.dp import allocate_dp
from bq_onnx.allocation.greedy import allocate_greedy
from bq_onnx.allocation.problem import Allocation, Block
from bq_onnx.allocation.quantile_inform import allocate_quantile_inform
from bq_onnx.allocation.random_bits import allocate_random_bits
from bq_onnx.allocation.selective import allocate_selective
from bq_onnx.allocation.uniform import allocate_uniform

Allocator = Callable[..., Allocation]
"""``(blocks, budget, **options) -> Allocation``; the options are the method's own keywords."""

ALLOCATORS: dict[str, Allocator] = {
    "uniform": allocate_uniform,
    "greedy": allocate_greedy,
    "dp": allocate_dp,
    "quantile-inform": allocate_quantile_inform,
    "random-bits": allocate_random_bits,
    "selective": allocate_selective,
}

METHODS: tuple[str, ...] = tuple(ALLOCATORS)


def allocate(method: str, blocks: Sequence[Block], budget: float, **options) -> Allocation:
    """Run allocator ``method`` (one of :data:`METHODS`; ``_`` and ``-`` are interchangeable)."""
    key = method.replace("_", "-").lower()
    if key not in ALLOCATORS:
        raise ValueError(f"unknown allocation method {method!r}; expected one of {METHODS}")
    return ALLOCATORS[key](blocks, budget, **options)
