"""Gradients of a loss over one batch with respect to weights: the public ``bq_onnx.gradients``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bq_onnx.autodiff.loss import TARGET
from bq_onnx.calibration import load_calibration
from bq_onnx.config import PosteriorConfig, WeightsConfig
from bq_onnx.errors import UsageError
from bq_onnx.estimators.loss_plan import reference_plan
from bq_onnx.estimators.loss_targets import check_labels, targets
from bq_onnx.estimators.prepared import ModelSource, gradient_graph, prepare
from bq_onnx.loss_spec import parse_loss
from bq_onnx.runtimes.sessions import TempSessions


def gradients(
    model: ModelSource,
    feeds: Mapping[str, np.ndarray],
    *,
    loss: str | Sequence[str] | None = None,
    labels: np.ndarray | None = None,
    wrt: Sequence[str] | None = None,
    output: str | None = None,
    weights: WeightsConfig | None = None,
) -> dict[str, np.ndarray]:
    """Gradients of the loss over the batch ``feeds`` with respect to weights (default: all quantizable ones).

    ``loss``: what ``--loss`` takes (one string or a list of terms; default: the default rule of
    :mod:`bq_onnx.estimators.loss_plan`): ``kl`` (to the FP32 model's own output distribution; zero at the
    trained weights, useful at perturbed ones), ``ce`` (cross-entropy to integer ``labels``), ``mse`` (to
    ``labels``, or to the FP32 output without labels), ``smse``, ``cosine`` (to the FP32 output).
    """
    spec = parse_loss(loss)
    PosteriorConfig(loss=spec, labels=labels)  # the same checks as the option (ce needs labels, ...)
    prepared = prepare(model, weights)
    names = list(wrt) if wrt is not None else [w.name for w in prepared.weights]
    known = {n for g in (prepared.model.graph, *prepared.model.graph.subgraphs()) for n in g.initializers}
    missing = [n for n in names if n not in known]  # a subgraph's weight is differentiated too
    if missing:
        raise UsageError(f"not an initializer of the model: {', '.join(missing)}")
    calib = load_calibration(dict(feeds), prepared.model)
    sessions = TempSessions()
    try:
        plan, outputs = reference_plan(sessions, prepared.model, spec, output, calib, batch=calib.num_samples)
        labels = check_labels(labels, outputs[0], plan.terms[0].kind)
        target = targets("reference", plan, outputs, labels, np.random.default_rng(0))
        graph = gradient_graph(prepared, plan, output, names, as_inputs=False)
        if graph.unsupported:
            first = next(iter(graph.unsupported.items()))
            raise UsageError(f"no gradient for '{first[0]}': no rule for {', '.join(first[1])}")
        session = sessions.open(graph.model)
        result = session.run({**calib.feeds(slice(None)), TARGET: target})
        by_name = dict(zip(session.output_names, result))
        return {w: by_name[graph.gradients[w]] for w in names}
    finally:
        sessions.close()
