"""The pipeline: the list of passes ``optimize`` runs, and the runner that applies them in order."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir
from onnx_ir.passes.common import LiftConstantsToInitializersPass, TopologicalSortPass

from bq_onnx.context import Context
from bq_onnx.errors import BqError
from bq_onnx.passes.allocate import AllocatePass
from bq_onnx.passes.find_weights import FindWeightsPass
from bq_onnx.passes.prepare import SetIrVersionPass, UpgradeOpsetPass
from bq_onnx.passes.quantize import QuantizeWeightsPass
from bq_onnx.passes.rewrite_compact import RewriteCompactPass
from bq_onnx.passes.rewrite_native import RewriteNativePass
from bq_onnx.passes.tables import ExpectedLossTablesPass
from bq_onnx.progress import memtrace


def prepare_passes(ctx: Context) -> list[ir.passes.PassBase]:
    """Constants to initializers, opset >= 21, a runtime-readable IR version."""
    return [
        LiftConstantsToInitializersPass(size_limit=ctx.config.weights.min_size),
        UpgradeOpsetPass(),
        SetIrVersionPass(),
    ]


def optimize_passes(
    ctx: Context,
    posterior: Sequence[ir.passes.PassBase] = (),
    allocator_options: dict | None = None,
    distill: Sequence[ir.passes.PassBase] = (),
    calibration=None,
    output: str | None = None,
    legalize: Sequence[ir.passes.PassBase] = (),
    lower: Sequence[ir.passes.PassBase] = (),
) -> list[ir.passes.PassBase]:
    """Prepare, find weights, (posterior), tables + allocation (unless fixed width), quantize, rewrite."""
    a = ctx.config.allocation
    rewrite = RewriteNativePass if ctx.config.storage.format == "native" else RewriteCompactPass
    allocate: list[ir.passes.PassBase] = []
    if not ctx.fixed:
        allocate = [
            ExpectedLossTablesPass(ctx, a.allowed_bits, a.granularity, a.bits_include_metadata or a.size_mb is not None,
                                   mode=a.tables, calibration=calibration, output=output),
            AllocatePass(ctx, allocator_options),
        ]
    return [
        *prepare_passes(ctx),
        FindWeightsPass(ctx),
        *legalize,
        *posterior,
        *allocate,
        QuantizeWeightsPass(ctx),
        *distill,
        rewrite(ctx),
        *lower,
        TopologicalSortPass(),
    ]


def run_passes(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> ir.Model:
    """Run passes in order; a user-facing error raised inside a pass surfaces as itself."""
    for pass_ in passes:
        try:
            model = pass_(model).model
            memtrace(type(pass_).__name__)
        except ir.passes.InvariantError as exc:
            if isinstance(exc.__cause__, BqError):
                raise exc.__cause__ from None
            raise
    return model
