"""Which widths the expected-loss tables score: the ones the budget can reach, widened where an allocation is
bound by them.

Why: every width of every tensor costs a full range search (most of ``optimize``'s time on a transformer), yet an
average budget of ``b`` bits per weight spends almost every block within a couple of widths of ``b``. The tables
are scored at the allowed widths in ``[floor(b) - SPAN, ceil(b) + SPAN]`` (plus 0 where allowed: a block's mean
costs nothing to design, plus each weight's ``--min-bits`` floor), and after every allocation
:func:`binding` checks each block's chosen width: where an allowed width next to it was not scored and could
have been chosen instead (one above it; one below it that could cost less), the bracket grows by ``SPAN`` widths
on that side and the tables are scored again (the designs already made come from the design cache). So the
allocation is the one the full tables give wherever the bracket did not bind (``tests/test_table_bracket.py``
compares the written bytes), at a fraction of the designs.

A width that stores in the same container as a wider one (native int4 for 1..4 bits, int8 for 5..8, not packed;
stored bits counted, a uniform-family grid) costs the same with a coarser grid: it never wins, so the wider one
stands for it (``--bits 6`` native scores 4 and 8 only). This assumes a coarser grid of the same range search
never has less error; a block stored exactly (loss 0, where every narrower width ties and the allocator takes
the narrowest) makes the tables score every width. The options that read every width in one go (``--allocator
dp``, ``quantile-inform``, ``random-bits``, measured tables of weights without gradients) score every width;
GPTQ rounding prices the scored widths (a width past the compensated ones takes the ratio of the widest of them,
scored or not, so the bracket's tables equal the full ones).
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import math
from collections.abc import Iterator, Mapping, Sequence

import onnx_ir as ir

from bq_onnx.context import Context
from bq_onnx.sizes import container_bits, storage_of

SPAN = 2
"""Widths scored on each side of the per-weight budget, and how far a binding bracket grows."""

UNIFORM_FAMILY = ("uniform", "uniform-sym", "percentile")
"""Quantizers whose stored cost at a width depends only on its container (no codebook growing with the width)."""

FULL_ONLY = ("dp", "quantile-inform", "random-bits")
"""Allocators that read every width (an exact optimum; thresholds spread over the widths; a softmax over them)."""


_EVERY_WIDTH: contextvars.ContextVar[bool] = contextvars.ContextVar("bq_onnx_every_width", default=False)


@contextlib.contextmanager
def every_width() -> Iterator[None]:
    """Tables scored at every allowed width inside (``--shared-budget`` allocates several models' tables together,
    beyond each one's bracket; tests compare with it)."""
    token = _EVERY_WIDTH.set(True)
    try:
        yield
    finally:
        _EVERY_WIDTH.reset(token)


def min_bits(ctx: Context, weight: str) -> int:
    """The floor of one weight: ``--min-bits`` patterns and the target's own floor for it."""
    found = [bits for pattern, bits in ctx.config.allocation.min_bits if fnmatch.fnmatchcase(weight, pattern)]
    return max([*found, ctx.derived.weight_floor(weight)])


def budget_bits(model: ir.Model, ctx: Context, numel: int) -> float:
    """The budget in bits for ``numel`` quantized weights: ``--bits`` each, or ``--size-mb`` less the other
    initializers (a first guess: the budget stage measures the file and corrects it)."""
    a = ctx.config.allocation
    if a.size_mb is None:
        return float(a.bits) * numel
    quantized = {w.name for w in ctx.weights}
    other = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                if v.const_value is not None and v.name not in quantized)
    return a.size_mb * 8e6 - 8 * other


def per_weight_budget(model: ir.Model, ctx: Context) -> float:
    """The budget in bits per quantized weight (``--bits``, or ``--size-mb`` less the other initializers)."""
    a = ctx.config.allocation
    if a.size_mb is None:
        return float(a.bits)
    return budget_bits(model, ctx, 0) / (sum(w.numel for w in ctx.weights) or 1)


def bracket(model: ir.Model, ctx: Context) -> tuple[int, ...] | None:
    """The widths the tables score first (sorted), or None: every allowed width (the options need them all, or the
    bracket holds them all)."""
    a = ctx.config.allocation
    allowed = tuple(sorted(a.allowed_bits))
    if a.allocator in FULL_ONLY or _EVERY_WIDTH.get():
        return None
    b = per_weight_budget(model, ctx)
    if not math.isfinite(b):
        return None
    lo, hi = math.floor(b) - SPAN, math.ceil(b) + SPAN
    inside = [w for w in allowed if lo <= w <= hi and w > 0]
    if not inside:  # a budget beyond every width: the nearest ones
        nonzero = [w for w in allowed if w > 0]
        inside = nonzero[-SPAN - 1:] if b > max(allowed) else nonzero[:SPAN + 1]
    picked = _representatives(ctx, allowed, [*inside, *(w for w in allowed if w == 0)])
    return None if picked == allowed else picked


