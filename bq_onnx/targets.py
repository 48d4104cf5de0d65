"""Target legalization: constrain what ``optimize`` may produce so a target's runtime executes it.

Two steps. :func:`legalize_config` runs before the pipeline: symmetric-only targets get ``uniform-sym``
(an explicit codebook quantizer is an error), a group size the target does not accept becomes the nearest one it
does, compact (local functions) is refused where the target cannot read them, and ``strict_size`` keeps only
the widths the target executes natively. :func:`legalize_weights` runs after the weights are found: on
targets that run int4 only into some ops (TensorRT: MatMul/Gemm), need an even last dimension or blocked int4,
each weight that cannot be int4 gets a per-weight floor of the smallest allowed width >= 5 (int8 container) and,
on ``int8_per_channel`` targets, group size 0 (one scale per output channel). TensorRT Conv weights thus become
int8 per channel. :func:`pack_low_widths` runs once the loss tables exist: where no allocation in the target's
containers (at 3 bits or more, where int2 containers exist) meets the stored budget, the native format packs the
1..3-bit grids that have no container of their size (:mod:`bq_onnx.sizes`).
"""

from __future__ import annotations

import dataclasses

from bq_onnx.config import OptimizeConfig
from bq_onnx.context import Context, Derived, WeightInfo
from bq_onnx.errors import UsageError
from bq_onnx.qtensor import FLOAT16_BITS
from bq_onnx.runtimes.base import Capabilities

UNIFORM_QUANTIZERS = ("uniform", "uniform-sym", "percentile")


def legalize_config(
    config: OptimizeConfig, derived: Derived, p: Capabilities
) -> tuple[OptimizeConfig, Derived, list[str]]:
    """Options and derived values the target can execute, and one message per change."""
    explicit = config.explicit()
    strict_size = config.target.strict_size
    q, a = config.quantization, config.allocation
    notes: list[str] = []
    changes: dict = {"target": p.name}
    derive: dict = {}
    if p.symmetric_only and q.quantizer != "uniform-sym":
        if q.quantizer not in UNIFORM_QUANTIZERS:
            raise UsageError(f"--quantizer {q.quantizer}: target {p.name} needs symmetric uniform weights "
                             f"(use uniform-sym or leave --quantizer out)")
        changes["quantizer"] = "uniform-sym"
        notes.append(f"target {p.name}: quantizer {q.quantizer} -> uniform-sym (symmetric, zero point 0)")
    if not p.codebooks and q.quantizer not in UNIFORM_QUANTIZERS:
        raise UsageError(f"--quantizer {q.quantizer}: target {p.name} does not run codebook decodes")
    size = derived.group_size
    if p.block_sizes is not None and size not in p.block_sizes:
        allowed = sorted(p.block_sizes)
        group = min(allowed, key=lambda b: (abs(b - size), b)) if size > 0 else allowed[0]
        if "group_size" in explicit:
            notes.append(f"target {p.name}: --group-size {size} is not accepted "
                         f"({'/'.join(map(str, allowed))}); using {group}")
        else:
            notes.append(f"target {p.name}: group size {size} -> {group} (accepted: "
                         f"{'/'.join(map(str, allowed))})")
        derive["group_size"] = group
    if derived.group_choices:
        fits = tuple(g for g in derived.group_choices if p.block_sizes is None or g in p.block_sizes)
        if p.int4_blocked_only:  # int4 there needs whole blocks of one size per tensor: keep the single group size
            fits = ()
        if fits != derived.group_choices:
            notes.append(f"target {p.name}: --group-size auto chooses among {list(fits)}" if len(fits) > 1
                         else f"target {p.name}: --group-size auto -> {derive.get('group_size', size)}")
        derive["group_choices"] = fits if len(fits) > 1 else ()
    if config.storage.format == "compact" and not p.local_functions:
        raise UsageError(f"--format compact stores model-local functions, which target {p.name} cannot read; "
                         f"use --format native")
    if strict_size:
        # 0: mean only, no codes; 16: fp16 values, no container
        kept = tuple(b for b in a.allowed_bits if b in (0, FLOAT16_BITS) or b in p.native_bits)
        if not any(kept):
            raise UsageError(f"--strict-size: none of the allowed widths {list(a.allowed_bits)} is executed "
                             f"natively by {p.name} ({sorted(p.native_bits)})")
        if kept != tuple(a.allowed_bits):
            notes.append(f"target {p.name} --strict-size: allowed widths {list(a.allowed_bits)} -> {list(kept)}")
        changes["allowed_bits"] = kept
    return config.replace(**changes), dataclasses.replace(derived, **derive), notes


def container_notes(ctx: Context, p: Capabilities) -> list[str]:
    """Which allocated widths the target stores (and executes) in a larger container."""
    widths = set(ctx.bits.values()) if ctx.bits else {int(ctx.config.allocation.bits)}
    widths |= {b for _, b in ctx.derived.weight_min_bits}
    notes = []
    for w in sorted(b for b in widths if 0 < b <= 8 and b not in p.native_bits):
        box = "int4" if w <= 4 else "int8"
        notes.append(f"target {p.name}: {w}-bit weights are stored and executed in an {box} container "
                     f"(the {w}-bit grid is kept; --strict-size allows only {sorted(p.native_bits)})")
    return notes


