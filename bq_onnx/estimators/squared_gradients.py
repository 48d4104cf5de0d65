"""``laplace`` and ``fisher-mc``: the mean of squared per-sample gradients, the one method differing from the
other only in the loss targets (``laplace``: labels, or the FP32 model's top-1 class: the empirical Fisher;
``fisher-mc``: labels drawn from the model's predictive distribution: the true Fisher; for ``mse``/``smse``
terms without labels both use the FP32 output plus Gaussian noise of each channel's spread, the Gauss-Newton
diagonal; :func:`bq_onnx.estimators.loss_targets.term_targets` per loss term).

Weights :mod:`~bq_onnx.estimators.batched` covers are summed from batched runs; the rest one sample per run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from bq_onnx.autodiff.loss import TARGET
from bq_onnx.calibration import Calibration
from bq_onnx.estimators.base import Batch, GradientEstimator, PosteriorPart, Stage, sample_batches
from bq_onnx.estimators.batched import BatchedFisherStage, BatchedGraph
from bq_onnx.estimators.loss_targets import TargetDraws
from bq_onnx.graph import specialise
from bq_onnx.model_io import copy_model
from bq_onnx.posterior import SumAccumulator
from bq_onnx.runtimes.base import Session

SPARSE_SHARE = 0.25
"""A gradient whose non-zero rows are at most this share of its rows is summed row by row (see :func:`add_squares`)."""


def add_squares(sums: SumAccumulator, gradients: Mapping[str, np.ndarray], samples: int) -> None:
    """``sums.update({w: g**2})``, the same float64 sums bit for bit, without its float64 copy of every square.

    Why: a Gather table's per-sample gradient is zero outside the sample's tokens (paraphrase-MiniLM-L3-v2: 30522
    rows of which a sentence touches a few dozen), yet squaring it, copying the squares to float64 and adding them
    cost about 20 ms a sample. Rows that are all zero add ``+0.0`` to non-negative sums, which changes nothing, so
    only the other rows are added (``float32 square`` cast to float64 in the add, as ``update`` casts it first)."""
    for name, grad in gradients.items():
        g = np.asarray(grad)
        total = sums.sums.get(name)
        if total is None or g.ndim < 2 or g.dtype != np.float32 or total.shape != g.shape:
            sums.update({name: np.square(g)}, samples=0)
            continue
        rows = np.flatnonzero(g.reshape(g.shape[0], -1).any(axis=1))
        if rows.size <= SPARSE_SHARE * g.shape[0]:
            total[rows] += np.square(g[rows])
        else:
            np.add(total, np.square(g), out=total)
    sums.count += samples


class SquaredGradientSums:
    """Sums of squared per-sample weight gradients from one-sample runs of a gradient graph."""

    def __init__(self, stage: PerSampleStage) -> None:
        self.stage = stage
        self.sums = SumAccumulator()

    def update(self, batch: Batch) -> None:
        s = self.stage
        result = s.session.run({**s.calib.feeds(batch.rows), TARGET: s.targets[batch.draw][batch.rows]})
        by_name = dict(zip(s.session.output_names, result))
        add_squares(self.sums, {w: by_name[s.gradients[w]] for w in s.wrt}, samples=batch.count)

    def merge(self, other: SquaredGradientSums) -> SquaredGradientSums:
        self.sums.merge(other.sums)
        return self

    def finalize(self) -> PosteriorPart:
        return PosteriorPart(self.sums.mean(), {w: self.stage.source for w in self.stage.wrt})

    def state(self) -> dict[str, np.ndarray]:
        return self.sums.state()


@dataclasses.dataclass
class PerSampleStage(Stage):
    """Every draw, every sample on its own through a gradient graph specialised to batch 1."""

    session: Session
    gradients: dict[str, str]
    wrt: list[str]
    calib: Calibration
    targets: TargetDraws
    draws: int
    source: str

    def __post_init__(self) -> None:
        self.desc = self.source

    def accumulator(self) -> SquaredGradientSums:
        return SquaredGradientSums(self)

    def restore(self, state: Mapping[str, np.ndarray]) -> SquaredGradientSums:
        acc = SquaredGradientSums(self)
        acc.sums = SumAccumulator.restore(state)
        return acc

    def settle(self) -> None:
        for draw in range(self.draws):
            self.targets[draw]

    def batches(self, samples: range) -> Iterator[Batch]:
        for draw in range(self.draws):  # one sample per run (one fixed batch, for a fixed-batch model)
            yield from sample_batches(samples, self.calib.run_size(1), draw)


class SquaredGradients(GradientEstimator):
    """Mean squared per-sample gradients against this estimator's targets (``name``)."""

    def stages(self) -> Iterator[Stage]:
        p, opts = self.problem, self.problem.options
        self.reference()
        names = [w.name for w in self.weights]
        batch = min(opts.batch_size, p.calib.num_samples) if not p.calib.fixed_batch else 1  # per run
        graph = (BatchedGraph.build(p.sessions, p.prepared, p.calib, self.plan, opts.output, batch)
                 if batch > 1 else None)
        if graph is not None:
            targets = TargetDraws(self.name, self.plan, self.outputs, self.labels, p.rng)
            yield BatchedFisherStage(graph, p.calib, targets, opts.mc_samples, self.name, p.spill)
            names = [w for w in names if w not in graph.covered]
        if not names:
            return
        model = specialise(copy_model(p.prepared.model), p.calib.run_shapes())
        loop = self.gradient_graph(names, model=model)
        wrt = [w for w in names if w in loop.gradients]
        if wrt:
            targets = TargetDraws(self.name, self.plan, self.outputs, self.labels, p.rng)
            yield PerSampleStage(p.sessions.open(loop.model), dict(loop.gradients), wrt, p.calib, targets,
                                 opts.mc_samples, self.name)


class Laplace(SquaredGradients):
    name = "laplace"


class FisherMC(SquaredGradients):
    name = "fisher-mc"