def _representatives(ctx: Context, allowed: Sequence[int], widths: Sequence[int]) -> tuple[int, ...]:
    """``widths`` with each one that stores at the cost of a wider allowed width replaced by the widest such
    (:func:`_costs_the_same`: 5..7 bits by 8 in native int8 containers): the narrower never wins."""
    return tuple(sorted({max(v for v in allowed if v >= w and (v == w or _costs_the_same(ctx, w, v)))
                         for w in widths}))


def scored_widths(ctx: Context, allowed: Sequence[int], widths: Sequence[int] | None, floor: int
                  ) -> tuple[int, ...]:
    """One weight's scored widths: the bracket at or above its floor; where the floor is above the bracket, the
    least allowed width at or above it (the widest allowed one where the floor is above them all, as the allocator
    then keeps), or the widest of the same cost."""
    if widths is None:
        return tuple(allowed)
    kept = {w for w in widths if w >= floor}
    if floor > max(widths):
        kept.update(_representatives(ctx, allowed, [min((w for w in allowed if w >= floor), default=max(allowed))]))
    return tuple(sorted(kept))


def _costs_the_same(ctx: Context, narrower: int, wider: int) -> bool:
    """Whether ``narrower`` surely costs the tables what ``wider`` does (stored bits, not ``--bits-payload``; the
    same native container, neither packed; a uniform-family quantizer with one design per width): then, its grid
    coarser, it never wins."""
    q, d, a = ctx.config.quantization, ctx.derived, ctx.config.allocation
    if a.bits_payload and a.size_mb is None:  # the tables' cost is the grid's width itself
        return False
    if q.quantizer not in UNIFORM_FAMILY or d.group_choices or d.outliers not in (0, 0.0) or narrower <= 0 \
            or wider > 8:
        return False
    st = storage_of(ctx.config, d)
    if st.format != "native":
        return False

    def packed(w: int) -> bool:
        return st.packed and 0 < w < 4 and container_bits(w, st.int2) != w

    return not packed(narrower) and not packed(wider) and \
        container_bits(narrower, st.int2) == container_bits(wider, st.int2)


def binding(ctx: Context, allowed: Sequence[int], block_bits: Mapping[str, tuple[int, ...]],
            chosen: Mapping[str, int], floors: Mapping[str, int], exact: Mapping[str, bool],
            lower: bool = True) -> tuple[bool, bool, bool]:
    """Whether an allocation was bound by the bracket: (below, above, everywhere).

    ``block_bits``: block name -> its scored widths; ``chosen``: the allocation's width per block; ``floors``:
    block name -> its floor; ``exact``: block name -> whether its loss at the chosen width is 0. A block binds above
    where the next allowed width above its choice (or the widest of its cost) was not scored, below where the next
    cheaper one (at or above its floor; the widest of its cost) was not scored. A block stored exactly ties every
    narrower width of its cost, which the allocator prefers: it binds everywhere where any narrower was not scored.
    ``lower`` False checks above only (``uniform``: the largest width that fits, whatever lies below it)."""
    up = down = every = False
    seen: dict[tuple, tuple[bool, bool, bool]] = {}  # the answer per kind of block: thousands share a few kinds
    for name, scored in block_bits.items():
        width = chosen.get(name)
        if width is None:
            continue
        kind = (width, floors.get(name, 0), tuple(scored), bool(exact.get(name)))
        binds = seen.get(kind)
        if binds is None:
            binds = seen[kind] = _binds(ctx, allowed, *kind, lower)
        down, up, every = down or binds[0], up or binds[1], every or binds[2]
    return down, up, every


def _binds(ctx: Context, allowed: Sequence[int], width: int, floor: int, scored: tuple[int, ...], exact: bool,
           lower: bool) -> tuple[bool, bool, bool]:
    """:func:`binding` of one block: (below, above, everywhere)."""
    up = down = every = False
    above = [w for w in allowed if w > width]
    if above and _representatives(ctx, allowed, above[:1])[0] not in scored:
        up = True
    if not lower:
        return down, up, every
    below = [w for w in allowed if floor <= w < width]
    if exact and any(w not in scored for w in below):
        every = True
    cheaper = [w for w in below if not _costs_the_same(ctx, w, width)]
    if cheaper and _representatives(ctx, allowed, cheaper[-1:])[0] not in scored:
        down = True
    return down, up, every


def widen(ctx: Context, allowed: Sequence[int], widths: Sequence[int], down: bool, up: bool
          ) -> tuple[int, ...] | None:
    """``widths`` grown by :data:`SPAN` (at least one) allowed widths below its non-zero least (``down``) and above
    its largest (``up``), further while that adds no width of another cost; None where that is every width."""
    allowed = sorted(allowed)
    nonzero = [w for w in widths if w > 0]
    i = allowed.index(min(nonzero)) if nonzero else 0
    j = allowed.index(max(nonzero)) if nonzero else len(allowed) - 1
    step = max(SPAN, 1)
    while True:
        if down:
            i = max(0, i - step)
        if up:
            j = min(len(allowed) - 1, j + step)
        picked = _representatives(ctx, allowed, [*allowed[i:j + 1], *(w for w in widths if w == 0)])
        if picked != tuple(widths) or (i == 0 or not down) and (j == len(allowed) - 1 or not up):
            break
    return None if picked == tuple(allowed) else picked
