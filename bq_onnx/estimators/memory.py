"""How many samples one batched gradient run may take: a budget on the activations and gradients it holds,
divided by a model's bytes per sample, so memory follows the model rather than a fixed batch."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir

from bq_onnx.calibration import Calibration
from bq_onnx.graph import forget_shapes, specialise

#: Default cap, in MiB, on the intermediate tensors of one batched gradient run (see :func:`activation_budget`).
ACTIVATION_BUDGET_MB = 1024

#: Bytes a gradient graph holds per byte of forward node outputs: each output's gradient, the backward rules'
#: own intermediates and onnxruntime's arena (EfficientNet-Lite0's peaks at batch 32 and 10 put it at 3 to 4).
GRADIENT_GRAPH_FACTOR = 4


def activation_budget() -> int:
    """Bytes that the forward activations and their gradients of one batched gradient run may take: 1 GiB by
    default, ``BQ_ONNX_ACTIVATION_BUDGET_MB`` (MiB) overrides it. The batched Fisher runs
    ``clamp(budget // bytes_per_sample, 1, batch_size)`` samples at a time, so memory follows the model's
    activation size rather than a fixed batch (EfficientNet-Lite0 at 224x224: ~100 MiB a sample); the requested
    ``batch_size`` stays the upper bound, and the result is the same up to float summation order."""
    value = os.environ.get("BQ_ONNX_ACTIVATION_BUDGET_MB")
    try:
        return max(int(float(value) * 2**20), 1) if value else ACTIVATION_BUDGET_MB * 2**20
    except ValueError:
        return ACTIVATION_BUDGET_MB * 2**20


def activation_bytes_per_sample(model: ir.Model, calib: Calibration) -> int | None:
    """Bytes of the float node outputs of ``model`` at one sample, times :data:`GRADIENT_GRAPH_FACTOR`: the
    intermediate tensors that a gradient graph holds per sample. Shape inference on ``model`` (a copy whose node
    shapes this rewrites); None when shapes cannot be inferred."""
    forget_shapes(model)
    try:
        specialise(model, calib.run_shapes())
    except Exception:  # noqa: BLE001 - unknown size: the caller keeps the requested batch
        return None
    total = 0
    for node in model.graph:
        for out in node.outputs:
            if out.shape is None or out.dtype is None or not out.dtype.is_floating_point():
                continue
            if not all(isinstance(d, int) for d in out.shape):
                continue
            total += int(np.prod(out.shape, dtype=np.int64) * out.dtype.itemsize)
    return GRADIENT_GRAPH_FACTOR * total if total else None


def adapted_batch(bytes_per_sample: int | None, requested: int, budget: int | None = None) -> int:
    """``clamp(budget // bytes_per_sample, 1, requested)`` (budget: :func:`activation_budget`)."""
    if not bytes_per_sample:
        return requested
    budget = activation_budget() if budget is None else budget
    return int(min(max(budget // bytes_per_sample, 1), requested))
