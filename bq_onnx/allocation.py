"""Bit allocation: choose one width per block so that the total stored cost meets a budget.

Plain numpy/scipy; nothing here knows about ONNX. The input is a list of :class:`Block` tables (for every allowed
width the expected loss and the stored cost), the output an :class:`Allocation`. The problem is separable: minimize
``sum_b loss_b(m_b)`` subject to ``sum_b cost_b(m_b) <= budget`` (a multiple-choice knapsack).

Methods (:func:`allocate` dispatches on the name):

* ``uniform``: one width for every block, the largest whose total cost fits: the baseline to beat.
* ``greedy`` (BayesQ, paper 004 eqs. 10-11): upgrades by expected-loss reduction per extra cost, taken along each
  block's lower convex hull so that a non-concave loss curve cannot trap it.
* ``dp``: the exact optimum by dynamic programming over a discretized cost axis (validation, small models).
* ``quantile-inform`` (paper 001 §4.2, appendix D): per-layer informativeness ``|mu|/sigma`` mapped to widths by
  evenly spaced thresholds whose scale is searched to meet the budget.
* ``random-bits`` (paper 001 §4.3, eqs. 6-13): a softmax over widths per layer, trained by gradient descent on the
  expected quantization error plus a budget penalty, alternating with learned quantization ranges.
* ``selective`` (paper 000): blocks of low importance are stored as their mean (0 bits), the rest by greedy on a
  rate-distortion objective.

Shared guarantees: the total cost never exceeds the budget; every method except ``uniform`` (a baseline by
definition) and an exact ``dp`` ends with :func:`_fill`, which spends what is left of the budget on the best
single upgrades, so the budget is used up to the granularity of the blocks (``greedy`` and ``selective`` then
run the swap search :func:`_swap_refine`, which closes most of greedy's knapsack gap on coarse blocks); identical
inputs give identical outputs, ties going to the earlier block (then the lower width). Bad input raises
:class:`ValueError`. Totals are summed with ``math.fsum`` (correctly rounded).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence

import numpy as np

METHODS: tuple[str, ...] = ("uniform", "greedy", "dp", "quantile-inform", "random-bits", "selective")

DP_MAX_CELLS = 200_000
"""Default size of the discretized cost axis of :func:`allocate_dp` when the exact (gcd) resolution needs more."""

DP_MAX_TABLE = 500_000_000
"""Cells x blocks of the default :func:`allocate_dp` table (one byte each); an explicit resolution may use 4x."""

RB_MAX_SAMPLES = 1 << 16
"""Random Bits: layers with more weights (and one range per layer) estimate ``tau`` on a seeded subsample."""


# ------------------------------------------------------------------------------------------------------------
# Public types


@dataclasses.dataclass
class Block:
    """One allocation unit: a weight tensor or a slice of its output channels."""

    name: str
    numel: int
    bits: tuple[int, ...]  # allowed widths, ascending (may include 0; a target runtime restricts this set)
    loss: np.ndarray  # expected loss at each allowed width (float64, same order as bits)
    cost: np.ndarray  # stored bits at each width (payload only, or payload + metadata), same order
    min_bits: int = 0  # honour per-layer minimum (widths below it are not allowed)
    layer: str = ""  # the tensor this block belongs to (several slices share a layer)

    @property
    def layer_key(self) -> str:
        """The layer this block belongs to, its own name when ``layer`` is empty."""
        return self.layer or self.name


@dataclasses.dataclass
class Allocation:
    method: str
    bits: dict[str, int]  # block name -> chosen width
    cost: float  # total cost (same unit as Block.cost)
    loss: float  # total expected loss of the choice
    budget: float
    details: dict  # method-specific: thresholds, iterations, etc. (JSON-serializable)


@dataclasses.dataclass
class LayerStats:
    """What Random Bits needs of one layer: its posterior (paper 001 §3.1, ``w ~ N(mu, sigma)``).

    ``mu`` is the layer's weight (any shape), ``sigma`` the posterior std (same shape, or a scalar), ``coef`` the
    per-weight coefficients ``c_j(w)`` of eq. 7 (default: the normalized informativeness ``|mu|/sigma``).
    ``block_size`` ``None`` gives one quantization range ``[alpha, beta]`` for the whole layer (the paper);
    an integer gives one range per block of ``block_size`` consecutive rows of one column of the ``(K, N)`` view
    (``mu`` reshaped to ``(shape[0], -1)``; 1-D is one column), the blocking of :mod:`bq_onnx.quantizers`.
    Random Bits only reads these arrays (no copies are kept beyond a float64 subsample).
    """

    mu: np.ndarray
    sigma: np.ndarray | float
    coef: np.ndarray | None = None
    block_size: int | None = None


# ------------------------------------------------------------------------------------------------------------
# Dispatcher


def allocate(method: str, blocks: Sequence[Block], budget: float, **options) -> Allocation:
    """Run allocator ``method`` (one of :data:`METHODS`; ``_`` and ``-`` are interchangeable)."""
    key = method.replace("_", "-").lower()
    funcs = {
        "uniform": allocate_uniform,
        "greedy": allocate_greedy,
        "dp": allocate_dp,
        "quantile-inform": allocate_quantile_inform,
        "random-bits": allocate_random_bits,
        "selective": allocate_selective,
    }
    if key not in funcs:
        raise ValueError(f"unknown allocation method {method!r}; expected one of {METHODS}")
    return funcs[key](blocks, budget, **options)


# ------------------------------------------------------------------------------------------------------------
# Problem representation


@dataclasses.dataclass
class _Problem:
    """Blocks as padded ``(n, K)`` option tables (allowed widths only, ascending; padding: width -1, inf)."""

    blocks: list[Block]
    width: np.ndarray  # (n, K) int64
    cost: np.ndarray  # (n, K) float64
    loss: np.ndarray  # (n, K) float64
    nopt: np.ndarray  # (n,) number of allowed options
    numel: np.ndarray  # (n,) int64
    budget: float
    _hulls: list[list[int]] | None = None
    _lists: tuple[list, list, list] | None = None

    @property
    def n(self) -> int:
        return len(self.blocks)

    @property
    def valid(self) -> np.ndarray:
        return self.width >= 0

    def min_cost_choice(self) -> np.ndarray:
        """Per block the cheapest option, ties to the lower loss, then the lower width."""
        cheap = self.cost == self.cost.min(axis=1, keepdims=True)
        loss = np.where(cheap, self.loss, np.inf)
        return np.argmax(cheap & (loss == loss.min(axis=1, keepdims=True)), axis=1)

    def lists(self) -> tuple[list[list[float]], list[list[float]], list[int]]:
        """``cost``, ``loss`` and ``nopt`` as Python lists (scalar access in the heap loops is 10x faster)."""
        if self._lists is None:
            self._lists = (self.cost.tolist(), self.loss.tolist(), self.nopt.tolist())
        return self._lists

    def hulls(self) -> list[list[int]]:
        """Per block its :func:`lower_hull` (computed once, reused by repeated greedy runs)."""
        if self._hulls is None:
            cost, loss, nopt = self.lists()
            self._hulls = [lower_hull(cost[b][:k], loss[b][:k]) for b, k in enumerate(nopt)]
        return self._hulls

    def nearest(self, target: np.ndarray) -> np.ndarray:
        """Per block the option whose width is nearest ``target`` (per block), ties to the lower width."""
        d = np.abs(self.width - np.asarray(target, dtype=np.float64)[:, None])
        d[~self.valid] = np.inf
        return np.argmin(d, axis=1)

    def take(self, table: np.ndarray, choice: np.ndarray) -> np.ndarray:
        return table[np.arange(self.n), choice]

    def total_cost(self, choice: np.ndarray) -> float:
        return math.fsum(self.take(self.cost, choice).tolist())

    def total_loss(self, choice: np.ndarray) -> float:
        return math.fsum(self.take(self.loss, choice).tolist())


def _prepare(blocks: Sequence[Block], budget: float) -> _Problem:
    """Validate the input and build the padded tables; raise ``ValueError`` with the culprit named."""
    if blocks is None or len(blocks) == 0:
        raise ValueError("no blocks to allocate: the block list is empty")
    try:
        budget = float(budget)
    except (TypeError, ValueError) as e:
        raise ValueError(f"budget must be a number, got {budget!r}") from e
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget}")
    names: set[str] = set()
    rows = []
    for blk in blocks:
        if not isinstance(blk, Block):
            raise ValueError(f"expected Block objects, got {type(blk).__name__}")
        who = f"block {blk.name!r}"
        if blk.name in names:
            raise ValueError(f"{who}: duplicate block name")
        names.add(blk.name)
        if isinstance(blk.numel, bool) or int(blk.numel) != blk.numel or int(blk.numel) <= 0:
            raise ValueError(f"{who}: numel must be a positive integer, got {blk.numel!r}")
        bits = np.asarray(blk.bits)
        if bits.ndim != 1 or bits.size == 0 or not np.issubdtype(bits.dtype, np.integer):
            raise ValueError(f"{who}: bits must be a non-empty sequence of integers, got {blk.bits!r}")
        if (bits < 0).any() or (np.diff(bits) <= 0).any():
            raise ValueError(f"{who}: bits must be non-negative and strictly ascending, got {tuple(blk.bits)}")
        loss = np.asarray(blk.loss, dtype=np.float64)
        cost = np.asarray(blk.cost, dtype=np.float64)
        for arr, what in ((loss, "loss"), (cost, "cost")):
            if arr.shape != bits.shape:
                raise ValueError(f"{who}: {what} has shape {arr.shape}, bits has {bits.size} entries")
            if not np.isfinite(arr).all():
                raise ValueError(f"{who}: {what} must be finite, got {arr.tolist()}")
        if (cost < 0).any():
            raise ValueError(f"{who}: negative cost {cost.tolist()}")
        if int(blk.min_bits) != blk.min_bits or blk.min_bits < 0:
            raise ValueError(f"{who}: min_bits must be a non-negative integer, got {blk.min_bits!r}")
        keep = bits >= blk.min_bits
        if not keep.any():
            raise ValueError(f"{who}: no allowed width >= min_bits={blk.min_bits} in {tuple(blk.bits)}")
        rows.append((bits[keep].astype(np.int64), cost[keep], loss[keep]))
    n, k = len(rows), max(r[0].size for r in rows)
    width = np.full((n, k), -1, dtype=np.int64)
    cost = np.full((n, k), np.inf)
    loss = np.full((n, k), np.inf)
    nopt = np.empty(n, dtype=np.int64)
    for i, (w, c, lo) in enumerate(rows):
        width[i, : w.size], cost[i, : w.size], loss[i, : w.size], nopt[i] = w, c, lo, w.size
    numel = np.array([int(b.numel) for b in blocks], dtype=np.int64)
    p = _Problem(list(blocks), width, cost, loss, nopt, numel, budget)
    cheapest = math.fsum(np.min(cost, axis=1).tolist())
    if cheapest > budget:
        raise ValueError(
            f"infeasible budget: {budget:g} is below {cheapest:g}, the cost of the cheapest allowed width of every "
            f"block ({n} blocks, {int(numel.sum())} weights)"
        )
    return p


def _result(method: str, p: _Problem, choice: np.ndarray, details: dict) -> Allocation:
    """Package a choice; a float-rounding overshoot of the budget (non-integer costs) is repaired first."""
    if p.total_cost(choice) > p.budget:
        choice = _ensure_budget(p, choice)
    bits = {blk.name: int(p.width[i, choice[i]]) for i, blk in enumerate(p.blocks)}
    cost = p.total_cost(choice)
    total = int(p.numel.sum())
    details = dict(details)
    details.setdefault("cost_per_weight", cost / total)
    return Allocation(method, bits, cost, p.total_loss(choice), p.budget, _jsonable(details))


def _jsonable(x):
    """Recursively turn numpy scalars/arrays into plain Python (floats stay floats, ints ints)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ------------------------------------------------------------------------------------------------------------
