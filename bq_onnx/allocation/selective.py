"""``selective`` (paper 000): blocks of low importance are stored as their mean (0 bits), the rest by greedy
on a rate-distortion objective."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from bq_onnx.allocation.greedy import _greedy
from bq_onnx.allocation.problem import Allocation, Block, _fill, _prepare, _result, _swap_refine


def allocate_selective(
    blocks: Sequence[Block],
    budget: float,
    importance: Mapping[str, float],
    *,
    threshold: float | None = None,
    rate_weight: float = 0.0,
    skip_penalty: float = 0.0,
    candidates: int = 17,
    refine: bool = True,
) -> Allocation:
    """Selective encoding (paper 000): blocks with importance ``S < T`` are stored as their mean (0 bits).

    ``importance`` maps block names (or, failing that, layer keys) to ``S`` (e.g. ``I / sigma^2``). Only blocks
    whose allowed widths include 0 can be skipped. The rest are allocated by hull greedy (:func:`_greedy`) on the
    paper's objective ``loss + rate_weight * cost + skip_penalty * [skipped]``: with ``rate_weight = lambda > 0``
    only upgrades that save more than ``lambda`` loss per cost are taken (the allocation may then stay below the
    budget: that is what a rate term means); then :func:`_fill` under the same rule, skipped blocks frozen, and
    with ``refine`` and ``lambda = 0`` the swap search of :func:`allocate_greedy`.

    Threshold: given, or chosen as the ``T`` minimizing that objective over candidate thresholds: "skip nothing",
    "skip all skippable", and the distinct ``S`` values of skippable blocks (at most ``candidates`` of them, evenly
    spaced in rank). Skipping the least important blocks frees budget for the others; ``skip_penalty`` (``rho``,
    in loss units per skipped block) makes skipping dearer. Ties go to the lower ``T`` (fewer skips).
    """
    p = _prepare(blocks, budget)
    if not (math.isfinite(rate_weight) and rate_weight >= 0 and math.isfinite(skip_penalty)):
        raise ValueError("rate_weight must be finite and >= 0, skip_penalty finite")
    s = np.empty(p.n)
    for i, blk in enumerate(p.blocks):
        key = blk.name if blk.name in importance else blk.layer_key
        if key not in importance:
            raise ValueError(f"selective: no importance for block {blk.name!r}")
        s[i] = float(importance[key])
    if not np.isfinite(s).all():
        raise ValueError("selective: importance values must be finite")
    zero_opt = np.argmax(p.valid & (p.width == 0), axis=1)
    skippable = (p.valid & (p.width == 0)).any(axis=1)

    def run(t: float) -> tuple[float, np.ndarray, np.ndarray, int]:
        skip = skippable & (s < t)
        start = np.where(skip, zero_opt, 0)
        cheapest = p.min_cost_choice()
        if math.fsum(p.take(p.cost, np.where(skip, zero_opt, cheapest)).tolist()) > p.budget:
            return math.inf, start, skip, 0
        choice, _ = _greedy(p, start, skip, min_ratio=rate_weight)
        choice, filled = _fill(p, choice, frozen=skip, min_ratio=rate_weight)
        if refine and rate_weight == 0.0:
            choice, _ = _swap_refine(p, choice, frozen=skip)
        obj = p.total_loss(choice) + rate_weight * p.total_cost(choice) + skip_penalty * int(skip.sum())
        return obj, choice, skip, filled

    if threshold is not None:
        t_used = float(threshold)
        if not math.isfinite(t_used):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        obj, choice, skip, filled = run(t_used)
        if not math.isfinite(obj):
            raise ValueError(f"selective: skipping the blocks under threshold {t_used:g} does not fit the budget")
        tried = 1
    else:
        vals = np.unique(s[skippable])
        if vals.size == 0:
            ts = [float(s.min())]
        else:
            if vals.size > candidates:
                vals = vals[np.unique(np.linspace(0, vals.size - 1, candidates).round().astype(np.int64))]
            ts = [float(v) for v in vals] + [float(np.nextafter(vals.max(), np.inf))]
            ts[0] = float(min(ts[0], s.min()))  # the first candidate skips nothing
        best = None
        for t in ts:
            res = run(t)
            if best is None or res[0] < best[1][0]:
                best = (t, res)
        assert best is not None
        t_used, (obj, choice, skip, filled) = best
        tried = len(ts)
    details = {
        "threshold": t_used,
        "skipped": [p.blocks[i].name for i in np.flatnonzero(skip)],
        "objective": obj,
        "rate_weight": rate_weight,
        "skip_penalty": skip_penalty,
        "thresholds_tried": tried,
        "fill_moves": filled,
    }
    return _result("selective", p, choice, details)
