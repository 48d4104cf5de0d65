"""``uniform``: one width for every block, the largest whose total cost fits; the baseline to beat."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bq_onnx.allocation.problem import Allocation, Block, _prepare, _result


def allocate_uniform(blocks: Sequence[Block], budget: float) -> Allocation:
    """The same width for every block: the largest allowed width whose total cost fits.

    A block whose allowed set lacks that width takes its nearest allowed width below (its lowest allowed width when
    none is below, e.g. under ``min_bits``). No fill: this is the fixed-width baseline.
    """
    p = _prepare(blocks, budget)
    candidates = np.unique(p.width[p.valid])[::-1]
    for w in candidates:
        below = np.where(p.valid & (p.width <= w), p.width, -1)
        choice = np.where(below.max(axis=1) >= 0, np.argmax(below, axis=1), 0)
        if p.total_cost(choice) <= p.budget:
            return _result("uniform", p, choice, {"width": int(w)})
    raise ValueError(
        f"infeasible budget for uniform: {p.budget:g} is below the cost of the lowest common width "
        f"{int(candidates[-1])} ({p.total_cost(np.zeros(p.n, dtype=np.int64)):g})"
    )
