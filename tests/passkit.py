"""Every pass, Context and settings construction the per-pass tests need, in one place.

Issue 13 replaces ``Settings``/``Context.settings`` by typed configs, turns analyses into functions and moves
helper modules: when that lands, this file is the one the tests need changed. Each helper runs one pass (or the
minimum it requires) on an ``ir.Model`` and returns the model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.loss import LOSS, TARGET
from bq_onnx.config import OptimizeConfig
from bq_onnx.context import Context
from bq_onnx.model_io import load_model
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.loss import AppendLossPass
from bq_onnx.passes.matmulnbits import LowerMatMulNBitsPass
from bq_onnx.passes.prepare import SetIrVersionPass, UpgradeOpsetPass, prepare_passes
from bq_onnx.passes.rewrite_compact import RewriteCompactPass
from bq_onnx.passes.rewrite_native import RewriteNativePass
from bq_onnx.runtimes.profiles import get_profile
from bq_onnx.stages import distill as distill_stage
from bq_onnx.stages.quantize import quantize_weights as quantize_stage
from bq_onnx.stages.weights import find_weights as find_weights_stage
from bq_onnx.targets import legalize_weights as legalize_stage

__all__ = ["LOSS", "TARGET"]


def context(**settings) -> Context:
    """A context with these settings (``bits``, ``format``, ``quantizer``, ``group_size``, ``min_size`` ...)."""
    return Context(OptimizeConfig.from_options(**settings))


def load(model) -> ir.Model:
    """A fresh ``ir.Model`` of a ModelProto or path (the input is never changed)."""
    return load_model(model)


def upgrade_opset(model: ir.Model, target: int = 21) -> tuple[ir.Model, bool]:
    result = UpgradeOpsetPass(target)(model)
    return result.model, result.modified


def set_ir_version(model: ir.Model) -> tuple[ir.Model, bool]:
    result = SetIrVersionPass()(model)
    return result.model, result.modified


def prepare(model: ir.Model, ctx: Context) -> ir.Model:
    """What every later pass requires: constants lifted, opset >= 21, a runtime-readable IR version."""
    return run_passes(model, prepare_passes(ctx.config.weights))


def find_weights(model: ir.Model, ctx: Context) -> ir.Model:
    found = find_weights_stage(model, ctx.config.weights)
    ctx.weights = found.weights
    ctx.messages.extend(found.messages)
    return model


def quantize_weights(model: ir.Model, ctx: Context) -> ir.Model:
    ctx.quantized = quantize_stage(ctx)
    return model


def rewrite(model: ir.Model, ctx: Context) -> ir.Model:
    """The storage rewrite of the context's format."""
    cls = RewriteNativePass if ctx.config.storage.format == "native" else RewriteCompactPass
    return run_passes(model, [cls(ctx)])


def quantized_model(proto, **settings) -> tuple[ir.Model, Context]:
    """Prepare, find and quantize the weights (no rewrite yet): what the rewrites and distillation start from."""
    ctx = context(**settings)
    model = quantize_weights(find_weights(prepare(load(proto), ctx), ctx), ctx)
    return model, ctx


def lower_matmulnbits(model: ir.Model) -> tuple[ir.Model, bool]:
    result = LowerMatMulNBitsPass()(model)
    return result.model, result.modified


def append_loss(model: ir.Model, kind: str, output: str | None = None, axis: int = -1) -> ir.Model:
    return run_passes(model, [AppendLossPass(kind, output, axis)])


def legalize_weights(model: ir.Model, ctx: Context, target: str) -> ir.Model:
    ctx.derived, notes = legalize_stage(ctx.weights, ctx.config, ctx.derived, get_profile(target))
    ctx.messages.extend(notes)
    return model


def distill(model: ir.Model, ctx: Context, calibration, steps: int, **options) -> ir.Model:
    from bq_onnx.calibration import load_calibration

    ctx.config = ctx.config.replace(distill_steps=steps, **({"distill_lr": options.pop("lr")} if "lr" in options
                                                              else {}))
    distilled = distill_stage.distill(model, ctx, load_calibration(calibration, model), **options)
    ctx.quantized, ctx.distillation = distilled.quantized, distilled.report
    ctx.messages.extend(distilled.messages)
    return model


# What the passes leave in the context, read through one place.


def weight_names(ctx: Context) -> list[str]:
    return [w.name for w in ctx.weights]


def weight_consumers(ctx: Context) -> dict[str, tuple[str, ...]]:
    return {w.name: w.consumers for w in ctx.weights}


def view_shapes(ctx: Context) -> dict[str, tuple[int, int]]:
    """Each weight's ``(K, N)`` view: K the reduction axis the blocks run along."""
    return {w.name: w.layout.view_shape for w in ctx.weights}


def quantized(ctx: Context):
    """Weight name -> its quantized form (``QuantizedTensor`` or ``QuantizedPieces``)."""
    return ctx.quantized


def dequantized(ctx: Context) -> dict[str, np.ndarray]:
    """Weight name -> the numpy-dequantized tensor in the weight's own layout (the verification reference)."""
    return {w.name: w.layout.from_view(ctx.quantized[w.name].dequantize()) for w in ctx.weights}


def weight_floors(ctx: Context) -> dict[str, int]:
    """Per-weight minimum widths set by target legalization."""
    return dict(ctx.derived.weight_min_bits)


def weight_groups(ctx: Context) -> dict[str, int]:
    """Per-weight group sizes set by target legalization (0: one scale per output channel)."""
    return dict(ctx.derived.weight_group_size)


def messages(ctx: Context) -> list[str]:
    return ctx.messages


def distillation(ctx: Context) -> dict:
    """What distillation reports: steps, held-out samples, KL before and after."""
    return ctx.distillation


def tables(model: ir.Model, ctx: Context, calibration=None):
    """The expected-loss tables stage (kept on the context, as the pipeline does)."""
    from bq_onnx.stages.tables import expected_loss_tables

    ctx.tables = expected_loss_tables(model, ctx, calibration)
    return ctx.tables


def allocate(model: ir.Model, ctx: Context):
    from bq_onnx.stages.allocate import allocate_bits

    ctx.allocation = allocate_bits(model, ctx, ctx.tables)
    return ctx.allocation
