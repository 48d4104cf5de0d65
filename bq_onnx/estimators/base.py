"""The shape every estimator shares: one :class:`Problem` it reads, :class:`Stage` s that each pass over the
calibration samples, and the :class:`Accumulator` a stage fills.

An accumulator is the seam for sharded posteriors: ``update(batch)`` adds one batch's statistics (sums of
squared per-sample gradients, K-FAC factor sums, activation second moments, and their sample counts),
``merge(other)`` adds another accumulator's, ``finalize()`` turns the sums into per-sample curvatures,
``state()`` gives the sums as named arrays (exact; a shard file or a worker's reply) and the stage's ``restore``
reads them back into an accumulator. Two
accumulators of one stage, fed disjoint sample ranges and merged, give what one accumulator fed both gives, up to
summation order (``tests/test_estimator_shards.py`` states the tolerances). Everything random (labels drawn for
``fisher-mc`` and ``kfac``, Hutchinson's probe vectors) belongs to the stage, not to the accumulator: loss
targets are drawn once per draw over all samples, so shards of one stage see the same targets as one pass.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar, Protocol

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.loss import LossPlan
from bq_onnx.calibration import Calibration
from bq_onnx.context import WeightInfo
from bq_onnx.estimators.loss_plan import reference_plan
from bq_onnx.estimators.loss_targets import check_labels
from bq_onnx.estimators.prepared import Prepared, gradient_graph
from bq_onnx.layout import WeightLayout
from bq_onnx.posterior import Spill
from bq_onnx.progress import progress
from bq_onnx.runtimes.sessions import TempSessions

if TYPE_CHECKING:
    from bq_onnx.autodiff.gradient import GradientGraph
    from bq_onnx.config import PosteriorConfig


@dataclasses.dataclass
class Problem:
    """One estimation: the prepared model, its calibration data, the options, and what the stages share."""

    prepared: Prepared
    calib: Calibration
    options: PosteriorConfig
    sessions: TempSessions
    rng: np.random.Generator
    progress: bool = False
    spill: Spill | None = None  # where big intermediate sums may go (the batched Fisher)
    plan: LossPlan | None = None  # the loss the gradient estimators fit, once one has resolved it

    @property
    def layouts(self) -> dict[str, WeightLayout]:
        return {w.name: w.layout for w in self.prepared.weights}


@dataclasses.dataclass(frozen=True)
class Batch:
    """Calibration samples ``rows`` (a contiguous range), and which target draw their loss reads (None: a
    forward-only batch, no loss)."""

    rows: slice
    draw: int | None = None

    @property
    def count(self) -> int:
        return self.rows.stop - self.rows.start


@dataclasses.dataclass
class PosteriorPart:
    """What a stage contributes: per-sample curvature per weight (in the weight's shape; a lazy mapping may
    compute each when read), the estimator each came from, and K-FAC factors where estimated."""

    curvature: Mapping[str, np.ndarray]
    sources: dict[str, str]
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


class Accumulator(Protocol):
    def update(self, batch: Batch) -> None: ...

    def merge(self, other: Accumulator) -> Accumulator: ...

    def finalize(self) -> PosteriorPart: ...

    def state(self) -> dict[str, np.ndarray]: ...


class Stage(abc.ABC):
    """One pass over the calibration samples with the sessions and targets it needs, built once."""

    desc: str = "posterior"
    calib: Calibration

    @abc.abstractmethod
    def accumulator(self) -> Accumulator:
        """A fresh, empty accumulator of this stage."""

    @abc.abstractmethod
    def batches(self, samples: range) -> Iterator[Batch]:
        """The batches over ``samples``, in the order one pass adds them."""

    @abc.abstractmethod
    def restore(self, state: Mapping[str, np.ndarray]) -> Accumulator:
        """An accumulator of this stage holding ``state`` (what an accumulator's ``state()`` gave)."""

    def settle(self) -> None:
        """Draw what a whole pass draws (each draw's targets) without running it: a process that runs none or
        only some of this stage's samples then leaves the generator where one pass leaves it, so the stages
        built after this one draw what they draw in one process."""
        return  # a stage that draws nothing

    def run(self, samples: range | None = None, bar: bool = False) -> Accumulator:
        """An accumulator updated with every batch over ``samples`` (default: all calibration samples)."""
        acc = self.accumulator()
        samples = range(self.calib.num_samples) if samples is None else samples
        for batch in progress(list(self.batches(samples)), self.desc, bar, unit="samples", size=lambda b: b.count):
            acc.update(batch)
        return acc


def sample_batches(samples: range, size: int, draw: int | None = None) -> Iterator[Batch]:
    """``samples`` in consecutive batches of at most ``size``."""
    for start in range(samples.start, samples.stop, size):
        yield Batch(slice(start, min(start + size, samples.stop)), draw)


class Estimator(abc.ABC):
    """A posterior estimator: the stages it runs for ``weights`` (default: all prepared weights), in order.

    ``stages`` is a generator, so a stage is built after the one before it has run (their random draws come in
    the same order as ever). Weights no stage covers fall back to the activations estimator.
    """

    name: ClassVar[str]

    def __init__(self, problem: Problem, weights: Sequence[WeightInfo] | None = None) -> None:
        self.problem = problem
        self.weights = list(problem.prepared.weights if weights is None else weights)
        self.notes: list[str] = []

    @abc.abstractmethod
    def stages(self) -> Iterator[Stage]: ...


class GradientEstimator(Estimator):
    """An estimator that differentiates the loss: it needs the FP32 outputs and the checked labels."""

    plan: LossPlan
    outputs: list[np.ndarray]  # per loss term, its FP32 (sliced) output on every calibration sample
    labels: np.ndarray | None

    def reference(self) -> None:
        """Resolve the loss (``--loss``, or the default rule) on the FP32 outputs; check the labels."""
        p, opts = self.problem, self.problem.options
        self.plan, self.outputs = reference_plan(p.sessions, p.prepared.model, opts.loss, opts.output, p.calib)
        p.plan = self.plan
        self.labels = check_labels(opts.labels, self.outputs[0], self.plan.terms[0].kind)

    def gradient_graph(self, names: list[str], probes: Sequence[str] = (), as_inputs: bool = False,
                       model: ir.Model | None = None) -> GradientGraph:
        """The gradient graph for weights ``names`` and ``probes``; weights without a gradient rule get a note
        (the activations estimator takes them)."""
        opts = self.problem.options
        graph = gradient_graph(self.problem.prepared, self.plan, opts.output, [*names, *probes], as_inputs, model)
        for weight, ops in graph.unsupported.items():
            if weight in names:
                why = [op if graph.reasons.get(op, "no rule") == "no rule" else f"{op} ({graph.reasons[op]})"
                       for op in ops]
                self.notes.append(f"'{weight}': no gradient rule for {', '.join(why)}; used the activations "
                                  f"estimator")
        return graph
