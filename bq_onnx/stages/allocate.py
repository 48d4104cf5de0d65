"""Spend the bit budget: choose a width per block from the expected-loss tables; returns the allocation.

The budget is average stored bits per quantized weight (``--bits``: codes as the format stores them, metadata
included; payload bits alone with ``--bits-payload``), or a file size (``--size-mb``: every byte of the written
file counts). The allocator is one of :mod:`bq_onnx.allocation`'s; what it needs beyond the tables comes
from the posterior (informativeness |mu|/sigma for Quantile Inform, mean and sigma for Random Bits, Fisher
information over variance for selective encoding).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx import allocation
from bq_onnx.allocation import Allocation
from bq_onnx.context import Context
from bq_onnx.decode.functions import vector_layout
from bq_onnx.decode.ops import layout_vector
from bq_onnx.errors import UnsupportedError, UsageError
from bq_onnx.heads import head_weights
from bq_onnx.stages import bracket
from bq_onnx.stages.tables import Tables

FILLED_UNIFORM = "uniform-filled"
"""The method the guard writes when it cannot measure the allocation: ``uniform`` with ``fill`` (whole layers
raised while the budget allows; :mod:`bq_onnx.allocation.uniform`). Plain uniform under a stored budget between
two container widths (``--bits 4`` on onnxruntime: int4 plus scales 4.6 bits, int2 2.6) is int2 everywhere."""


_min_bits = bracket.min_bits


def allocation_blocks(ctx: Context, tables: Tables, floors: bool = True) -> list[allocation.Block]:
    """The allocator's blocks: each table's widths at or above its floor (``--min-bits``, the tensor's own floor,
    and with ``floors`` the context's: heads and the guard's repairs)."""
    blocks = []
    pinned = ctx.unpriced if floors and ctx.posterior is not None else set()
    for t in tables.blocks:
        floor = max(_min_bits(ctx, t.weight), ctx.floors.get(t.name, 0) if floors else 0)
        keep = [i for i, b in enumerate(t.bits) if b >= floor]
        if t.weight in pinned and t.name in ctx.floors:  # unpriced: the uniform width, neither less nor more
            keep = keep[:1]
        if not keep:
            keep = [len(t.bits) - 1]  # a floor above every allowed width: the widest there is
            if _min_bits(ctx, t.weight) > t.bits[-1]:
                raise UsageError(f"--min-bits {floor} for '{t.weight}' leaves no allowed width")
        blocks.append(
            allocation.Block(t.name, t.numel, tuple(t.bits[i] for i in keep), t.loss[keep], t.cost[keep],
                             min_bits=t.bits[keep[0]], layer=t.weight)
        )
    return blocks


def budget_bits(model: ir.Model, ctx: Context, tables: Tables, reserve: float = 0.0) -> float:
    """The budget the allocator spends, in the tables' cost unit, less ``reserve``."""
    return _budget(model, ctx, tables) - reserve


