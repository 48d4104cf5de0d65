"""Design the quantizer of every weight: float tensor -> quantized form.

One weight at a time, so only one float copy of one tensor is ever materialised beside the (lazy) model. With
an allocation, a weight whose output-channel slices got different widths becomes :class:`QuantizedPieces`; each
piece is cut from the whole tensor quantized at that width, exactly as the expected-loss tables measured it.

``--rounding gptq`` (``gptq-plain``: without the posterior): each width's design keeps its grid (scales, zero points,
codebooks, outlier positions) and its codes are re-chosen by :func:`bq_onnx.rounding.gptq_round` with the layer's
input second moment ``A`` (:mod:`bq_onnx.stages.moments`, measured once on the calibration samples the posterior
saw) and the posterior precision; output channels are independent once the grid is fixed, so the pieces are cut
from it as before. Where the tables measured that GPTQ loses more than nearest for a tensor at a width (widths up to
4, :class:`bq_onnx.stages.tables._Compensation`), nearest's codes are kept there. Weights without an ``A`` (no
calibration data, or not read directly by one MatMul/Gemm/Conv) are rounded to nearest, with a note.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections import OrderedDict

import numpy as np
import onnx_ir as ir

from bq_onnx.budgets import require
from bq_onnx.calibration import Calibration
from bq_onnx.config import COMPENSATING
from bq_onnx.context import Context
from bq_onnx.errors import ModelError
from bq_onnx.idle import arrays_to_disk, drop_pages, kept_on_disk
from bq_onnx.progress import progress, release_freed_memory
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, take_columns
from bq_onnx.rounding.gptq import gptq_bytes, group_count
from bq_onnx.weights import design, streamed_design, weight_view


def quantize_weights(
    ctx: Context, model: ir.Model | None = None, calibration: Calibration | None = None
) -> dict[str, QuantizedTensor]:
    """Each weight quantized at the widths the allocation (or the fixed ``--bits``) gives its blocks."""
    moments = layer_moments(ctx, model, calibration)
    plain = ctx.config.quantization.rounding == "gptq-plain"
    quantized: dict[str, QuantizedTensor] = {}
    for info in progress(ctx.weights, "quantize", enabled=ctx.progress):
        pieces = ctx.pieces_for(info.name, info.layout.view_shape[1])
        widths = sorted({bits for _, _, bits in pieces})
        streams = ctx.posterior is None and info.name not in moments
        if streams and len(pieces) > 1:
            cut = _streamed_pieces(ctx, info, pieces, widths)
            if cut is not None:
                quantized[info.name] = QuantizedPieces(info.layout.view_shape, cut)
                continue
        designs = _streamed(ctx, info, widths) if streams else None
        if designs is None:
            view, importance = weight_view(ctx, info)
            designs = {bits: design(ctx, view, importance, bits, info.name) for bits in widths}
        if info.name in moments:
            weighting = None if plain else importance
            designs = {bits: compensated(ctx, info.name, view, qt, moments[info.name], weighting)
                       for bits, qt in designs.items()}
        if len(pieces) == 1:
            quantized[info.name] = designs[pieces[0][2]]
        else:
            quantized[info.name] = QuantizedPieces(
                info.layout.view_shape,
                tuple((start, stop, take_columns(designs[bits], start, stop)) for start, stop, bits in pieces),
            )
        drop_pages()  # what this weight read of arrays waiting on disk: kept GPTQ codes, a big view and importance
    return quantized


def _streamed(ctx: Context, info, widths: list[int]) -> dict[int, QuantizedTensor] | None:
    """Every width's design read band by band from the weight's file (:func:`bq_onnx.weights.streamed_design`),
    or None where one cannot be (then the weight is read whole)."""
    designs = {}
    for bits in widths:
        designs[bits] = streamed_design(ctx, info, bits)
        if designs[bits] is None:
            return None
    return designs


def _streamed_pieces(ctx: Context, info, pieces: list[tuple[int, int, int]], widths: list[int]
                     ) -> tuple[tuple[int, int, QuantizedTensor], ...] | None:
    """:func:`_streamed`'s designs cut into ``pieces`` one width at a time, each width's whole codes dropped once
    its pieces are cut: the same pieces, with at most one width's codes (a byte per weight) beside them instead of
    every width's (issue 21: at 1 GiB of one weight, three widths' codes held 0.75x the weight). None where
    :func:`_streamed` gives None."""
    cut: dict[tuple[int, int], QuantizedTensor] = {}
    for bits in widths:
        whole = streamed_design(ctx, info, bits)
        if whole is None:
            return None
        for start, stop, _ in (p for p in pieces if p[2] == bits):
            cut[(start, stop)] = take_columns(whole, start, stop)
        del whole
    return tuple((start, stop, cut[(start, stop)]) for start, stop, _ in pieces)


_GRID = ("scale", "scale_code", "super_scale", "zero_point", "codebook", "offset", "outlier_index", "codes")


def compensated(ctx: Context, name: str, view: np.ndarray, qt: QuantizedTensor, a: np.ndarray,
                importance: np.ndarray | None) -> QuantizedTensor:
    """``qt`` re-rounded by GPTQ; the tables, the guard and the stored-budget loop quantize again and again, so a
    result is kept per (weight, width) and reused while the design (grid and nearest codes) is the same, with the
    per-channel errors of nearest's codes and of the result that GPTQ computed to choose between them."""
    from bq_onnx.disk_rows import DiskRows
    from bq_onnx.rounding.gptq import DAMPING, NO_GRID, DiskMetric, Metric, gptq_round_errors, grouped_moments

    if qt.kind in NO_GRID or ctx.rounded.get(("nearest", name, qt.bits)):  # measured: nearest loses less here
        return qt
    key = (name, qt.bits)
    hit = ctx.rounded.get(key)
    if hit is not None and hit[4]() is qt:  # the same design object (the design cache hands them back): no hashing
        return hit[1]
    grid = _grid_key(qt)
    if hit is not None and hit[0] == grid:
        return hit[1]
    metrics: OrderedDict[str, Metric] = ctx.rounded.setdefault(METRICS, OrderedDict())
    metric = metrics.get(name)
    if metric is None:
        k, n = view.shape
        groups = grouped_moments(a, k, n)
        on_disk = isinstance(groups, DiskRows)
        require(gptq_bytes(k, n, group_count(groups), on_disk),
                f"GPTQ rounding of '{name}' (its {k} x {k} float64 metric; --rounding nearest needs none)", ModelError)
        if on_disk and importance is not None:  # kept with the metric: waits in a mapped file, not in memory
            importance = kept_on_disk(importance)
        metric = (DiskMetric if on_disk else Metric)(groups, importance, n, DAMPING)
        metrics[name] = metric
        while len(metrics) > 1 and sum(m.nbytes for m in metrics.values()) > METRIC_CACHE_BYTES:
            metrics.popitem(last=False)  # the least recently used: computed again, the same, if asked again
    metrics.move_to_end(name)
    out, near, final = gptq_round_errors(view, qt, a, importance, metric=metric)
    out = _waiting_on_disk(out)
    ctx.rounded[key] = (grid, out, near, final, weakref.ref(qt))
    return out


