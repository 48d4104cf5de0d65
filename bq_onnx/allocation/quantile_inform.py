"""``quantile-inform`` (paper 001 §4.2, appendix D): per-layer informativeness ``|mu|/sigma`` mapped to widths
by evenly spaced thresholds whose scale is searched to meet the budget."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from bq_onnx.allocation.problem import Allocation, Block, _ensure_budget, _fill, _layers, _prepare, _result


def layer_informativeness(info: np.ndarray, aggregation: str = "mean") -> float:
    """Aggregate per-weight informativeness ``|mu|/sigma`` of one layer (paper 001 eq. 2 or eq. 15).

    ``"mean"``: the plain mean (eq. 2). ``"entropy"``: ``1 - H / log n`` with ``H`` the entropy of the weights'
    normalized informativeness ``p_w = info_w / sum(info)`` (appendix D): near 1 when few weights carry the layer,
    0 when all are alike (or all zero). A single weight counts as fully certain (1).
    """
    x = np.asarray(info, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all() or (x < 0).any():
        raise ValueError("informativeness must be a non-empty array of finite non-negative values")
    if aggregation == "mean":
        return float(x.mean())
    if aggregation == "entropy":
        if x.size == 1:
            return 1.0
        s = x.sum()
        if s <= 0:
            return 0.0
        pw = x[x > 0] / s
        h = float(-(pw * np.log(pw)).sum())
        return float(min(max(1.0 - h / math.log(x.size), 0.0), 1.0))
    raise ValueError(f"aggregation must be 'mean' or 'entropy', got {aggregation!r}")


def allocate_quantile_inform(
    blocks: Sequence[Block],
    budget: float,
    informativeness: Mapping[str, np.ndarray],
    *,
    aggregation: str = "mean",
) -> Allocation:
    """Quantile Inform (paper 001 §4.2): widths by layer informativeness, one threshold scale meeting the budget.

    ``informativeness`` maps each layer (``Block.layer``, or the block name when that is empty) to the per-weight
    ``|mu|/sigma`` (any shape; with ``"mean"`` a single value acts as a precomputed aggregate). Per layer: aggregate
    (:func:`layer_informativeness`), normalize to ``[0, 1]`` over layers (all equal -> 1), square-root. The width
    ladder is the sorted union of the allowed non-zero widths (``k`` of them; 0 bits is left to other methods);
    thresholds ``t_i = s * i / k``, ``i = 1..k-1`` (evenly spaced, scaled by ``s``) put a layer at ladder index
    ``#{i: t_i <= I}``. The cost falls as ``s`` grows and only changes at ``s = I_j * k / i``: a bisection over
    those values finds the smallest ``s`` whose cost fits. Blocks take the nearest allowed width to their layer's
    (ties: lower). If even the lowest ladder width does not fit, blocks start from their cheapest widths. Then
    :func:`_fill`.
    """
    p = _prepare(blocks, budget)
    keys, lidx = _layers(p)
    missing = [k for k in keys if k not in informativeness]
    if missing:
        raise ValueError(f"quantile-inform: no informativeness for layer(s) {missing[:5]}")
    raw = np.array([layer_informativeness(informativeness[k], aggregation) for k in keys])
    lo, hi = raw.min(), raw.max()
    norm = (raw - lo) / (hi - lo) if hi > lo else np.ones_like(raw)
    root = np.sqrt(norm)
    allowed = p.width[p.valid]
    ladder = np.unique(allowed[allowed > 0]) if (allowed > 0).any() else np.array([0])
    k = ladder.size

    def widths_at(s: float) -> np.ndarray:
        if k == 1:
            return np.full(root.size, ladder[0])
        idx = np.minimum(np.floor(root * k / s + 1e-9), k - 1).astype(np.int64)
        return ladder[idx]

    def choice_at(s: float) -> np.ndarray:
        return p.nearest(widths_at(s)[lidx])

    s_all_low = float(k + 1)  # every root <= 1 < s * 1 / k: all layers at the lowest ladder width
    cands = sorted({float(r * k / i) for r in root if r > 0 for i in range(1, k)} | {s_all_low})
    lo_i, hi_i = 0, len(cands) - 1  # cost(cands[i]) is non-increasing in i
    if p.total_cost(choice_at(cands[hi_i])) > p.budget:
        scale, choice, fallback = s_all_low, p.min_cost_choice(), True
    else:
        while lo_i < hi_i:
            mid = (lo_i + hi_i) // 2
            if p.total_cost(choice_at(cands[mid])) <= p.budget:
                hi_i = mid
            else:
                lo_i = mid + 1
        scale, fallback = cands[hi_i], False
        choice = choice_at(scale)
    layer_bits = widths_at(scale)
    choice = _ensure_budget(p, choice)
    choice, filled = _fill(p, choice)
    details = {
        "aggregation": aggregation,
        "ladder": ladder,
        "scale": scale,
        "thresholds": [scale * i / k for i in range(1, k)],
        "layers": {
            key: {"informativeness": raw[j], "normalized": norm[j], "root": root[j], "bits": layer_bits[j]}
            for j, key in enumerate(keys)
        },
        "fallback_cheapest": fallback,
        "fill_moves": filled,
    }
    return _result("quantile-inform", p, choice, details)