def head_floors(model: ir.Model, ctx: Context, tables: Tables, budget: float | None = None) -> dict[str, int]:
    """Block name -> least width for the blocks of head weights (:func:`bq_onnx.heads.head_weights`): the width
    the uniform allocation of the same blocks and budget gives each (``budget``: the allocator's budget in the
    tables' unit, where the budget stage measured what the rewrite adds beyond the tables; default the whole).
    Why: a head's rows that calibration seldom exercises look free in the tables, yet storing them coarsely
    destroys the output (DESIGN.md, Heads).
    Records the heads on ``ctx.heads`` and a note on ``ctx.messages`` (and ``ctx.head_notes``); none where uniform
    itself fails (the budget stage refuses that budget) or gives 0 bits (nothing to keep)."""
    ctx.heads = head_weights(model, ctx.weights)
    kept = ctx.heads | (ctx.unpriced if ctx.posterior is not None else set())
    if not kept:
        return {}
    while True:
        blocks = allocation_blocks(ctx, tables, floors=False)
        try:
            uniform = allocation.allocate("uniform", blocks,
                                          budget_bits(model, ctx, tables) if budget is None else budget)
        except ValueError:
            lower = bracket.widen(ctx, ctx.config.allocation.allowed_bits, tables.widths, True, False) \
                if tables.widths is not None else False
            if lower == tables.widths or lower is False:
                return {}
            tables.widen(lower)  # a narrower width left out of the bracket may fit
            continue
        wider = _binding(ctx, tables, uniform.bits, floors=False, lower=False)
        if wider is False:
            break
        tables.widen(wider)
    floors = {t.name: uniform.bits[t.name] for t in tables.blocks
              if t.weight in kept and uniform.bits.get(t.name, 0) > 0}
    floored = sorted({t.weight for t in tables.blocks if t.name in floors})
    heads = [w for w in floored if w in ctx.heads and w not in ctx.unpriced]
    unpriced = [w for w in floored if w in ctx.unpriced]
    width = uniform.details["width"] if floors else None
    notes = []
    if heads:
        notes.append(
            f"{len(heads)} head weight{'s' if len(heads) > 1 else ''} feeding a graph output directly "
            f"({', '.join(heads[:3])}{', ...' if len(heads) > 3 else ''}) kept at >= "
            f"{width} bits, the width a uniform allocation of this budget gives them")
    if unpriced:
        notes.append(
            f"{len(unpriced)} weight{'s' if len(unpriced) > 1 else ''} whose effect the calibration data cannot "
            f"measure (no gradient, inside a subgraph: e.g. an If branch the data never take; "
            f"{', '.join(unpriced[:2])}{', ...' if len(unpriced) > 2 else ''}) kept at {width} bits, the width "
            f"a uniform allocation of this budget gives them: the budget moves only between weights it can price")
    ctx.messages += notes
    ctx.head_notes = notes
    return floors


def allocate_bits(model: ir.Model, ctx: Context, tables: Tables, reserve: float = 0.0,
                  method: str | None = None) -> Allocation:
    """A width per block of ``tables`` (``ctx.tables``) under the budget (``--bits``, ``--bits-payload``,
    ``--size-mb``) less ``reserve`` bits (what the rewrite stored beyond the tables, :mod:`bq_onnx.stages.budget`),
    by ``method`` (default ``--allocator``; the guard asks for ``uniform``, and where it cannot measure for
    :data:`FILLED_UNIFORM`).
    A budget below the cheapest allocation gives the cheapest: the budget stage then refuses it with its size."""
    while True:
        result, tried = _allocate(model, ctx, tables, reserve, method)
        uniform = (method or ctx.config.allocation.allocator) in ("uniform", FILLED_UNIFORM)
        # uniform: the largest width that fits, whatever lies below, unless even the cheapest did not fit;
        # every allocation the layout loop tried is checked: its cost steers the next (and the budget stage's
        # reserve), so one bound by the bracket would leave the full tables' path
        lower = not uniform or bool(result.details.get("at_cheapest"))
        wider = _widest([_binding(ctx, tables, bits, floors=not uniform, lower=lower) for bits in tried])
        if wider is False:
            return result
        tables.widen(wider)


def _widest(requests: list[tuple[int, ...] | None | bool]) -> tuple[int, ...] | None | bool:
    """The union of the wider brackets asked for (None: every width), or False where none binds."""
    asked = [r for r in requests if r is not False]
    if not asked:
        return False
    if any(r is None for r in asked):
        return None
    return tuple(sorted(set().union(*asked)))


def _binding(ctx: Context, tables: Tables, bits: dict[str, int], floors: bool, lower: bool
             ) -> tuple[int, ...] | None | bool:
    """The wider bracket the allocation ``bits`` of ``tables`` asks for (:func:`bracket.binding`; None: every
    allowed width), or False: the bracket did not bind."""
    if tables.widths is None:
        return False
    floor = {t.name: max(_min_bits(ctx, t.weight), ctx.floors.get(t.name, 0) if floors else 0)
             for t in tables.blocks}
    exact = {t.name: bits.get(t.name) in t.bits and t.loss[t.bits.index(bits[t.name])] == 0 for t in tables.blocks}
    allowed = sorted(ctx.config.allocation.allowed_bits)
    down, up, every = bracket.binding(ctx, allowed, {t.name: t.bits for t in tables.blocks}, bits, floor, exact,
                                      lower)
    if every:
        return None
    wider = bracket.widen(ctx, allowed, tables.widths, down, up) if down or up else False
    return False if wider == tables.widths else wider


