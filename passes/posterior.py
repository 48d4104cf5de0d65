"""Give the pipeline a posterior: estimate it from calibration data, or read one from a file.

The posterior lands in ``ctx.posterior``; later passes read it (the quantizers weight their error by the
posterior precision; the allocation pass spends bits by it). The model itself is not changed.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from bq_onnx.calibration import CalibrationSource
from bq_onnx.config import PosteriorConfig
from bq_onnx.context import Context
from bq_onnx.errors import DataError
from bq_onnx.estimators import Prepared, estimate_prepared
from bq_onnx.posterior import Posterior


class EstimatePosteriorPass(ir.passes.InPlacePass):
    def __init__(self, ctx: Context, calibration: CalibrationSource, options: PosteriorConfig) -> None:
        self.ctx = ctx
        self.calibration = calibration
        self.options = options

    def requires(self, model: ir.Model) -> None:
        assert self.ctx.weights, "FindWeightsPass must run first"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        prepared = Prepared(model, self.ctx.weights, None)
        self.ctx.posterior = estimate_prepared(prepared, self.calibration, self.options, self.ctx.progress)
        self.ctx.messages.extend(self.ctx.posterior.notes)
        return ir.passes.PassResult(model, modified=False)


class CheckPosteriorPass(ir.passes.InPlacePass):
    """Match a given posterior (``ctx.posterior``) to the weights found: every weight, same shape, same values."""

    def __init__(self, ctx: Context, path: str | os.PathLike) -> None:
        self.ctx = ctx
        self.path = path

    def load(self) -> Posterior:
        return self.ctx.posterior

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        posterior = self.load()
        for info in self.ctx.weights:
            wp = posterior.weights.get(info.name)
            if wp is None:
                raise DataError(f"{self.path}: no posterior for weight '{info.name}'")
            if tuple(wp.mean.shape) != info.layout.shape:
                raise DataError(
                    f"{self.path}: posterior of '{info.name}' has shape {list(wp.mean.shape)}, "
                    f"the weight has {list(info.layout.shape)}"
                )
            if posterior.method != "external":
                weight = np.asarray(info.value.const_value.numpy(), dtype=np.float32)
                if not np.array_equal(weight, wp.mean):
                    raise DataError(f"{self.path}: posterior of '{info.name}' was estimated for other weights")
        self.ctx.posterior = posterior
        return ir.passes.PassResult(model, modified=False)


class LoadPosteriorPass(CheckPosteriorPass):
    """Read a posterior file (ours, or an external one from a Bayesian network) and match it to the weights."""

    def load(self) -> Posterior:
        return Posterior.load(self.path)
