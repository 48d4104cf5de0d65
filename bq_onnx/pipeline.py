"""The pipeline: the order of the stages ``optimize`` runs.

Passes that change the model (prepare, rewrite, lowering, sort) are onnx-ir passes run by its ``PassManager``; the
analyses between them (weights, posterior, tables, allocation, quantizers, distillation; :mod:`bq_onnx.stages`)
are functions that return typed values, kept on the :class:`Context` for the stages after them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass as RemoveUnusedPass
from onnx_ir.passes.common import TopologicalSortPass

from bq_onnx.blas import single_threaded
from bq_onnx.calibration import Calibration
from bq_onnx.context import Context, Derived
from bq_onnx.counting import ir_stored_bytes
from bq_onnx.idle import design_to_disk
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.fast_layout import FAST_LAYOUT_TARGETS, FastLayoutPass
from bq_onnx.passes.prepare import SetIrVersionPass, UpgradeOpsetPass, prepare_passes
from bq_onnx.passes.rewrite_compact import RewriteCompactPass
from bq_onnx.passes.rewrite_native import RewriteNativePass
from bq_onnx.passes.split_matmul import SplitMatMulPass
from bq_onnx.posterior import Posterior
from bq_onnx.progress import memtrace, release_freed_memory
from bq_onnx.quantizers import cache as design_cache
from bq_onnx.runtimes.base import Capabilities
from bq_onnx.sizes import INT2_OPSET, storage_of
from bq_onnx.stages import guard
from bq_onnx.stages import posterior as posterior_stage
from bq_onnx.stages.allocate import allocate_bits, head_floors
from bq_onnx.stages.budget import BudgetUnmet, StoredBudget, other_bytes, prepare_note, uniform_note, zero_bit_note
from bq_onnx.stages.distill import distill
from bq_onnx.stages.guard import Spent
from bq_onnx.stages.quantize import quantize_weights
from bq_onnx.stages.tables import auto_rounding, expected_loss_tables
from bq_onnx.stages.weights import find_weights
from bq_onnx.targets import pack_low_widths, packs_at_all, packs_before_tables
from bq_onnx.weights import SLICES


def optimize_model(
    model: ir.Model,
    ctx: Context,
    *,
    calibration: Calibration | None = None,
    posterior: str | os.PathLike | Posterior | None = None,
    profile: Capabilities | None = None,
) -> ir.Model:
    """Quantize every weight of ``model`` (in place) as ``ctx.config`` says; the stages' values land on ``ctx``.

    ``calibration`` estimates the posterior unless ``posterior`` (a file or a :class:`Posterior`) is given, and
    serves the measured tables and distillation; ``profile`` legalizes the weights for a target runtime. The
    guard (:mod:`bq_onnx.stages.guard`) holds out part of ``calibration`` and measures the allocation on it
    before anything is written. Quantizer designs are computed once per run (:mod:`bq_onnx.quantizers.cache`).
    """
    with design_cache.scope(design_to_disk), single_threaded():
        return _optimize_model(model, ctx, calibration=calibration, posterior=posterior, profile=profile)


def _optimize_model(model: ir.Model, ctx: Context, *, calibration: Calibration | None,
                    posterior: str | os.PathLike | Posterior | None, profile: Capabilities | None) -> ir.Model:
    config = ctx.config
    # the stored budget counts against the model as given: constants the opset upgrade adds (Reduce* axes) are
    # the output's, as bq_onnx.counting.count counts them
    ctx.source_bytes = ir_stored_bytes(model)
    model = run_passes(model, prepare_passes(config.weights))
    if storage_of(config).int2:  # int2 codes need DequantizeLinear-25; converted before the weights are found
        model = run_passes(model, [UpgradeOpsetPass(INT2_OPSET), SetIrVersionPass()])
    # ... but what they remove (BatchNormalization vectors folded into their Conv) is no room for the weights
    prepared = ir_stored_bytes(model)
    ctx.prepare_removed = max(ctx.source_bytes - prepared, 0)
    ctx.source_bytes = min(ctx.source_bytes, prepared)
    found = find_weights(model, config.weights)
    ctx.weights = found.weights
    ctx.messages.extend(found.messages)
    ctx.exclusions = found.exclusions
    memtrace("find weights")
    if profile is not None:
        from bq_onnx.targets import legalize_weights

        ctx.derived, notes = legalize_weights(ctx.weights, config, ctx.derived, profile)
        ctx.messages.extend(notes)
    fit, held = calibration, None
    if calibration is not None and guard.wants_measurement(ctx):
        fit, held = guard.split(calibration, config.guard.holdout, config.guard.seed)
    if isinstance(posterior, Posterior):
        ctx.posterior = posterior_stage.matched(posterior, ctx.weights)
    elif posterior is not None:
        ctx.posterior = posterior_stage.load(posterior, ctx.weights)
    elif fit is not None:
        ctx.posterior = posterior_stage.estimate(model, ctx.weights, fit, config.posterior, ctx.progress)
        ctx.messages.extend(ctx.posterior.notes)
    memtrace("posterior")
    if config.quantization.rounding == "auto":
        rounding, note = auto_rounding(fit)
        ctx.config, ctx.rounding_auto = ctx.config.replace(rounding=rounding), rounding != "nearest"
        ctx.messages.extend([note] if note else [])
    if not ctx.fixed:
        if packs_before_tables(ctx, profile):
            ctx.derived = dataclasses.replace(ctx.derived, packed_codes=True)
        ctx.tables = expected_loss_tables(model, ctx, fit, "budget")
        if not ctx.derived.packed_codes and pack_low_widths(model, ctx, profile):  # pack 1..3-bit grids
            said = list(ctx.messages)
            ctx.derived = dataclasses.replace(ctx.derived, packed_codes=True)
            ctx.tables = expected_loss_tables(model, ctx, fit, "budget")
            ctx.messages[:] = said + [m for m in ctx.messages[len(said):] if m not in said]
        ctx.floors.update(head_floors(model, ctx, tables=ctx.tables))
        design_cache.forget(SLICES)  # asked for by the tables alone (the quantize stage encodes on their grids)
        release_freed_memory()
        memtrace("tables")
    weights = ctx.weights

    def spend(method: str | None = None) -> Spent:
        ctx.weights = weights
        return _spend(model, ctx, fit, profile, method)

    try:
        spent = _spend_lowering_heads(model, ctx, spend)
    except BudgetUnmet as unmet:
        spent = _cheaper_storage(model, ctx, fit, profile, lambda: _spend_lowering_heads(model, ctx, spend), unmet)
    if guard.wants_measurement(ctx):
        data = guard.held_out_data(model, ctx, held, calibration)
        if guard.guards(ctx):
            spent = guard.guard_allocation(model, ctx, spent, spend, data, fit if held is not None else None)
        else:
            guard.measure_only(model, ctx, spent, data)
        memtrace("guard")
        guard.check_targets(ctx)
    spent.apply(ctx)
    return _noted(spent.out, ctx)


def _cheaper_storage(model: ir.Model, ctx: Context, fit: Calibration | None, profile: Capabilities | None,
                     spend: Callable[[], Spent], unmet: BudgetUnmet) -> Spent:
    """A budget the first storage choice measured over, spent again on cheaper storage before it is refused.

    First packed 1..3-bit grids (the packing decision is an estimate from the tables, the layout's own constants
    are not in them: where containers measured over and the target can pack, the packed output is the cheaper
    one); then, at the default block size, block sizes the tables choose per tensor (``--group-size auto``: fewer
    scales; on ``--target onnxruntime`` 2-bit MatMulNBits at 32 rows stores about 3.1 bits per weight, so
    ``--bits 3`` was refused though 64 or 128 rows meet it). Each retry re-scores the tables; the last refusal is
    raised where none fits."""
    retries = []
    if ctx.tables is not None and not ctx.derived.packed_codes and packs_at_all(ctx, profile):
        retries.append((lambda: dataclasses.replace(ctx.derived, packed_codes=True), False))
    if ctx.tables is not None and "group_size" not in ctx.config.explicit() and not ctx.derived.group_choices:
        retries.append((lambda: _coarser_groups(ctx, profile, unmet), True))
    for retry, refloor in retries:
        said = list(ctx.messages)
        ctx.derived = retry()
        ctx.tables = expected_loss_tables(model, ctx, fit, "budget")
        ctx.messages[:] = said + [m for m in ctx.messages[len(said):] if m not in said]  # as after pack_low_widths
        if refloor:  # the heads' uniform width is read from the tables
            ctx.floors.update(head_floors(model, ctx, tables=ctx.tables))
        design_cache.forget(SLICES)
        try:
            return spend()
        except BudgetUnmet as again:
            unmet = again
    raise unmet


def _spend_lowering_heads(model: ir.Model, ctx: Context, spend: Callable[[], Spent]) -> Spent:
    """``spend()``; where the budget stage refuses the cheapest allocation, once more with the heads' floors set
    from the room that output left (the budget less the graph and decode constants it showed, which the tables do
    not price): a uniform allocation of the whole budget gave the heads a width the file cannot afford, so the
    smallest size a refusal names (every block at its cheapest width, heads included) could not be met when asked
    for (LeNet compact: --size-mb 0.01 named 0.0349 MB, and --size-mb 0.0349 was refused naming 0.039)."""
    try:
        return spend()
    except BudgetUnmet as unmet:
        if ctx.tables is None or not ctx.floors or unmet.room is None:
            raise
        before, said, noted = dict(ctx.floors), list(ctx.messages), list(ctx.head_notes)
        lowered = head_floors(model, ctx, ctx.tables, budget=unmet.room)
        if all(lowered.get(name, 0) >= least for name, least in before.items()):
            ctx.messages[:] = said
            raise
        ctx.floors = lowered
        ctx.messages[:] = [m for m in said if m not in noted] + ctx.messages[len(said):]
        return spend()


def _coarser_groups(ctx: Context, profile: Capabilities | None, unmet: BudgetUnmet) -> Derived:
    """``ctx`` moved to ``--group-size auto`` (derived and legalized as the options would be), with a note."""
    config = ctx.config.replace(group_size="auto")
    derived = Derived.from_config(config)
    if profile is not None:
        from bq_onnx.targets import legalize_config, legalize_weights

        config, derived, _ = legalize_config(config, derived, profile)
        derived, _ = legalize_weights(ctx.weights, config, derived, profile)
    ctx.config = config
    asked, _, smallest = str(unmet).split(";")[0].partition(" cannot be met: ")
    sizes = "/".join(map(str, derived.group_choices or (derived.group_size,)))
    ctx.messages.append(f"{asked}: at {ctx.derived.group_size} rows per block {smallest}; block sizes chosen per "
                        f"tensor among {sizes} instead (--group-size auto)")
    return dataclasses.replace(derived, packed_codes=ctx.derived.packed_codes)


def _spend(model: ir.Model, ctx: Context, calibration: Calibration | None, profile: Capabilities | None,
           method: str | None = None) -> Spent:
    """Allocate (by ``method``, default ``--allocator``), quantize and rewrite a copy of ``model``; while a stored
    budget binds, re-allocate with a reserve until the rewritten model fits (:class:`StoredBudget`)."""
    config = ctx.config
    if ctx.tables is not None:
        ctx.allocation = allocate_bits(model, ctx, ctx.tables, method=method)
        memtrace("allocate")
    budget = StoredBudget.of(model, ctx)
    weights, best, other = ctx.weights, None, other_bytes(model, ctx)
    while True:
        _quantize(model, ctx, calibration)
        if budget is None and not guard.wants_measurement(ctx):
            out = _rewrite(model, ctx, profile)  # spent once: the model itself is rewritten, no second copy
        else:
            trial = model.clone()
            # the clone's own values, found as in the model (subgraph weights live in their subgraph's initializers)
            values = {w.name: w.value for w in find_weights(trial, config.weights).weights}
            ctx.weights = [dataclasses.replace(w, value=values[w.name]) for w in weights]
            out = _rewrite(trial, ctx, profile)
            ctx.weights = weights
        memtrace("rewrite")
        if budget is None:
            ctx.stored_bytes = ir_stored_bytes(out) - other
            return Spent.of(out, ctx)
        better, reserve = budget.next_reserve(out, ctx)
        if better:
            best = Spent(out, ctx.allocation, ctx.quantized, ctx.distillation, ctx.layers, None)
        if reserve is None:
            break
        ctx.allocation = allocate_bits(model, ctx, ctx.tables, reserve, method=method)
        memtrace("allocate")
    best.stored_bytes = ir_stored_bytes(best.out) - other
    best.apply(ctx)
    return best


def _noted(out: ir.Model, ctx: Context) -> ir.Model:
    from bq_onnx.decode.rewrite import load_notes

    ctx.messages.extend(load_notes(ctx.layers or [], ctx.config.storage.format))
    for note in (zero_bit_note(ctx), uniform_note(ctx), prepare_note(ctx)):
        if note is not None:
            ctx.messages.append(note)
    return out


def _quantize(model: ir.Model, ctx: Context, calibration: Calibration | None) -> None:
    ctx.quantized = quantize_weights(ctx, model, calibration)
    memtrace("quantize")
    if ctx.config.distillation.distill_steps:
        distilled = distill(model, ctx, calibration)
        ctx.quantized, ctx.distillation = distilled.quantized, distilled.report
        ctx.messages.extend(distilled.messages)
        memtrace("distill")


def _rewrite(model: ir.Model, ctx: Context, profile: Capabilities | None) -> ir.Model:
    config = ctx.config
    rewrite = RewriteNativePass if config.storage.format == "native" else RewriteCompactPass
    lower: list[ir.passes.PassBase] = []
    if profile is not None and profile.name == "onnxruntime" and config.storage.format == "native":
        from bq_onnx.passes.matmulnbits import LowerMatMulNBitsPass

        lower.append(LowerMatMulNBitsPass())
    if config.storage.format == "native" and (profile is None or profile.name in FAST_LAYOUT_TARGETS):
        if profile is None or profile.name == "onnxruntime":  # OpenVINO: slower split (output_speed_pieces.md)
            lower.append(SplitMatMulPass())  # after the lowering (priced per tensor: pieces stay DQ, fused at load)
        lower.append(FastLayoutPass())  # onnxruntime/OpenVINO run it at FP32 speed or faster (issue 17)
    return run_passes(model, [rewrite(ctx), *lower, RemoveUnusedPass(), TopologicalSortPass()])