def _allocate(model: ir.Model, ctx: Context, tables: Tables, reserve: float, method: str | None
              ) -> tuple[Allocation, list[dict[str, int]]]:
    """The allocation, and the bits of every allocation tried on the way (the compact format's layout loop)."""
    blocks = allocation_blocks(ctx, tables, floors=method not in ("uniform", FILLED_UNIFORM))
    a = ctx.config.allocation
    method = method or a.allocator
    cheapest = sum(float(min(b.cost)) for b in blocks) + 1e-6
    budget = max(_budget(model, ctx, tables) - reserve, cheapest)
    options = dict(a.allocator_options or {}) if method == a.allocator else {}
    options.update(_method_inputs(ctx, tables, method))
    if method == FILLED_UNIFORM:  # the guard's fallback: the budget the common width leaves is spent on layers
        method, options["fill"] = "uniform", True
    counts_layouts = ctx.config.storage.format == "compact" and (not a.bits_payload or a.size_mb is not None)
    layouts = 0.0
    tried = []
    for _ in range(8):  # the compact format's layout constants depend on the pieces the allocation makes
        try:
            result = allocation.allocate(method, blocks, max(budget - layouts, cheapest), **options)
        except ValueError as exc:
            raise UsageError(f"allocation ({method}): {exc}") from None
        tried.append(result.bits)
        excess = result.cost + (_layout_bits(ctx, tables, result.bits) if counts_layouts else 0) - budget
        if excess <= 0 or budget - layouts <= cheapest:
            break
        layouts += excess
    if budget - layouts <= cheapest:
        result.details["at_cheapest"] = True  # nothing cheaper exists: the budget stage may refuse it
    return result, tried


def _budget(model: ir.Model, ctx: Context, tables: Tables) -> float:
    return bracket.budget_bits(model, ctx, sum(t.numel for t in tables.blocks))


def _layout_bits(ctx: Context, tables: Tables, bits: dict[str, int]) -> int:
    """Bits of the int64 layout vectors the compact format stores per distinct piece shape (the rewrite's own
    ``layout_vector``/``vector_layout``, deduplicated by content as the rewrite does)."""
    layouts = set()
    for info in ctx.weights:
        k, n = info.layout.view_shape
        for start, stop, width in ctx.pieces_for(info.name, n, bits):
            spec = tables.designs.get((info.name, width))
            group = (spec.block if spec is not None and spec.block else 0) or ctx.derived.group_size_for(info.name)
            dim = spec.dim if spec is not None and spec.method == "vq" and width > 0 else 1
            block = k if group <= 0 else -(-group // dim) * dim
            vec = layout_vector(k, stop - start, block) if dim == 1 else vector_layout(k, stop - start, block, dim)
            layouts.add(tuple(int(v) for v in vec))
    return sum(64 * len(v) for v in layouts)


def _method_inputs(ctx: Context, tables: Tables, method: str) -> dict:
    """What Quantile Inform, Random Bits and selective encoding need from the posterior."""
    if method not in ("quantile-inform", "random-bits", "selective"):
        return {}
    posterior = ctx.posterior
    if posterior is None and method != "selective":
        raise UnsupportedError(f"--allocator {method} needs a posterior: give --calib or --posterior")
    layouts = {w.name: w.layout for w in ctx.weights}
    if method == "quantile-inform":
        return {"informativeness": {name: np.abs(wp.mean) / wp.std for name, wp in posterior.weights.items()}}
    if method == "random-bits":
        def block(name: str) -> int | None:
            group = ctx.derived.group_size_for(name)
            return None if group <= 0 else group

        return {
            "layers": {
                name: allocation.LayerStats(
                    layouts[name].to_view(wp.mean), layouts[name].to_view(wp.std), block_size=block(name)
                )
                for name, wp in posterior.weights.items()
                if name in layouts
            }
        }
    # selective: S = I / sigma^2 per block, I the Fisher information (curvature); without a posterior the
    # expected loss of skipping the block (its 0-bit table entry) ranks blocks the same way.
    importance = {}
    for t in tables.blocks:
        if posterior is not None:
            wp = posterior.weights[t.weight]
            layout = layouts[t.weight]
            cols = slice(*t.columns)
            info = layout.to_view(wp.curvature)[:, cols] * layout.to_view(wp.precision)[:, cols]
            importance[t.name] = float(np.sum(info))
        else:
            importance[t.name] = float(t.loss[0])
    return {"importance": importance}
