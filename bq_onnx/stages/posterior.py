"""Give the pipeline a posterior: estimate it from calibration data, or read one from a file, matched to the weights.

The quantizers weight their error by the posterior precision and the allocation spends bits by it; the model is
not changed.
"""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from bq_onnx.calibration import Calibration
from bq_onnx.config import PosteriorConfig
from bq_onnx.context import WeightInfo
from bq_onnx.errors import DataError
from bq_onnx.estimators import Prepared, estimate_prepared
from bq_onnx.posterior import Posterior


def estimate(model: ir.Model, weights: list[WeightInfo], calibration: Calibration, config: PosteriorConfig,
             progress: bool = False) -> Posterior:
    """The posterior of ``weights`` from ``calibration`` (``--calib``), on the model as the pipeline prepared it."""
    return estimate_prepared(Prepared(model, weights, None), calibration, config, progress)


def load(path: str | os.PathLike, weights: list[WeightInfo]) -> Posterior:
    """A posterior file (``bq-onnx posterior``'s, or an external Bayesian network's) matched to ``weights``."""
    return matched(Posterior.load(path), weights, path)


def matched(posterior: Posterior, weights: list[WeightInfo], where: str | os.PathLike = "<Posterior>") -> Posterior:
    """``posterior`` if it covers every weight with its shape (and, unless external, its values)."""
    for info in weights:
        wp = posterior.weights.get(info.name)
        if wp is None:
            raise DataError(f"{where}: no posterior for weight '{info.name}'")
        if tuple(wp.mean.shape) != info.layout.shape:
            raise DataError(
                f"{where}: posterior of '{info.name}' has shape {list(wp.mean.shape)}, "
                f"the weight has {list(info.layout.shape)}"
            )
        if posterior.method != "external":
            weight = np.asarray(info.value.const_value.numpy(), dtype=np.float32)
            if not np.array_equal(weight, wp.mean):
                raise DataError(f"{where}: posterior of '{info.name}' was estimated for other weights")
    return posterior