def _grid_key(qt: QuantizedTensor) -> tuple:
    """What a kept GPTQ result is reused for: the content of the design's grid and nearest codes (a digest, not
    the design: kept, the design's codes would stay in memory as long as the result)."""
    from bq_onnx.quantizers.cache import digest

    return tuple(digest(getattr(qt, f)) for f in _GRID)


def _waiting_on_disk(out: QuantizedTensor) -> QuantizedTensor:
    """``out`` with its codes (and outlier values) in a mapped temporary file where they are big
    (:func:`bq_onnx.idle.arrays_to_disk`; the same values): a result is kept per weight and width for the whole run
    and read only when a spending of the budget uses it (issue 21: kept in memory, the 0.25 GiB scale model's GPTQ
    codes grew the guard's memory by a byte per weight and width)."""
    arrays = {f: getattr(out, f) for f in ("codes", "outlier_value") if getattr(out, f) is not None}
    moved = arrays_to_disk(arrays)
    return out if moved is arrays else dataclasses.replace(out, **moved)


METRICS = ("metrics",)
"""The key of ``ctx.rounded`` under which the GPTQ metrics are kept (weight name -> Metric, least recent first)."""

METRIC_CACHE_BYTES = 1 << 30
"""GPTQ metrics kept across the spends at most (each is two ``(K, K)`` and two ``(K, N)`` float64 arrays: 1.4 GiB for a
``(8192, 2048)`` weight); the least recently used go first. Why: kept for every weight, a 0.125 GiB MLP with
``--calib`` held 2.5 GiB after its quantize step, and a model of many wide layers would hold several times its size."""


def compensation_ratio(ctx: Context, name: str, view: np.ndarray, qt: QuantizedTensor, a: np.ndarray,
                       importance: np.ndarray | None, ranges: list[tuple[int, int]]) -> np.ndarray:
    """Per slice of output channels: the layer-output error left by GPTQ over the one rounding to nearest leaves, on
    the metric GPTQ minimizes (``<= 1``: GPTQ keeps nearest's codes where it does not lower it; 1 where nearest's
    error is zero). What the expected-loss tables multiply their nearest-rounding loss by under ``--rounding gptq``."""
    if compensated(ctx, name, view, qt, a, importance) is qt:
        return np.ones(len(ranges))
    _, _, near, comp, _ = ctx.rounded[(name, qt.bits)]  # the entry compensated() just returned from
    out = np.ones(len(ranges))
    for i, (lo, hi) in enumerate(ranges):
        total = float(near[lo:hi].sum())
        if total > 0:
            out[i] = min(1.0, float(comp[lo:hi].sum()) / total)
    return out


def gptq_label(ctx: Context) -> str:
    """How the notes name the rounding: the flag the user gave, or what the default chose (a user who typed no
    ``--rounding`` should not read of one)."""
    if ctx.rounding_auto:
        return "GPTQ rounding (the default, --rounding auto)"
    return f"--rounding {ctx.config.quantization.rounding}"


def layer_moments(ctx: Context, model: ir.Model | None, calibration: Calibration | None) -> dict[str, np.ndarray]:
    """``A`` per weight for ``--rounding gptq`` (measured once per run and kept on the context), else empty."""
    if ctx.config.quantization.rounding not in COMPENSATING:
        return {}
    if ctx.moments is None:
        from bq_onnx.stages.moments import input_moments

        ctx.moments = input_moments(model, ctx, calibration) if model is not None else {}
        if ctx.moments:
            ctx.moments = arrays_to_disk(ctx.moments)  # read when a metric is built: on disk between
            release_freed_memory()
        if not ctx.moments:
            ctx.messages.append(f"{gptq_label(ctx)}: no MatMul/Gemm/Conv weight's input can be measured (no "
                                "calibration data, or every such weight is read inside a subgraph or through other "
                                "ops); every weight is rounded to nearest")
        else:
            rest = [info.name for info in ctx.weights if info.name not in ctx.moments]
            if rest:
                ctx.messages.append(f"{gptq_label(ctx)}: {len(rest)} weight(s) not read directly by one "
                                    f"MatMul/Gemm/Conv (e.g. '{rest[0]}') are rounded to nearest")
    return ctx.moments
