"""How to estimate a posterior: the options the CLI's ``--method``, ``--loss``, ... and the API's keywords map
onto (their own module so a configuration layer can read the field names without the estimators)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bq_onnx.autodiff.loss import LOSS_KINDS
from bq_onnx.errors import UsageError
from bq_onnx.posterior import DEFAULT_PRIOR_PRECISION


@dataclasses.dataclass
class PosteriorOptions:
    """How to estimate the posterior; the CLI's ``--method``, ``--loss``, ... map onto these."""

    method: str = "laplace"
    loss: str = "kl"
    labels: np.ndarray | None = None
    output: str | None = None
    prior_precision: float = DEFAULT_PRIOR_PRECISION
    probes: int = 4
    mc_samples: int = 1
    calib_samples: int | None = None
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        from bq_onnx.estimators.registry import REGISTRY  # the registry imports the estimators, which use this

        if self.method not in REGISTRY:
            raise UsageError(f"--method must be one of {', '.join(REGISTRY)}, got {self.method!r}")
        if self.loss not in LOSS_KINDS:
            raise UsageError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if self.loss == "ce" and self.labels is None:
            raise UsageError("--loss ce needs labels (--labels)")
        if self.probes < 1 or self.mc_samples < 1 or self.batch_size < 1:
            raise UsageError("--probes, --mc-samples and --batch-size must be >= 1")
        if not self.prior_precision > 0:
            raise UsageError(f"--prior-precision must be > 0, got {self.prior_precision}")
