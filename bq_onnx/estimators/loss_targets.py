"""What the loss graph compares the model's output with, per calibration sample: labels checked against the
outputs, pseudo-labels, labels drawn from the predictive distribution, or noisy regression targets."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from bq_onnx.autodiff.loss import LossPlan, Term
from bq_onnx.calibration import load_labels
from bq_onnx.errors import DataError
from bq_onnx.probabilities import one_hot, softmax
from bq_onnx.runs import Runs


def check_labels(labels: np.ndarray | None, outputs: np.ndarray | Runs, loss: str) -> np.ndarray | None:
    """``labels`` cut to the calibration samples and checked against the FP32 ``outputs`` for ``loss``."""
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        labels = load_labels(labels)
    if isinstance(outputs, Runs):
        return _run_labels(labels, outputs, loss)
    labels = np.asarray(labels)
    n = outputs.shape[0]
    if labels.shape[0] < n:
        raise DataError(f"labels: {labels.shape[0]} labels for {n} calibration samples")
    labels = labels[:n]
    if loss in ("mse", "smse", "cosine"):
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


def _run_labels(labels, outputs: Runs, loss: str) -> Runs:
    """Labels of an output kept per run: one array per run (a list), or one array over the runs' outputs stacked
    along their first axis (cut back at each run's length); each checked against its run's output."""
    if isinstance(labels, Runs):
        parts = labels.parts
    elif isinstance(labels, (list, tuple)) or (isinstance(labels, np.ndarray) and labels.dtype == object):
        parts = [np.asarray(p) for p in labels]
    else:
        labels = np.asarray(labels)
        lengths = [len(p) for p in outputs.parts]
        if labels.ndim == 0 or labels.shape[0] < sum(lengths):
            got = labels.shape[0] if labels.ndim else 0
            raise DataError(f"labels: the output is kept per run ({len(lengths)} runs, {sum(lengths)} rows along "
                            f"its first axis together); got {got} rows: give one array per run, or the runs' "
                            f"rows stacked")
        parts = np.split(labels[: sum(lengths)], np.cumsum(lengths)[:-1])
    if len(parts) < len(outputs.parts):
        raise DataError(f"labels: {len(parts)} label arrays for {len(outputs.parts)} calibration runs")
    checked = []
    for i, (part, out) in enumerate(zip(parts, outputs.parts)):
        try:
            checked.append(check_labels(part, out, loss))
        except DataError as exc:
            raise DataError(f"{exc} (run {i})") from None
    return Runs(checked, outputs.per)


def term_targets(method: str, term: Term, outputs: np.ndarray, labels: np.ndarray | None,
                 rng: np.random.Generator) -> np.ndarray:
    """Per calibration sample, one term's target for one gradient draw of ``method`` (``reference``: the FP32
    output's own target, as hutchinson uses).

    kl/ce: labels, the FP32 top-1 class (``laplace``), a class drawn from the FP32 distribution (``fisher-mc``)
    or the distribution itself (``hutchinson``); mse/smse: the FP32 output plus Gaussian noise of the channel's
    spread (unit for mse), so the squared gradients average to the Gauss-Newton diagonal of the Gaussian
    likelihood the loss is; cosine: the FP32 output plus Gaussian noise of the row's RMS, a Monte-Carlo
    surrogate (the cosine is no likelihood: its curvature is right up to a factor common to every weight)."""
    if term.kind in ("mse", "smse", "cosine"):
        if method in ("hutchinson", "reference"):
            return outputs if labels is None else labels
        if labels is not None and method == "laplace":
            return labels
        if term.kind == "mse":
            return outputs + rng.standard_normal(outputs.shape).astype(np.float32)
        if term.kind == "smse":
            spread = 1.0 / np.asarray(term.scale, dtype=np.float64)
            if term.axis is not None:
                spread = spread.reshape([len(spread)] + [1] * (outputs.ndim - 1 - term.axis))
            return (outputs + rng.standard_normal(outputs.shape) * spread).astype(np.float32)
        rms = np.sqrt(np.mean(np.square(outputs.astype(np.float64)), axis=-1, keepdims=True))
        return (outputs + rng.standard_normal(outputs.shape) * rms).astype(np.float32)
    probs = _distribution(outputs) if term.probabilities else softmax(outputs)
    classes = outputs.shape[-1]
    if method == "reference":  # the FP32 distribution; labels only for ce
        return one_hot(labels, classes) if term.kind == "ce" and labels is not None else probs
    if method == "hutchinson":
        return probs if labels is None else one_hot(labels, classes)
    if method == "fisher-mc":
        u = rng.random(probs.shape[:-1] + (1,))
        drawn = np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), classes - 1)
        return one_hot(drawn, classes)
    pseudo = labels if labels is not None else outputs.argmax(axis=-1)
    return one_hot(pseudo, classes)


def _distribution(y: np.ndarray) -> np.ndarray:
    """Probabilities as given, clipped at zero and renormalized (float rounding)."""
    p = np.clip(y.astype(np.float64), 0.0, None)
    return (p / np.maximum(p.sum(axis=-1, keepdims=True), 1e-30)).astype(np.float32)


def targets(method: str, plan: LossPlan | str, outputs: Sequence[np.ndarray] | np.ndarray,
            labels: np.ndarray | Runs | None, rng: np.random.Generator) -> np.ndarray | Runs:
    """Per calibration sample, the target fed to the loss graph for one gradient draw of ``method``: the one
    term's target, or every term's flattened target side by side (:func:`pack`). ``plan`` may be one kind."""
    if isinstance(plan, str):
        plan, outputs = LossPlan.single(plan), [outputs]
    if any(isinstance(y, Runs) for y in outputs):
        return _run_targets(method, plan, outputs, labels, rng)
    per = [term_targets(method, t, y, labels, rng) for t, y in zip(plan.terms, outputs)]
    return pack(per) if plan.packed else per[0]


def _run_targets(method: str, plan: LossPlan, outputs: Sequence[np.ndarray | Runs], labels: np.ndarray | Runs | None,
                 rng: np.random.Generator) -> Runs:
    """The target of each run from that run's own outputs (some kept per run: their first axis is not the
    samples, so a run's target has that run's shape): one term's target as it is, several terms' flattened whole
    and side by side in one ``[1, L]`` row (the loss graph cuts it at the outputs' sizes)."""
    runs = next(y for y in outputs if isinstance(y, Runs))
    per, parts = runs.per, []
    for i in range(len(runs)):
        rows = slice(i * per, (i + 1) * per)
        here = [y.parts[i] if isinstance(y, Runs) else y[rows] for y in outputs]
        label = None if labels is None else labels.parts[i] if isinstance(labels, Runs) else labels[rows]
        per_term = [term_targets(method, t, y, label, rng) for t, y in zip(plan.terms, here)]
        parts.append(np.concatenate([np.asarray(t, np.float32).reshape(-1) for t in per_term])[None]
                     if plan.packed else per_term[0])
    return Runs(parts, per)


def pack(per_term: Sequence[np.ndarray]) -> np.ndarray:
    """Several terms' targets ``[N, ...]`` as one ``[N, D_1 + D_2 + ...]`` (the loss graph slices them back)."""
    return np.concatenate([np.asarray(p, np.float32).reshape(len(p), -1) for p in per_term], axis=1)


class TargetDraws:
    """The targets of each Monte Carlo draw over all calibration samples, drawn from ``rng`` in draw order the
    first time a draw is asked for (so a stage's draws come where they always came in the generator's stream,
    and every shard of the stage reads the same targets)."""

    def __init__(self, method: str, loss: LossPlan | str, outputs: Sequence[np.ndarray] | np.ndarray,
                 labels: np.ndarray | None, rng: np.random.Generator) -> None:
        self.method, self.loss, self.outputs, self.labels, self.rng = method, loss, outputs, labels, rng
        self._drawn: list[np.ndarray] = []

    def __getitem__(self, draw: int) -> np.ndarray:
        while len(self._drawn) <= draw:
            self._drawn.append(targets(self.method, self.loss, self.outputs, self.labels, self.rng))
        return self._drawn[draw]
