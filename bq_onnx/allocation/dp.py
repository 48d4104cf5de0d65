"""``dp``: the exact optimum by dynamic programming over a discretized cost axis (validation, small models)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from bq_onnx.allocation.problem import Allocation, Block, _fill, _prepare, _result

DP_MAX_CELLS = 200_000
"""Default size of the discretized cost axis of :func:`allocate_dp` when the exact (gcd) resolution needs more."""

DP_MAX_TABLE = 500_000_000
"""Cells x blocks of the default :func:`allocate_dp` table (one byte each); an explicit resolution may use 4x."""


def allocate_dp(
    blocks: Sequence[Block], budget: float, *, resolution: float | None = None, max_cells: int = DP_MAX_CELLS
) -> Allocation:
    """Exact optimum of the multiple-choice knapsack by dynamic programming over a discretized cost axis.

    Costs are taken relative to each block's cheapest width. ``resolution`` is the cost unit of the table:
    default, when all costs are integers, the gcd of those offsets if that gives at most ``max_cells`` cells (the
    result is then the exact optimum); otherwise (non-integer costs, or too many cells) the span of the budget
    above the cheapest allocation divided into ``min(max_cells, 5e8 / blocks) - 1`` cells (the back-pointer
    table takes one byte per block and cell: at most ~500 MB). The axis never extends past the cost of every
    block's dearest width. Offsets are rounded UP to the unit and the capacity DOWN, so the true budget is never
    exceeded; when that rounding was inexact the result is followed by :func:`_fill` (``details["exact"]`` says
    which). Time ``O(blocks * widths * cells)``. Ties go to the lower width.
    """
    p = _prepare(blocks, budget)
    if max_cells < 2:
        raise ValueError(f"max_cells must be >= 2, got {max_cells}")
    max_cells = min(max_cells, max(1000, DP_MAX_TABLE // p.n))
    cmin = np.min(p.cost, axis=1)
    offs = np.where(p.valid, p.cost - cmin[:, None], 0.0)
    # Beyond the cost of every block's dearest width the budget does not bind: the table need not reach further.
    span = min(p.budget - math.fsum(cmin.tolist()), math.fsum(offs.max(axis=1).tolist()))
    exact = False
    if resolution is None:
        integral = bool(np.all(offs == np.round(offs))) and float(offs.max()) < 2.0**62
        g = max(int(np.gcd.reduce(offs.astype(np.int64).ravel())), 1) if integral else 1
        if integral and math.floor(span) // g + 1 <= max_cells:
            res, exact = float(g), True
            units = offs.astype(np.int64) // g
            cap = int(math.floor(span)) // g  # integer offsets: sum <= span  <=>  sum <= floor(span)
        else:
            # span 0 (or so small that its cells underflow): only the cheapest widths fit anyway
            res = span / (max_cells - 1) if span / (max_cells - 1) > 0 else 1.0
    else:
        res = float(resolution)
        if not (math.isfinite(res) and res > 0):
            raise ValueError(f"resolution must be a positive number, got {resolution!r}")
    if not exact:
        cap = int(math.floor(span / res + 1e-9))
        q = np.minimum(offs / res, cap + 1.0)  # anything dearer than the capacity is just "does not fit"
        units = np.maximum(np.ceil(q - 1e-12 * np.maximum(q, 1.0)), 0).astype(np.int64)  # up (float noise aside)
        exact = bool(np.all(np.abs(units - q) <= 1e-9 * np.maximum(q, 1.0)))
    if p.n * (cap + 1) > 4 * DP_MAX_TABLE:
        raise ValueError(f"dp: {p.n} blocks x {cap + 1} cost cells is too large a table; pass a coarser resolution")
    # dp[c]: least loss of the blocks so far with total cost units <= c (so it is non-increasing in c).
    dp = np.zeros(cap + 1)
    back = np.zeros((p.n, cap + 1), dtype=np.uint8)
    for b in range(p.n):
        new = np.full(cap + 1, np.inf)
        arg = back[b]
        for o in range(int(p.nopt[b])):
            u = int(units[b, o])
            if u > cap:
                continue
            cand = dp[: cap + 1 - u] + p.loss[b, o]
            tgt = new[u:]
            better = cand < tgt
            tgt[better] = cand[better]
            arg[u:][better] = o
        dp = new
    choice = np.empty(p.n, dtype=np.int64)
    c = cap
    for b in range(p.n - 1, -1, -1):
        o = int(back[b, c])
        choice[b] = o
        c -= int(units[b, o])
    details = {"resolution": res, "cells": cap + 1, "exact": exact, "table_loss": float(dp[cap])}
    if not exact:
        choice, details["fill_moves"] = _fill(p, choice)
    return _result("dp", p, choice, details)