# Shared moves: fill (spend what is left) and ensure (get under the budget)


def _fill(
    p: _Problem, choice: np.ndarray, frozen: np.ndarray | None = None, min_ratio: float = 0.0
) -> tuple[np.ndarray, int]:
    """Spend the remaining budget: while an upgrade fits, take the one with the best loss reduction per extra cost.

    Every costlier width of a block is a candidate (not only the next one or the hull), so the budget is used up
    to the granularity of the blocks. Upgrades must not raise the loss (``dloss >= min_ratio * dcost``; with a
    rate weight ``min_ratio > 0`` only those that improve ``loss + min_ratio * cost``). A block first moves to a
    width that is no costlier and strictly better when one exists (a dominated choice is never kept). The
    remaining budget only shrinks, so a candidate that does not fit now never will: one heap pass, lazily
    invalidated per block. Returns the new choice and the number of moves.
    """
    choice = choice.copy()
    movable = np.ones(p.n, dtype=bool) if frozen is None else ~frozen
    moves = 0
    # Dominance clean-up: best loss among options no costlier than the current one.
    cur_c, cur_l = p.take(p.cost, choice), p.take(p.loss, choice)
    ok = p.valid & (p.cost <= cur_c[:, None])
    masked = np.where(ok, p.loss, np.inf)
    best = np.argmin(masked, axis=1)
    better = movable & (masked[np.arange(p.n), best] < cur_l)
    moves += int(better.sum())
    choice[better] = best[better]
    total = p.total_cost(choice)
    cost, loss, nopt = p.lists()
    cur = choice.tolist()
    heap: list[tuple[float, int, int, int]] = []
    version = [0] * p.n

    def push(b: int) -> None:
        c0, l0 = cost[b][cur[b]], loss[b][cur[b]]
        for o in range(nopt[b]):
            dc, dl = cost[b][o] - c0, l0 - loss[b][o]
            if dc > 0 and (dl >= 0 if min_ratio == 0.0 else dl > min_ratio * dc):
                heapq.heappush(heap, (-dl / dc, b, o, version[b]))

    for b in np.flatnonzero(movable).tolist():
        push(b)
    while heap:
        _, b, o, ver = heapq.heappop(heap)
        if ver != version[b]:
            continue
        dc = cost[b][o] - cost[b][cur[b]]
        if total + dc > p.budget:
            continue
        total += dc
        cur[b] = o
        version[b] += 1
        moves += 1
        push(b)
    choice = np.array(cur, dtype=np.int64)
    return choice, moves


