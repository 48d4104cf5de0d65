"""bq-onnx: Bayesian mixed-precision weight quantization for ONNX models."""

from __future__ import annotations

__version__ = "0.1.0"

from bq_onnx.api import OptimizeResult, optimize  # noqa: E402
from bq_onnx.estimators import estimate_posterior, gradients  # noqa: E402
from bq_onnx.inspect import inspect  # noqa: E402
from bq_onnx.posterior import Posterior  # noqa: E402

__all__ = ["OptimizeResult", "Posterior", "__version__", "estimate_posterior", "gradients", "inspect", "optimize"]
