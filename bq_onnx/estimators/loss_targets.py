"""What the loss graph compares the model's output with, per calibration sample: labels checked against the
outputs, pseudo-labels, labels drawn from the predictive distribution, or noisy regression targets."""

from __future__ import annotations

import os

import numpy as np

from bq_onnx.calibration import load_labels
from bq_onnx.errors import DataError
from bq_onnx.probabilities import one_hot, softmax


def check_labels(labels: np.ndarray | None, outputs: np.ndarray, loss: str) -> np.ndarray | None:
    """``labels`` cut to the calibration samples and checked against the FP32 ``outputs`` for ``loss``."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels)
    labels = np.asarray(labels)
    n = outputs.shape[0]
    if labels.shape[0] < n:
        raise DataError(f"labels: {labels.shape[0]} labels for {n} calibration samples")
    labels = labels[:n]
    if loss == "mse":
        if labels.shape != outputs.shape:
            raise DataError(f"labels: shape {list(labels.shape)} differs from the output's {list(outputs.shape)}")
        return labels.astype(np.float32)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels: class labels must be integers, got {labels.dtype}")
    if labels.shape != outputs.shape[:-1]:
        raise DataError(f"labels: shape {list(labels.shape)}, expected {list(outputs.shape[:-1])}")
    classes = outputs.shape[-1]
    if labels.min() < 0 or labels.max() >= classes:
        raise DataError(f"labels: values must be in [0, {classes - 1}]")
    return labels


def targets(method: str, loss: str, outputs: np.ndarray, labels: np.ndarray | None,
            rng: np.random.Generator) -> np.ndarray:
    """Per calibration sample, the target fed to the loss graph for one gradient draw of ``method``."""
    if loss == "mse":
        if method == "hutchinson":
            return outputs if labels is None else labels
        if labels is not None and method == "laplace":
            return labels
        return outputs + rng.standard_normal(outputs.shape).astype(np.float32)
    probs = softmax(outputs)
    classes = outputs.shape[-1]
    if method == "hutchinson":
        return probs if labels is None else one_hot(labels, classes)
    if method == "fisher-mc":
        u = rng.random(probs.shape[:-1] + (1,))
        drawn = np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), classes - 1)
        return one_hot(drawn, classes)
    pseudo = labels if labels is not None else outputs.argmax(axis=-1)
    return one_hot(pseudo, classes)


class TargetDraws:
    """The targets of each Monte Carlo draw over all calibration samples, drawn from ``rng`` in draw order the
    first time a draw is asked for (so a stage's draws come where they always came in the generator's stream,
    and every shard of the stage reads the same targets)."""

    def __init__(self, method: str, loss: str, outputs: np.ndarray, labels: np.ndarray | None,
                 rng: np.random.Generator) -> None:
        self.method, self.loss, self.outputs, self.labels, self.rng = method, loss, outputs, labels, rng
        self._drawn: list[np.ndarray] = []

    def __getitem__(self, draw: int) -> np.ndarray:
        while len(self._drawn) <= draw:
            self._drawn.append(targets(self.method, self.loss, self.outputs, self.labels, self.rng))
        return self._drawn[draw]