def _swap_refine(
    p: _Problem, choice: np.ndarray, frozen: np.ndarray | None = None, rounds: int = 100, candidates: int = 16
) -> tuple[np.ndarray, int]:
    """Local search after greedy + fill: afford a stalled upgrade by downgrading other blocks when that pays.

    Greedy stops a block whose next step costs more than is left, even when that step is worth far more than a
    few cheap downgrades elsewhere (coarse blocks: a 256-weight tensor stuck at 2 bits while small ones sit at 7).
    Each round takes the ``candidates`` blocks whose best loss-per-cost upgrade does not fit; for each, it frees
    the missing cost with the downgrades of other blocks that add the least loss per cost saved (all moves of
    the current state in one sorted list; a block may go down several widths), and the swap with the largest
    net loss reduction is applied if positive, then :func:`_fill` spends any overshoot. At most ``rounds``
    rounds, each ``O(n K log(n K))``; every accepted round strictly lowers the loss. Returns the choice and the
    number of swaps.
    """
    choice = choice.copy()
    movable = np.ones(p.n, dtype=bool) if frozen is None else ~frozen
    rows = np.arange(p.n)
    cost, loss, _ = p.lists()
    swaps = 0
    for _ in range(rounds):
        remaining = p.budget - p.total_cost(choice)
        cur_c, cur_l = p.take(p.cost, choice), p.take(p.loss, choice)
        dc = p.cost - cur_c[:, None]
        dl = cur_l[:, None] - p.loss  # loss saved by moving there
        ok = p.valid & movable[:, None]
        up = ok & (dc > remaining) & (dl > 0)
        r_up = np.where(up, dl / np.where(up, dc, 1.0), -np.inf)
        best_up = np.argmax(r_up, axis=1)
        cand = np.flatnonzero(r_up[rows, best_up] > -np.inf)
        down = ok & (dc < 0)
        if cand.size == 0 or not down.any():
            break
        db, do = np.nonzero(down)
        m_saved, m_added = -dc[db, do], -dl[db, do]
        order = np.lexsort((-do, db, m_added / m_saved))  # least loss per cost saved; ties: block order, deeper
        moves = list(zip(db[order].tolist(), do[order].tolist()))
        top = cand[np.lexsort((cand, -r_up[cand, best_up[cand]]))][:candidates]
        cur = choice.tolist()
        best: tuple[float, int, dict[int, int]] = (0.0, -1, {})
        for b in top.tolist():
            o = int(best_up[b])
            need = dc[b, o] - remaining
            gain = dl[b, o]
            sim: dict[int, int] = {}
            freed = added = 0.0
            untouched = db != b
            for bb, oo in [*moves, (-1, -1)]:
                # Close the gap with one move of an untouched block (the knapsack fix of a ratio-ordered walk).
                fits = untouched & (m_saved >= need - freed)
                if fits.any():
                    i = int(np.argmin(np.where(fits, m_added, np.inf)))
                    net = gain - added - m_added[i]
                    if net > best[0]:
                        best = (float(net), b, {**sim, int(db[i]): int(do[i])})
                if bb < 0 or bb == b:
                    continue
                now = sim.get(bb, cur[bb])
                if cost[bb][oo] >= cost[bb][now]:
                    continue
                freed += cost[bb][now] - cost[bb][oo]
                added += loss[bb][oo] - loss[bb][now]
                sim[bb] = oo
                untouched &= db != bb
                if freed >= need:
                    if gain - added > best[0]:
                        best = (float(gain - added), b, dict(sim))
                    break
                if added >= gain:
                    break
        if best[1] < 0:
            break
        _, b, sim = best
        for bb, oo in sim.items():
            choice[bb] = oo
        choice[b] = best_up[b]
        if p.total_cost(choice) > p.budget:  # float rounding of the running sums
            choice = _ensure_budget(p, choice)
        choice, _ = _fill(p, choice, frozen)
        swaps += 1
    return choice, swaps