PACK_MARGIN = 0.01
"""Share of the budget left for what the rewrite adds beyond the tables (shape and decode constants)."""


def pack_low_widths(model, ctx: Context, p: Capabilities | None) -> bool:
    """Whether the native output must store its 1..3-bit grids packed to meet the stored budget: the target packs
    (the default target, OpenVINO: no container of those sizes; onnxruntime) and the cheapest allocation the tables
    allow in containers (every block at its cheapest width at or above its floor; where int2 containers exist, at
    or above 3 bits: int2 meets the budget, but a 3-bit grid costs an int4 container, so without packing the budget
    buys 2 or 4 bits) stores more than the budget, less :data:`PACK_MARGIN`. Elsewhere every layer stays a container
    the runtimes run compressed."""
    from bq_onnx.stages import bracket
    from bq_onnx.stages.budget import StoredBudget

    if ctx.config.storage.format != "native" or (p is not None and not p.packed_codes) or ctx.tables is None:
        return False
    budget = StoredBudget.of(model, ctx)
    if budget is None or budget.size_mb is not None and not ctx.tables.blocks:
        return False
    limit = budget.limit_bits - (8 * budget.other_bytes if budget.size_mb is not None else 0)
    floors = dict(ctx.derived.weight_min_bits)
    three = 3 if p is not None and {"int2", "uint2"} & p.containers else 0  # int2 meets it, without a 3-bit grid
    while True:
        cheapest = 0.0
        for t in ctx.tables.blocks:
            least = max(ctx.floors.get(t.name, 0), floors.get(t.weight, 0), three)
            cheapest += min((float(c) for b, c in zip(t.bits, t.stored) if b >= least), default=float(min(t.stored)))
        packs = cheapest > (1 - PACK_MARGIN) * limit
        lower = bracket.widen(ctx, ctx.config.allocation.allowed_bits, ctx.tables.widths, True, False) \
            if packs and ctx.tables.widths is not None else False
        if lower is False or lower == ctx.tables.widths:
            return packs
        ctx.tables.widen(lower)  # the narrower widths the bracket left out may be cheaper in containers


def packs_at_all(ctx: Context, p: Capabilities | None) -> bool:
    """Whether this output may store 1..3-bit grids packed: the native format on a target that packs."""
    return ctx.config.storage.format == "native" and (p is None or p.packed_codes) and not ctx.fixed


def packs_before_tables(ctx: Context, p: Capabilities | None) -> bool:
    """Whether containers surely cannot meet the budget, so the tables need not be scored in them first: a
    ``--bits`` budget under 4 with no 0-bit width allowed (every non-zero width costs at least an int4 code there,
    whatever its group size; with int2 containers, every width of 3 bits or more) on a target that packs. The same
    decision as :func:`pack_low_widths`, without a second scoring of the tables."""
    a = ctx.config.allocation
    return (ctx.config.storage.format == "native" and (p is None or p.packed_codes) and not ctx.fixed
            and not a.bits_payload and a.size_mb is None and a.bits is not None and float(a.bits) < 4
            and 0 not in a.allowed_bits)


def _ops(consumers: tuple[str, ...]) -> set[str]:
    return {c.split(":", 1)[0] for c in consumers}


def legalize_weights(weights: list[WeightInfo], config: OptimizeConfig, derived: Derived, p: Capabilities
                     ) -> tuple[Derived, list[str]]:
    """Per-weight floors and group sizes for the weights the target cannot run in int4, and one note each."""
    floors, groups = list(derived.weight_min_bits), list(derived.weight_group_size)
    notes: list[str] = []
    allowed_bits = config.allocation.allowed_bits
    wide = [b for b in allowed_bits if b >= 5]
    for info in weights:
        k, n = info.layout.view_shape
        ops = _ops(info.consumers)
        why = []
        if p.int4_ops is not None and not ops <= p.int4_ops:
            why.append(f"consumed by {', '.join(sorted(ops - p.int4_ops))}")
        if p.even_last_dim and n % 2:
            why.append(f"odd last dimension {n}")
        if p.int4_blocked_only and (derived.group_size <= 0 or k < derived.group_size):
            why.append(f"{k} rows, fewer than one block of {derived.group_size}: int4 needs whole blocks")
        if not why:
            continue
        if not wide:
            raise UsageError(f"target {p.name}: weight '{info.name}' cannot be int4 ({'; '.join(why)}) and "
                             f"no allowed width >= 5 is left ({list(allowed_bits)})")
        floors.append((info.name, wide[0]))
        if p.int8_per_channel:
            groups.append((info.name, 0))
        notes.append(f"target {p.name}: '{info.name}' at >= {wide[0]} bits in int8"
                     f"{' per channel' if p.int8_per_channel else ''} ({'; '.join(why)})")
    return dataclasses.replace(derived, weight_min_bits=tuple(floors), weight_group_size=tuple(groups)), notes
