"""The allocation problem every method shares: input and result types, the padded option tables, and the
moves that keep a choice within budget (fill what is left, downgrade what is over, swap to close a gap).

Every method validates with :func:`_prepare`, packages with :func:`_result` and ends (except ``uniform`` and
an exact ``dp``) with :func:`_fill`; the names keep their underscore: they belong to this package, not to its
users.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Sequence

import numpy as np


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


def _layers(p: _Problem) -> tuple[list[str], np.ndarray]:
    """Layer keys in order of first appearance, and each block's layer index."""
    keys: dict[str, int] = {}
    idx = np.array([keys.setdefault(b.layer_key, len(keys)) for b in p.blocks], dtype=np.int64)
    return list(keys), idx


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