def _ensure_budget(p: _Problem, choice: np.ndarray) -> np.ndarray:
    """Downgrade until the budget holds, each time taking the downgrade with the least loss added per cost saved."""
    choice = choice.copy()
    total = p.total_cost(choice)
    if total <= p.budget:
        return choice
    cost, loss, nopt = p.lists()
    cur = choice.tolist()
    heap: list[tuple[float, int, int, int]] = []
    version = [0] * p.n

    def push(b: int) -> None:
        c0, l0 = cost[b][cur[b]], loss[b][cur[b]]
        for o in range(nopt[b]):
            saved = c0 - cost[b][o]
            if saved > 0:
                heapq.heappush(heap, ((loss[b][o] - l0) / saved, b, o, version[b]))

    for b in range(p.n):
        push(b)
    while total > p.budget and heap:
        _, b, o, ver = heapq.heappop(heap)
        if ver != version[b]:
            continue
        total -= cost[b][cur[b]] - cost[b][o]
        cur[b] = o
        version[b] += 1
        push(b)
        if total <= p.budget:
            total = p.total_cost(np.array(cur, dtype=np.int64))  # exact re-sum before trusting the running total
    choice = np.array(cur, dtype=np.int64)
    if total > p.budget:  # only float drift can leave us here: fall back to the cheapest widths
        choice = p.min_cost_choice()
    return choice


# ------------------------------------------------------------------------------------------------------------
# uniform


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


# ------------------------------------------------------------------------------------------------------------
# greedy (BayesQ)


