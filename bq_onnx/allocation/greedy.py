"""``greedy`` (BayesQ, paper 004 eqs. 10-11): upgrades by expected-loss reduction per extra cost, taken along
each block's lower convex hull so that a non-concave loss curve cannot trap it."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from bq_onnx.allocation.problem import Allocation, Block, _fill, _prepare, _Problem, _result, _swap_refine


def _greedy(
    p: _Problem, choice: np.ndarray | None = None, frozen: np.ndarray | None = None, min_ratio: float = 0.0
) -> tuple[np.ndarray, int]:
    """Hull greedy from the cheapest widths (frozen blocks keep ``choice``); a step that does not fit ends its block.

    Steps are taken by decreasing loss reduction per extra cost, only while that ratio exceeds ``min_ratio``
    (the rate weight of :func:`allocate_selective`; 0 for plain greedy). Returns the choice and steps taken.
    """
    start = p.min_cost_choice()
    if choice is not None and frozen is not None:
        start[frozen] = choice[frozen]
    choice = start
    movable = np.ones(p.n, dtype=bool) if frozen is None else ~frozen
    hulls = p.hulls()
    cost, loss, _ = p.lists()
    pos = [0] * p.n
    heap: list[tuple[float, int]] = []

    def ratio(b: int) -> float:
        h, i = hulls[b], pos[b]
        return (loss[b][h[i]] - loss[b][h[i + 1]]) / (cost[b][h[i + 1]] - cost[b][h[i]])

    for b in np.flatnonzero(movable).tolist():
        if len(hulls[b]) > 1 and ratio(b) > min_ratio:
            heap.append((-ratio(b), b))
    heapq.heapify(heap)
    total = p.total_cost(choice)
    steps = 0
    while heap:
        _, b = heapq.heappop(heap)
        h, i = hulls[b], pos[b]
        dc = cost[b][h[i + 1]] - cost[b][h[i]]
        if total + dc > p.budget:
            continue  # this block's next hull step does not fit: its chain ends (fill may still move it)
        total += dc
        pos[b] = i + 1
        choice[b] = h[i + 1]
        steps += 1
        if i + 2 < len(h) and ratio(b) > min_ratio:
            heapq.heappush(heap, (-ratio(b), b))
    return choice, steps


def allocate_greedy(blocks: Sequence[Block], budget: float, *, refine: bool = True) -> Allocation:
    """BayesQ's greedy knapsack (paper 004 eq. 11): repeatedly take the upgrade with the largest ``gamma_b(m)``.

    ``gamma = (loss reduction) / (extra cost)``, with upgrades along each block's lower convex hull of
    ``(cost, loss)`` (:func:`lower_hull`): a jump over a width that helps little is one upgrade, so a non-concave
    loss curve does not stop the block early. Start: every block at its cheapest (lowest) allowed width; a max-heap
    over blocks gives ``O(total widths * log(blocks))``. Then :func:`_fill`, and with ``refine`` (default) the
    swap local search :func:`_swap_refine`, which repairs greedy's knapsack gap when blocks are coarse
    (``refine=False`` is the paper's rule alone).
    """
    p = _prepare(blocks, budget)
    choice, steps = _greedy(p)
    choice, filled = _fill(p, choice)
    swaps = 0
    if refine:
        choice, swaps = _swap_refine(p, choice)
    return _result("greedy", p, choice, {"hull_steps": steps, "fill_moves": filled, "swaps": swaps})
