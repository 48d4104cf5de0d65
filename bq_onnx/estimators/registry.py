"""Estimator name -> class: the one list of posterior estimators (the CLI's ``--method`` choices come from it)."""

from __future__ import annotations

from bq_onnx.estimators.activations import Activations
from bq_onnx.estimators.base import Estimator
from bq_onnx.estimators.hutchinson import Hutchinson
from bq_onnx.estimators.kfac import Kfac
from bq_onnx.estimators.squared_gradients import FisherMC, Laplace

REGISTRY: dict[str, type[Estimator]] = {cls.name: cls for cls in (Laplace, FisherMC, Hutchinson, Kfac, Activations)}

#: Every posterior source: the estimators, and ``external`` posteriors read from a file (``--posterior``).
METHODS: tuple[str, ...] = (*REGISTRY, "external")
