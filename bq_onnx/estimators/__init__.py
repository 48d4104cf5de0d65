"""Posterior estimators: one module per method behind one accumulator interface (:mod:`.base`), chosen by name
from :data:`REGISTRY`; :func:`estimate_posterior` and :func:`estimate_prepared` run one from start to finish."""

from __future__ import annotations

from bq_onnx.estimators.base import Accumulator, Batch, Estimator, PosteriorPart, Problem, Stage
from bq_onnx.estimators.driver import estimate_posterior, estimate_prepared
from bq_onnx.estimators.loss_gradients import gradients
from bq_onnx.estimators.prepared import Prepared, prepare
from bq_onnx.estimators.registry import METHODS, REGISTRY

__all__ = [
    "METHODS",
    "REGISTRY",
    "Accumulator",
    "Batch",
    "Estimator",
    "PosteriorPart",
    "Prepared",
    "Problem",
    "Stage",
    "estimate_posterior",
    "estimate_prepared",
    "gradients",
    "prepare",
]
