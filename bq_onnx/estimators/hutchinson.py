"""``hutchinson``: diag(H) ~ E[v * Hv] with Rademacher ``v`` and Hv by central finite differences of gradients of
the loss against fixed targets (the ``--loss`` terms against the FP32 outputs: the KL to the FP32 distribution
on a classifier, whose Hessian at the trained weights is the Fisher, so this estimates the same matrix with a
different estimator), then a rank-1 fit per weight.

Shards: each batch draws its probe vectors from a generator keyed by the stage's seed and the batch's first
sample, so shards of one stage that split on batch boundaries draw the probes one pass draws, in any process and
any order, and merge to its numbers up to float64 summation order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from bq_onnx.autodiff.loss import TARGET
from bq_onnx.calibration import Calibration
from bq_onnx.estimators.base import Batch, GradientEstimator, PosteriorPart, Stage, sample_batches
from bq_onnx.estimators.loss_targets import targets
from bq_onnx.layout import WeightLayout
from bq_onnx.posterior import SumAccumulator
from bq_onnx.runtimes.base import Session

#: Relative size of the finite-difference step for Hessian-vector products (times the weight's RMS).
HVP_STEP = 1e-3


class HutchinsonSums:
    """Sums over samples of ``v * Hv`` per weight (Hessian of the batch sum, averaged over the probes)."""

    def __init__(self, stage: HutchinsonStage) -> None:
        self.stage = stage
        self.sums = SumAccumulator()

    def update(self, batch: Batch) -> None:
        """Probes perturb one weight tensor at a time: a joint probe over all tensors adds the couplings between
        tensors to every estimate as zero-mean noise that, in a 60k-weight LeNet, needs hundreds of probes to
        average out (measured: 2.3x off the exact last-layer Fisher with 8 joint probes, 1.01x with per-tensor
        ones). It costs two gradient runs per tensor per probe and batch."""
        s = self.stage
        feeds = s.calib.feeds(batch.rows)
        feeds[TARGET] = s.targets[batch.rows]
        stats = {w: np.zeros(s.base[w].shape) for w in s.wrt}
        rng = np.random.default_rng([s.seed, batch.rows.start])  # this batch's probes, wherever it runs
        for _ in range(s.probes):
            for w in s.wrt:
                v = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=s.base[w].shape)
                g = s.gradients[w]
                plus = dict(zip(s.session.output_names, s.session.run({**feeds, w: s.base[w] + s.steps[w] * v})))[g]
                minus = dict(zip(s.session.output_names, s.session.run({**feeds, w: s.base[w] - s.steps[w] * v})))[g]
                hv = (plus.astype(np.float64) - minus.astype(np.float64)) / (2.0 * float(s.steps[w]))
                stats[w] += v * hv / s.probes
        self.sums.update(stats, samples=batch.count)

    def merge(self, other: HutchinsonSums) -> HutchinsonSums:
        self.sums.merge(other.sums)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return self.sums.state()

    def finalize(self) -> PosteriorPart:
        mean = self.sums.mean()
        layouts = self.stage.layouts
        return PosteriorPart({w: rank_one_smooth(d, layouts[w]) for w, d in mean.items()},
                             {w: "hutchinson" for w in self.stage.wrt})


@dataclasses.dataclass
class HutchinsonStage(Stage):
    """Batches of samples through a gradient graph that takes the weights as inputs."""

    session: Session
    gradients: dict[str, str]
    wrt: list[str]
    calib: Calibration
    targets: np.ndarray
    base: dict[str, np.ndarray]
    layouts: dict[str, WeightLayout]
    probes: int
    batch_size: int
    seed: int  # with a batch's first sample, the seed of the batch's probe vectors
    desc: str = "hutchinson"

    def __post_init__(self) -> None:
        self.steps = {w: np.float32(HVP_STEP * max(float(np.sqrt(np.mean(np.square(v)))), 1e-8))
                      for w, v in self.base.items()}

    def accumulator(self) -> HutchinsonSums:
        return HutchinsonSums(self)

    def restore(self, state: Mapping[str, np.ndarray]) -> HutchinsonSums:
        acc = HutchinsonSums(self)
        acc.sums = SumAccumulator.restore(state)
        return acc

    def batches(self, samples: range) -> Iterator[Batch]:
        yield from sample_batches(samples, self.batch_size)


class Hutchinson(GradientEstimator):
    name = "hutchinson"

    def stages(self) -> Iterator[Stage]:
        p, opts = self.problem, self.problem.options
        self.reference()
        names = [w.name for w in self.weights]
        graph = self.gradient_graph(names, as_inputs=True) if names else None
        wrt = [w for w in names if w in graph.gradients] if graph is not None else []
        if not wrt:
            return
        fixed = targets("hutchinson", self.plan, self.outputs, self.labels, p.rng)
        values = {w.name: w.value for w in self.weights}
        base = {w: np.asarray(values[w].const_value.numpy(), dtype=np.float32) for w in wrt}
        yield HutchinsonStage(p.sessions.open(graph.model), dict(graph.gradients), wrt, p.calib, fixed, base,
                              p.layouts, opts.probes, p.calib.run_size(opts.batch_size),
                              int(p.rng.integers(2**63)))


def rank_one_smooth(raw: np.ndarray, layout: WeightLayout) -> np.ndarray:
    """Denoise a per-element Hutchinson diagonal by its rank-1 fit ``F[k, n] ~ r[k] c[n]`` in the (K, N) view.

    Per element, v * Hv is unbiased but so noisy at a few probes that clipping its negative values at zero
    (a variance cannot be negative) inflates every layer's curvature several-fold (LeNet fc1: 6x). Row and
    column sums average that noise away; their outer product, scaled to the raw total, keeps each layer's
    unbiased trace and the per-input-feature and per-output-channel profile that the diagonal Fisher of a
    linear layer has (``E[a_k^2] E[g_n^2]`` under K-FAC's independence assumption).
    """
    view = layout.to_view(np.asarray(raw, dtype=np.float64))
    total = float(view.sum())
    rows, cols = np.maximum(view.sum(axis=1), 0.0), np.maximum(view.sum(axis=0), 0.0)
    if total <= 0 or rows.sum() <= 0 or cols.sum() <= 0:
        return np.zeros(layout.shape)
    return layout.from_view(np.outer(rows, cols) * (total / (rows.sum() * cols.sum())))
