"""The model an estimator works on: prepared by the pipeline's own passes, run forward for the FP32 outputs, and
extended by a loss and its gradient graph."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir

from bq_onnx.autodiff.loss import LOSS, LossPlan
from bq_onnx.calibration import Calibration
from bq_onnx.config import WeightsConfig
from bq_onnx.context import WeightInfo
from bq_onnx.graph import forward_model
from bq_onnx.model_io import copy_model, load_model
from bq_onnx.pass_manager import run_passes
from bq_onnx.passes.loss import AppendLossPass
from bq_onnx.passes.prepare import prepare_passes
from bq_onnx.runtimes.sessions import TempSessions
from bq_onnx.stages.weights import find_weights

#: What :func:`bq_onnx.model_io.load_model` reads.
ModelSource = str | os.PathLike | onnx.ModelProto | ir.Model

if TYPE_CHECKING:
    from bq_onnx.autodiff.gradient import GradientGraph


@dataclasses.dataclass
class Prepared:
    """The model as the pipeline sees it, and the weights it would quantize."""

    model: ir.Model
    weights: list[WeightInfo]
    source: ModelSource | None
    cache: str | os.PathLike | None = None  # gradient graphs kept here (--cache)


def prepare(source: ModelSource, weights: WeightsConfig | None = None) -> Prepared:
    """Load ``source`` and run the pipeline's prepare passes and weight finder on it (``weights``: which tensors
    are weights; default the options' defaults)."""
    weights = weights or WeightsConfig()
    model = run_passes(load_model(source), prepare_passes(weights))
    return Prepared(model, find_weights(model, weights).weights, source)


def fp32_outputs(sessions: TempSessions, prepared: Prepared, output: str | None, calib: Calibration,
                 batch: int = 64) -> np.ndarray:
    """The model's output ``output`` (None: the first) on every calibration sample, as float32."""
    session = sessions.open(forward_model(prepared.model, [output]))
    return np.concatenate([session.run(feeds)[0] for feeds in calib.batches(batch)]).astype(np.float32)


def gradient_graph(prepared: Prepared, loss: LossPlan | str, output: str | None, wrt: list[str], as_inputs: bool,
                   model: ir.Model | None = None) -> GradientGraph:
    """The gradient graph of ``loss`` (a resolved plan, or one kind on ``output``) with respect to ``wrt``
    (weights or probes), fed the target
    at ``bq_onnx.autodiff.loss.TARGET``; ``as_inputs``: the weights become inputs (Hessian-vector products).
    ``model``: a copy of the prepared model to extend (default: a fresh copy)."""
    from bq_onnx.autodiff.gradient import build_gradient_model

    model = run_passes(model if model is not None else copy_model(prepared.model), [AppendLossPass(loss, output)])
    return build_gradient_model(model, LOSS, wrt, weights_as_inputs=as_inputs, cache=prepared.cache)
