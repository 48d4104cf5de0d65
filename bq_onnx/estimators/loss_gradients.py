"""Gradients of a loss over one batch with respect to weights: the public ``bq_onnx.gradients``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bq_onnx.autodiff.loss import LOSS_KINDS, TARGET
from bq_onnx.calibration import load_calibration
from bq_onnx.config import PosteriorConfig, WeightsConfig
from bq_onnx.errors import UsageError
from bq_onnx.estimators.loss_targets import check_labels
from bq_onnx.estimators.prepared import ModelSource, fp32_outputs, gradient_graph, prepare
from bq_onnx.probabilities import one_hot, softmax
from bq_onnx.runtimes.sessions import TempSessions


def gradients(
    model: ModelSource,
    feeds: Mapping[str, np.ndarray],
    *,
    loss: str | None = None,
    labels: np.ndarray | None = None,
    wrt: Sequence[str] | None = None,
    output: str | None = None,
    weights: WeightsConfig | None = None,
) -> dict[str, np.ndarray]:
    """Gradients of the loss over the batch ``feeds`` with respect to weights (default: all quantizable ones).

    ``loss``: ``kl`` (to the FP32 model's own output distribution; zero at the trained weights, useful at
    perturbed ones), ``ce`` (cross-entropy to integer ``labels``), ``mse`` (to ``labels``, or to the FP32
    output without labels).
    """
    loss = PosteriorConfig.loss if loss is None else loss
    if loss not in LOSS_KINDS:
        raise UsageError(f"loss must be one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    prepared = prepare(model, weights)
    names = list(wrt) if wrt is not None else [w.name for w in prepared.weights]
    missing = [n for n in names if n not in prepared.model.graph.initializers]
    if missing:
        raise UsageError(f"not an initializer of the model: {', '.join(missing)}")
    calib = load_calibration(dict(feeds), prepared.model)
    sessions = TempSessions()
    try:
        outputs = fp32_outputs(sessions, prepared, output, calib, batch=calib.num_samples)
        if loss == "ce" and labels is None:
            raise UsageError("loss 'ce' needs labels")
        labels = check_labels(labels, outputs, loss)
        if loss == "kl":
            target = softmax(outputs)
        elif loss == "ce":
            target = one_hot(labels, outputs.shape[-1])
        else:
            target = outputs if labels is None else labels
        graph = gradient_graph(prepared, loss, output, names, as_inputs=False)
        if graph.unsupported:
            first = next(iter(graph.unsupported.items()))
            raise UsageError(f"no gradient for '{first[0]}': no rule for {', '.join(first[1])}")
        session = sessions.open(graph.model)
        result = session.run({**calib.select(slice(None)), TARGET: target})
        by_name = dict(zip(session.output_names, result))
        return {w: by_name[graph.gradients[w]] for w in names}
    finally:
        sessions.close()