def lower_hull(cost: Sequence[float], loss: Sequence[float]) -> list[int]:
    """Indices of the lower convex hull of the points ``(cost, loss)``, from the cheapest point to the best.

    Dominated points (no cheaper, not better) are dropped, then points above the chord of their neighbours
    (collinear points are kept, so equal-ratio steps stay small). Along the result, the loss reduction per extra
    cost strictly decreases or stays equal: a greedy that walks it takes the best step first. The first index is
    the cheapest point (ties: lower loss, then lower index).
    """
    cost = [float(c) for c in cost]
    loss = [float(v) for v in loss]
    order = sorted(range(len(cost)), key=lambda i: (cost[i], loss[i], i))
    pareto: list[int] = []
    for i in order:
        if not pareto or loss[i] < loss[pareto[-1]]:
            pareto.append(i)
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # pop b if the step a->b saves less per cost than b->i (b lies above the chord a-i)
            if (loss[a] - loss[b]) * (cost[i] - cost[b]) < (loss[b] - loss[i]) * (cost[b] - cost[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


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


# ------------------------------------------------------------------------------------------------------------
# dp (exact oracle)


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
            res = span / (max_cells - 1) if span > 0 else 1.0  # span 0: only the cheapest widths fit anyway
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


# ------------------------------------------------------------------------------------------------------------
# quantile-inform (paper 001 §4.2)


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


def _layers(p: _Problem) -> tuple[list[str], np.ndarray]:
    """Layer keys in order of first appearance, and each block's layer index."""
    keys: dict[str, int] = {}
    idx = np.array([keys.setdefault(b.layer_key, len(keys)) for b in p.blocks], dtype=np.int64)
    return list(keys), idx


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


# ------------------------------------------------------------------------------------------------------------
# random-bits (paper 001 §4.3)


@dataclasses.dataclass
class _RBData:
    """All layers' (sampled) weights as flat arrays, with their range group and layer."""

    mu: np.ndarray
    cw: np.ndarray  # c_j(w) / sigma_w^2, the weight of a squared error in tau (eq. 7)
    gid: np.ndarray  # range group of each element
    lid: np.ndarray  # layer of each element
    glayer: np.ndarray  # layer of each group
    gshape: list[tuple[int, ...]]  # per layer: () for one range, (nb, N) for blocked ranges
    gstart: np.ndarray  # first group of each layer
    mean0: np.ndarray  # per group: the 0-bit value (c/sigma^2-weighted mean)
    init: np.ndarray  # (4, groups): min, max, 5th and 95th percentile of each group's weights (all of them)

    @property
    def groups(self) -> int:
        return self.glayer.size


def _rb_data(keys: list[str], layers: Mapping[str, LayerStats], max_samples: int, seed: int) -> _RBData:
    mus, ivs, cs, gids, lids, glayer, gshape, gstart, inits = [], [], [], [], [], [], [], [], []
    ngroups = 0
    for j, key in enumerate(keys):
        st = layers[key]
        if not isinstance(st, LayerStats):
            raise ValueError(f"random-bits: layers[{key!r}] must be a LayerStats, got {type(st).__name__}")
        mu = np.asarray(st.mu, dtype=np.float64)
        if mu.size == 0 or not np.isfinite(mu).all():
            raise ValueError(f"random-bits: layer {key!r}: mu must be non-empty and finite")
        try:
            sigma = np.broadcast_to(np.asarray(st.sigma, dtype=np.float64), mu.shape)
        except ValueError as e:
            raise ValueError(f"random-bits: layer {key!r}: sigma does not match mu's shape {mu.shape}") from e
        with np.errstate(over="ignore", divide="ignore"):
            ok = np.isfinite(sigma).all() and (sigma > 0).all() and np.isfinite(1.0 / sigma**2).all()
        if not ok:
            raise ValueError(f"random-bits: layer {key!r}: sigma must be finite and positive (1/sigma^2 finite)")
        if st.coef is None:
            c = np.abs(mu) / sigma
        else:
            c = np.asarray(st.coef, dtype=np.float64)
            if c.shape != mu.shape or not np.isfinite(c).all() or (c < 0).any():
                raise ValueError(f"random-bits: layer {key!r}: coef must be finite, >= 0 and shaped like mu")
        rng = np.random.default_rng([seed, j])
        flat = np.arange(mu.size)
        if st.block_size is None:  # one range: a random subset of the weights
            shape: tuple[int, ...] = ()
            ng = 1
            if mu.size > max_samples:
                flat = np.sort(rng.choice(mu.size, size=max_samples, replace=False))
            g = np.zeros(flat.size, dtype=np.int64)
            inits.append(np.percentile(mu.ravel(), [0.0, 100.0, 5.0, 95.0])[:, None])
        else:  # one range per block: a random subset of the columns, whole blocks
            bs = int(st.block_size)
            if bs <= 0:
                raise ValueError(f"random-bits: layer {key!r}: block_size must be positive, got {st.block_size}")
            rows = mu.shape[0] if mu.ndim >= 1 else 1
            cols = mu.size // rows
            shape = (-(-rows // bs), cols)
            ng = shape[0] * cols
            if mu.size > max_samples:
                keep = np.sort(rng.choice(cols, size=max(1, max_samples // rows), replace=False))
                flat = (np.arange(rows)[:, None] * cols + keep[None, :]).ravel()
            r, col = np.divmod(flat, cols)
            g = (r // bs) * cols + col
            inits.append(_block_percentiles(mu.reshape(rows, cols), bs, (0.0, 100.0, 5.0, 95.0)))
        cj = c.ravel()[flat]
        tot = cj.sum()
        cj = cj / tot if tot > 0 else np.full(cj.size, 1.0 / cj.size)
        mus.append(mu.ravel()[flat])
        ivs.append(1.0 / sigma.ravel()[flat] ** 2)
        cs.append(cj)
        gids.append(g + ngroups)
        lids.append(np.full(flat.size, j, dtype=np.int64))
        glayer.append(np.full(ng, j, dtype=np.int64))
        gshape.append(shape)
        gstart.append(ngroups)
        ngroups += ng
    cw = np.concatenate(cs) * np.concatenate(ivs)
    mu_all, gid_all = np.concatenate(mus), np.concatenate(gids)
    den = np.bincount(gid_all, cw, ngroups)
    num = np.bincount(gid_all, cw * mu_all, ngroups)
    plain = np.bincount(gid_all, mu_all, ngroups) / np.maximum(np.bincount(gid_all, None, ngroups), 1)
    mean0 = np.where(den > 0, num / np.where(den > 0, den, 1.0), plain)
    d = _RBData(
        mu_all,
        cw,
        gid_all,
        np.concatenate(lids),
        np.concatenate(glayer),
        gshape,
        np.array(gstart, dtype=np.int64),
        mean0,
        np.concatenate(inits, axis=1),
    )
    return d


def _block_percentiles(x: np.ndarray, block_size: int, qs: Sequence[float]) -> np.ndarray:
    """``(len(qs), nb * N)``: percentiles (``np.percentile``'s linear interpolation) of every block of ``block_size``
    rows of each column of ``x`` ``(K, N)``, blocks in ``(block_row, column)`` order; the last block may be short."""
    rows, cols = x.shape
    nb = -(-rows // block_size)
    pad = nb * block_size - rows
    if pad:
        x = np.concatenate([x, np.full((pad, cols), np.nan)])
    v = np.sort(x.reshape(nb, block_size, cols), axis=1)  # NaN padding sorts last
    counts = np.full(nb, block_size)
    counts[-1] -= pad
    out = np.empty((len(qs), nb, cols))
    for i, q in enumerate(qs):
        pos = q / 100.0 * (counts - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, counts - 1)
        frac = (pos - lo)[:, None]
        at_lo = np.take_along_axis(v, lo[:, None, None], axis=1)[:, 0]
        at_hi = np.take_along_axis(v, hi[:, None, None], axis=1)[:, 0]
        out[i] = at_lo * (1 - frac) + at_hi * frac
    return out.reshape(len(qs), nb * cols)


def _rb_errors(d: _RBData, alpha: np.ndarray, beta: np.ndarray, gbits: np.ndarray) -> np.ndarray:
    """Per element ``c * (Q(mu, b) - mu)^2 / sigma^2``, ``b = gbits`` of its group (paper 001 §3.2 quantizer).

    ``Q(mu, b) = alpha + s * clamp(round((mu - alpha) / s), 0, 2^b - 1)``, ``s = (beta - alpha) / (2^b - 1)``;
    ``b = 0`` decodes to the group's ``c/sigma^2``-weighted mean (the 0-bit "mean" storage); ``s = 0`` to alpha.
    """
    lev = np.exp2(gbits.astype(np.float64)) - 1.0
    step = np.where(lev > 0, (beta - alpha) / np.maximum(lev, 1.0), 0.0)
    inv = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    a = alpha[d.gid]
    z = d.mu - a
    z *= inv[d.gid]
    np.rint(z, out=z)
    np.clip(z, 0.0, lev[d.gid] if lev.min() != lev.max() else float(lev[0]), out=z)
    z *= step[d.gid]
    z += a
    zero = gbits == 0
    if zero.any():
        np.copyto(z, d.mean0[d.gid], where=zero[d.gid])
    z -= d.mu
    z *= z
    z *= d.cw
    return z


def _rb_tau(d: _RBData, alpha: np.ndarray, beta: np.ndarray, widths: np.ndarray, nlayers: int) -> np.ndarray:
    """``tau[j, i]`` of eq. 7 for every layer ``j`` and width ``widths[i]``."""
    tau = np.empty((nlayers, widths.size))
    for i, w in enumerate(widths):
        e = _rb_errors(d, alpha, beta, np.full(d.groups, w, dtype=np.int64))
        tau[:, i] = np.bincount(d.lid, e, nlayers)
    return tau


def _rb_update_ranges(
    d: _RBData, alpha: np.ndarray, beta: np.ndarray, layer_bits: np.ndarray, iters: int, step: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Eq. 13 updates of ``[alpha, beta]`` at the current widths ``b_hat`` (second loss ``T``, eq. 12).

    Eq. 13 gives ``dT/dbeta = 2 T_g / (beta - alpha) = -dT/dalpha`` (straight-through, clipping ignored): its
    direction is always a symmetric shrink of the range, its size depends on the units of ``mu``. We move along
    that direction by a fraction ``step`` of the range, halved up to 3 times until the group's exact ``T``
    decreases; a step that never decreases it is rejected (the approximation ignores clipping, so blind steps
    would shrink ranges forever). Returns the new ranges and the number of accepted group steps.
    """
    alpha, beta = alpha.copy(), beta.copy()
    gbits = layer_bits[d.glayer]
    active = (gbits > 0) & (beta > alpha)
    accepted = 0
    t_now = np.bincount(d.gid, _rb_errors(d, alpha, beta, gbits), d.groups)
    for _ in range(iters):
        frac = np.where(active & (t_now > 0), step, 0.0)
        pending = frac > 0
        for _ in range(4):
            if not pending.any():
                break
            half = 0.5 * frac * (beta - alpha)
            na, nb = np.where(pending, alpha + half, alpha), np.where(pending, beta - half, beta)
            t_new = np.bincount(d.gid, _rb_errors(d, na, nb, gbits), d.groups)
            ok = pending & (t_new < t_now)
            alpha[ok], beta[ok], t_now[ok] = na[ok], nb[ok], t_new[ok]
            accepted += int(ok.sum())
            pending &= ~ok
            frac = frac * 0.5
        active &= beta > alpha
    return alpha, beta, accepted


def allocate_random_bits(
    blocks: Sequence[Block],
    budget: float,
    layers: Mapping[str, LayerStats],
    *,
    eta: float = 3e3,
    steps: int = 500,
    lr: float = 0.2,
    seed: int = 0,
    init: str = "minmax",
    final: str = "expectation",
    gradient: str = "natural",
    range_every: int | None = None,
    range_iters: int = 2,
    range_step: float = 0.05,
    normalize: bool = True,
    max_samples: int = RB_MAX_SAMPLES,
) -> Allocation:
    """Random Bits (paper 001 §4.3): learn a distribution over widths per layer, then round it.

    Per layer ``j`` (``layers`` keyed like :func:`allocate_quantile_inform`) a softmax over the layer's allowed
    widths (logits ``Phi``, eq. 4) and the loss of eq. 9, ``sum_ji tau_ji P_ji + eta * (E[b_mean] - gamma)^2``
    with ``gamma = budget / total numel``. ``tau`` is eq. 7 with the uniform quantizer of §3.2 on the layer's (or
    block's) ``[alpha, beta]`` (:func:`_rb_errors`; the plain paper quantizer, not :mod:`bq_onnx.quantizers`,
    because the ranges are what it learns). ``E[b_mean]`` is ``E[cost] / numel`` from the blocks' cost tables
    (eq. 8 exactly when cost = numel * bits). With ``normalize``, ``tau`` is divided by the median of its initial
    entries so that ``eta`` is scale-free. Gradients of eq. 9 are analytic (appendix F.1): ``dL/dP_ji = tau_ji +
    2 eta (E[b_mean] - gamma) cost_ji / numel`` and ``dL/dPhi = P * (dL/dP - <P, dL/dP>)``. With
    ``gradient="natural"`` (default) the step uses the centred ``dL/dP`` instead, i.e. the ``Phi``-gradient
    preconditioned by the softmax's Fisher: the plain one vanishes where a probability saturates and leaves a
    layer stuck at a poor width (``"plain"`` keeps it); either way Adam (learning rate ``lr``) sizes the steps,
    since ``tau`` spans decades. ``Phi`` starts at 0 (uniform probabilities). Every ``range_every`` steps
    (default ``steps // 20``) the widths ``b_hat`` (eq. 10: rounded expectation, ``final="expectation"``, or
    ``final="argmax"``) give ``b_mean``; if it is below ``gamma`` the ranges take ``range_iters`` eq. 13 steps
    (:func:`_rb_update_ranges`) and ``tau`` is recomputed. Ranges start at min/max (``init="minmax"``, default:
    eq. 13 only ever shrinks a range, so it needs room) or the 5th/95th percentiles (``"percentile"``, §3.2).
    Layers over ``max_samples`` weights estimate ``tau`` and learn ranges on a subsample seeded by ``(seed, layer
    index)``: random weights with one range per layer, random columns (whole blocks) with ``block_size``, whose
    other blocks keep their initial ranges; initial ranges always come from all the weights. Finally blocks take
    the nearest allowed width to their layer's ``b_hat``; if over budget, the downgrades with the least loss added
    per cost saved are applied; then :func:`_fill`. Cost: about 20 refreshes of ``tau`` and the ranges, each
    ``~(widths + 10)`` passes over the sampled weights.
    ``details["layers"][key]`` holds ``bits`` (``b_hat``), ``probabilities``, ``tau`` and the learned ``alpha``
    / ``beta`` (floats, or ``(nb, N)`` nested lists with ``block_size``).
    """
    p = _prepare(blocks, budget)
    if init not in ("minmax", "percentile"):
        raise ValueError(f"init must be 'minmax' or 'percentile', got {init!r}")
    if final not in ("expectation", "argmax"):
        raise ValueError(f"final must be 'expectation' or 'argmax', got {final!r}")
    if gradient not in ("natural", "plain"):
        raise ValueError(f"gradient must be 'natural' or 'plain', got {gradient!r}")
    if range_every is None:
        range_every = max(1, steps // 20)
    if steps < 0 or range_every <= 0 or range_iters < 0 or max_samples <= 0 or not (0 < range_step < 1):
        raise ValueError("need steps >= 0, range_every > 0, range_iters >= 0, max_samples > 0, 0 < range_step < 1")
    keys, lidx = _layers(p)
    missing = [k for k in keys if k not in layers]
    if missing:
        raise ValueError(f"random-bits: no LayerStats for layer(s) {missing[:5]}")
    nl = len(keys)
    widths = np.unique(p.width[p.valid])
    # mask[j, i]: width i is allowed for some block of layer j; cost_tab[j, i]: the layer's cost at that width.
    mask = np.zeros((nl, widths.size), dtype=bool)
    cost_tab = np.zeros((nl, widths.size))
    for i, w in enumerate(widths):
        has = (p.valid & (p.width == w)).any(axis=1)
        np.logical_or.at(mask[:, i], lidx, has)
        cost_tab[:, i] = np.bincount(lidx, p.take(p.cost, p.nearest(np.full(p.n, w))), nl)
    total_numel = float(p.numel.sum())
    gamma = p.budget / total_numel

    d = _rb_data(keys, layers, max_samples, seed)
    alpha, beta, p5, p95 = (row.copy() for row in d.init)
    if init == "percentile":  # a degenerate percentile range keeps min/max
        keep = p95 > p5
        alpha, beta = np.where(keep, p5, alpha), np.where(keep, p95, beta)
    tau = _rb_tau(d, alpha, beta, widths, nl)
    valid_tau = tau[mask]
    scale = float(np.median(valid_tau)) if normalize else 1.0
    if not (scale > 0 and math.isfinite(scale)):
        scale = float(valid_tau.mean()) if valid_tau.mean() > 0 else 1.0

    phi = np.zeros((nl, widths.size))
    m1, m2 = np.zeros_like(phi), np.zeros_like(phi)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def probs(ph: np.ndarray) -> np.ndarray:
        z = np.where(mask, ph, -np.inf)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def layer_widths(pr: np.ndarray) -> np.ndarray:
        if final == "argmax":
            return widths[np.argmax(pr, axis=1)]
        target = np.rint(pr @ widths)
        dist = np.where(mask, np.abs(widths[None, :] - target[:, None]), np.inf)
        return widths[np.argmin(dist, axis=1)]

    def objective(pr: np.ndarray) -> tuple[float, float]:
        e_bmean = float((pr * cost_tab).sum() / total_numel)
        return float((np.where(mask, tau / scale, 0.0) * pr).sum() + eta * (e_bmean - gamma) ** 2), e_bmean

    range_updates = range_steps = 0
    for t in range(1, steps + 1):
        pr = probs(phi)
        e_bmean = float((pr * cost_tab).sum() / total_numel)
        g_p = np.where(mask, tau / scale + 2.0 * eta * (e_bmean - gamma) * cost_tab / total_numel, 0.0)
        centred = np.where(mask, g_p - (pr * g_p).sum(axis=1, keepdims=True), 0.0)
        grad = centred if gradient == "natural" else pr * centred
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        phi = phi - lr * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
        if range_iters and t % range_every == 0:
            bhat = layer_widths(probs(phi))
            b_mean = float(cost_tab[np.arange(nl), np.searchsorted(widths, bhat)].sum() / total_numel)
            if b_mean < gamma:
                alpha, beta, acc = _rb_update_ranges(d, alpha, beta, bhat, range_iters, range_step)
                range_updates += 1
                range_steps += acc
                if acc:
                    tau = _rb_tau(d, alpha, beta, widths, nl)
    pr = probs(phi)
    bhat = layer_widths(pr)
    loss_val, e_bmean = objective(pr)
    choice = p.nearest(bhat[lidx])
    over = p.total_cost(choice) > p.budget
    choice = _ensure_budget(p, choice)
    choice, filled = _fill(p, choice)

    def ranges(j: int) -> dict:
        g0, shape = int(d.gstart[j]), d.gshape[j]
        if shape == ():
            return {"alpha": float(alpha[g0]), "beta": float(beta[g0])}
        ng = int(np.prod(shape))
        return {"alpha": alpha[g0 : g0 + ng].reshape(shape), "beta": beta[g0 : g0 + ng].reshape(shape)}

    details = {
        "gamma": gamma,
        "eta": eta,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "init": init,
        "final": final,
        "gradient": gradient,
        "range_every": range_every,
        "tau_scale": scale,
        "objective": loss_val,
        "expected_bits_per_weight": e_bmean,
        "range_updates": range_updates,
        "range_steps_accepted": range_steps,
        "widths": widths,
        "layers": {
            key: {
                "bits": bhat[j],
                "probabilities": {int(w): float(pr[j, i]) for i, w in enumerate(widths) if mask[j, i]},
                "tau": {int(w): float(tau[j, i]) for i, w in enumerate(widths) if mask[j, i]},
                **ranges(j),
            }
            for j, key in enumerate(keys)
        },
        "downgraded": over,
        "fill_moves": filled,
    }
    return _result("random-bits", p, choice, details)


# ------------------------------------------------------------------------------------------------------------
# selective (paper 000)


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
