"""``uniform``: one width for every block, the largest whose total cost fits; the baseline to beat.

With ``fill`` (the guard's reference, :mod:`bq_onnx.stages.guard`) what the common width leaves of the budget is
spent on whole layers: a stored budget between two container widths (``--bits 4`` with int4 codes plus scales
costing 4.6 bits, onnxruntime's int2 2.6) otherwise buys the narrower width everywhere and leaves a third of the
budget unspent, and a model the guard cannot measure was written that way.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from bq_onnx.allocation.greedy import _greedy
from bq_onnx.allocation.problem import Allocation, Block, _layers, _prepare, _Problem, _result


def allocate_uniform(blocks: Sequence[Block], budget: float, *, fill: bool = False) -> Allocation:
    """The same width for every block: the largest allowed width whose total cost fits.

    A block whose allowed set lacks that width takes its nearest allowed width below (its lowest allowed width when
    none is below, e.g. under ``min_bits``). No fill by default: this is the fixed-width baseline. With ``fill``
    the budget left is spent on whole layers (:func:`_fill_layers`): each layer keeps one common width, at least
    the uniform one (``details["width"]``).
    """
    p = _prepare(blocks, budget)
    candidates = np.unique(p.width[p.valid])[::-1]
    for i, w in enumerate(candidates):
        choice = _at_width(p, w)
        if p.total_cost(choice) <= p.budget:
            details = {"width": int(w)}
            if fill and i > 0:
                choice, raised = _fill_layers(p, candidates[:i][::-1], choice)
                details["filled_layers"] = raised
            return _result("uniform", p, choice, details)
    raise ValueError(
        f"infeasible budget for uniform: {p.budget:g} is below the cost of the lowest common width "
        f"{int(candidates[-1])} ({p.total_cost(np.zeros(p.n, dtype=np.int64)):g})"
    )


def _at_width(p: _Problem, w: int) -> np.ndarray:
    """Per block the option at width ``w``: its nearest allowed width below, else its lowest."""
    below = np.where(p.valid & (p.width <= w), p.width, -1)
    return np.where(below.max(axis=1) >= 0, np.argmax(below, axis=1), 0)


def _fill_layers(p: _Problem, wider: np.ndarray, choice: np.ndarray) -> tuple[np.ndarray, int]:
    """Raise whole layers from ``choice`` to the common widths in ``wider`` (ascending) while the budget allows:
    the greedy allocator's hull steps over layers, each layer's options its blocks' summed cost and loss at the
    uniform width and at each wider one (the same nearest-below rule). Returns the choice and the layers raised."""
    keys, layer = _layers(p)
    options = [choice, *(_at_width(p, int(w)) for w in wider)]
    cost = np.array([np.bincount(layer, p.take(p.cost, c), len(keys)) for c in options]).T
    loss = np.array([np.bincount(layer, p.take(p.loss, c), len(keys)) for c in options]).T
    top = np.arange(len(options))
    # one option table per layer (the greedy reads the tables and the block count, not the blocks themselves)
    whole = _Problem([None] * len(keys), np.tile(top, (len(keys), 1)), cost, loss,  # type: ignore[list-item]
                     np.full(len(keys), len(options)), np.ones(len(keys), np.int64), p.budget)
    picked, _ = _greedy(whole)
    out = choice.copy()
    for j, c in enumerate(options):
        take = picked[layer] == j
        out[take] = c[take]
    return out, int(np.count_nonzero(picked))

