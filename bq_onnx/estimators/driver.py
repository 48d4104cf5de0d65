"""One estimation from start to finish: load the calibration data, run the chosen estimator's stages, give the
weights none covered to the activations estimator, and finish each weight's posterior on disk.

Every stage runs over the calibration samples in shards of :func:`shard_samples` samples, each into a fresh
accumulator, merged in shard order: a :class:`Runner` decides where the shards run (here, in worker processes,
on Ray: :mod:`bq_onnx.distributed`), never what they add up to, so the posterior's bytes do not depend on it.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np

from bq_onnx.blas import single_threaded
from bq_onnx.calibration import Calibration, CalibrationSource, load_calibration
from bq_onnx.config import PosteriorConfig, WeightsConfig
from bq_onnx.context import WeightInfo
from bq_onnx.estimators.activations import Activations
from bq_onnx.estimators.base import Accumulator, Estimator, Problem, Stage
from bq_onnx.estimators.prepared import ModelSource, Prepared, prepare
from bq_onnx.estimators.registry import REGISTRY
from bq_onnx.estimators.unseen_rows import fill_unseen_rows, row_counts, table_rows
from bq_onnx.posterior import Posterior, Spill
from bq_onnx.runtimes.sessions import TempSessions
from bq_onnx.spilling import SpilledArrays, spilled_posterior

CHANNEL_FLOOR = 0.1
"""Least mean curvature of an output channel, as a fraction of its tensor's typical channel (the curvature-weighted
median of the channel means, so the level of the channels the data exercise even where most are silent). A
classifier's column for a class calibration never shows gets near-zero Fisher curvature and would be stored at 0
bits; a deployed model meets that class. At 0.1 such a channel sits about log4(10) = 1.7 bits below the typical one
in the allocation (uniform quantization noise falls as 4^-bits), low but never "free"; genuine differences of less
than 10x between channels are left alone."""

#: Posterior sources that are not a gradient-based curvature (their scale is not the Fisher's).
NO_GRADIENT_SOURCES = frozenset({"activations", "mean"})

#: Calibration samples per shard: the unit that workers share out. Fixed (``BQ_ONNX_SHARD_SAMPLES`` overrides it),
#: not derived from the number of workers, so one process and any number of workers add the same shards in the
#: same order. 256 keeps a shard's accumulator (up to twice the weights, float64) busy for long enough to pay
#: for sending it, and a run of up to 256 samples is one shard, computed exactly as one pass.
SHARD_SAMPLES = 256


def shard_samples() -> int:
    """:data:`SHARD_SAMPLES`, or ``BQ_ONNX_SHARD_SAMPLES`` when set (a positive integer)."""
    value = os.environ.get("BQ_ONNX_SHARD_SAMPLES", "")
    return int(value) if value.isdigit() and int(value) > 0 else SHARD_SAMPLES


def shard_ranges(num_samples: int, count: int | None = None, unit: int = 1) -> list[range]:
    """Consecutive sample ranges: of :func:`shard_samples` samples each (rounded up to whole ``unit`` s), or
    ``count`` ranges as equal as whole ``unit`` s allow (runs of a fixed batch, a stage's batches). Never an empty
    range."""
    if count is None:
        size = -(-shard_samples() // unit) * unit
        return [range(s, min(s + size, num_samples)) for s in range(0, num_samples, size)]
    units = -(-num_samples // unit)
    cuts = [min(unit * (units * i // count), num_samples) for i in range(count + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


@dataclasses.dataclass(frozen=True)
class Task:
    """Which stage an accumulation belongs to: stage ``stage`` of the chosen estimator (``phase`` "main"), or of
    the activations fallback for the weights ``rest`` (``phase`` "rest"). A worker rebuilds the stage from it."""

    phase: str
    stage: int
    rest: tuple[str, ...] = ()


class Runner(Protocol):
    """Where a stage's shards run; the accumulator it returns holds every shard, merged in shard order."""

    def accumulate(self, stage: Stage, task: Task, bar: bool) -> Accumulator: ...


class LocalRunner:
    """Every shard in this process, one after the other."""

    def accumulate(self, stage: Stage, task: Task, bar: bool) -> Accumulator:
        total = None
        for rows in shard_ranges(stage.calib.num_samples, unit=stage.calib.run_size(1)):
            acc = stage.run(rows, bar)
            total = acc if total is None else total.merge(acc)
        return total


def estimate_posterior(
    model: ModelSource,
    calibration: CalibrationSource | Calibration,
    method: str | None = None,
    *,
    weights: WeightsConfig | None = None,
    progress_bar: bool = False,
    **options: object,
) -> Posterior:
    """A diagonal Gaussian posterior over every quantizable weight of ``model`` from calibration data.

    ``options`` are the fields of :class:`bq_onnx.config.PosteriorConfig` (loss, labels, output, prior_precision,
    probes, mc_samples, calib_samples, batch_size, seed); ``weights`` chooses which tensors are weights.
    ``bq_onnx.estimate_posterior`` (:func:`bq_onnx.distributed.estimate_posterior`) also takes ``workers`` and
    ``ray``; inside :func:`bq_onnx.distributed.distributed` this one runs on the workers it set up.
    """
    opts = PosteriorConfig(**({"method": method} if method is not None else {}), **options)
    prepared = prepare(model, weights)
    return estimate_prepared(prepared, calibration, opts, progress_bar)


def problems(prepared: Prepared, calib: Calibration, opts: PosteriorConfig, sessions: TempSessions,
             progress_bar: bool, spill: Spill) -> tuple[Problem, Problem]:
    """The problem of the activations fallback, and the chosen estimator's (every process of a sharded run builds
    both alike): weights owned by a subgraph are read from the main graph in the estimators' copy (the gradient
    rules of If, and Loop/Scan unrolled or differentiated by their body, reach them there)."""
    if opts.cache is not None:
        prepared = dataclasses.replace(prepared, cache=opts.cache)
    problem = Problem(prepared, calib, opts, sessions, np.random.default_rng(opts.seed), progress_bar, spill)
    return problem, dataclasses.replace(problem, prepared=hoisted(prepared))


#: Within :func:`bq_onnx.distributed.distributed`: what makes the runner of one estimation (a context manager
#: yielding a :class:`Runner`: worker processes or Ray tasks); None runs the shards in this process. Set from
#: there, so that this module never imports the workers' code (which builds on this one).
RUNNER_FACTORY: contextvars.ContextVar[Callable[..., AbstractContextManager[Runner]] | None] = contextvars.ContextVar(
    "bq_onnx_runner_factory", default=None)


def estimate_prepared(
    prepared: Prepared, calibration: CalibrationSource | Calibration, opts: PosteriorConfig, progress_bar: bool,
    runner: Runner | None = None,
) -> Posterior:
    """The estimator on a model already prepared by the pipeline (used by ``optimize --calib``); ``runner``
    (default: this process, or the workers :func:`bq_onnx.distributed.distributed` set up) runs the shards."""
    calib = load_calibration(calibration, prepared.model, opts.calib_samples)
    factory = RUNNER_FACTORY.get()
    with single_threaded():
        if runner is not None or factory is None:
            return _estimate(prepared, calib, opts, progress_bar, runner or LocalRunner())
        with factory(prepared, calib, opts) as chosen:
            return _estimate(prepared, calib, opts, progress_bar, chosen)


def _estimate(prepared: Prepared, calib: Calibration, opts: PosteriorConfig, progress_bar: bool,
              runner: Runner) -> Posterior:
    sessions = TempSessions()
    spill = Spill()  # every weight's curvature goes to disk as soon as it is known; the posterior reads it back
    problem, main_problem = problems(prepared, calib, opts, sessions, progress_bar, spill)
    found = _Found(SpilledArrays(spill), runner)
    try:
        estimator = REGISTRY[opts.method](main_problem) if prepared.weights else None
        if estimator is not None:
            found.run(estimator, Task("main", 0), progress_bar)
        rest = [w for w in prepared.weights if w.name not in found.curvature]
        if rest:
            found.run(Activations(problem, rest), Task("rest", 0, tuple(w.name for w in rest)), progress_bar)
    finally:
        sessions.close()
    for w in prepared.weights:  # a branch no calibration sample takes: the data say nothing about its weights
        # (not "unimportant", which would store them at the fewest bits)
        if w.scope and w.name in found.curvature and not np.any(found.curvature[w.name]):
            del found.curvature[w.name]
            found.notes.append(f"'{w.name}' (inside {w.scope}): its gradient is zero on every calibration sample "
                               f"(a branch the data never take, or a state that is always zero)")
    fill_uncovered(prepared.weights, found)
    curvature, sources, factors, notes = found.curvature, found.sources, found.factors, found.notes
    weights = {}
    for info in prepared.weights:  # one weight at a time: read its curvature, finish it, write it back
        raw = curvature[info.name]
        table = table_rows(info)
        counts = row_counts(info, calib) if table else None
        filled = fill_unseen_rows(raw, counts) if table else None
        if filled is not None:
            raw, count, how = filled
            notes.append(f"'{info.name}': {count} embedding row(s) never read by the calibration data were given "
                         f"{how}")
        # rows counted: each row's curvature is its measured use, and the unread ones are filled by the count; a
        # floor from the typical row (the frequent tokens') would undo it
        floored = floor_silent_channels(info, raw) if counts is None else None
        if floored is not None:
            raw, count = floored
            notes.append(f"'{info.name}': {count} output channel(s) the calibration data barely exercise were "
                         f"floored to {CHANNEL_FLOOR:g} of the tensor's typical channel curvature")
        weights[info.name] = spilled_posterior(info.value.const_value, raw, calib.num_samples, opts.prior_precision,
                                               sources[info.name], spill, curvature.path(info.name))
        del raw, filled, floored
        if info.name in factors:
            weights[info.name].kfac = factors[info.name]
    plan = main_problem.plan or problem.plan  # the estimator resolved the loss on the main graph's problem
    loss = plan.describe() if plan is not None else None
    return Posterior(opts.method, calib.num_samples, opts.prior_precision, weights, notes, loss)


def stages_of(estimator: Estimator) -> Iterator[Stage]:
    """``estimator``'s stages, each settled (its draws taken) before the next is built, as one pass leaves them."""
    for stage in estimator.stages():
        yield stage
        stage.settle()


def hoisted(prepared: Prepared) -> Prepared:
    """``prepared`` with the weights stored in subgraphs moved to the main graph's initializers (on a copy; the
    subgraphs read them from the outer scope, which computes the same): the estimators find every weight there."""
    scoped = [w.name for w in prepared.weights if w.scope]
    if not scoped:
        return prepared
    from bq_onnx.autodiff.gradient import hoist_initializers
    from bq_onnx.model_io import copy_model

    model = copy_model(prepared.model)
    hoist_initializers(model.graph, scoped)
    inits = model.graph.initializers
    return dataclasses.replace(prepared, model=model,
                               weights=[dataclasses.replace(w, value=inits[w.name]) for w in prepared.weights])


@dataclasses.dataclass
class _Found:
    """What the estimators found so far: curvatures (on disk), their sources, K-FAC factors, notes."""

    curvature: SpilledArrays
    runner: Runner = dataclasses.field(default_factory=LocalRunner)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)

    def run(self, estimator: Estimator, task: Task, bar: bool) -> None:
        """Run ``estimator``'s stages in turn; each stage's curvatures go to disk before the next stage starts."""
        for index, stage in enumerate(estimator.stages()):
            part = self.runner.accumulate(stage, dataclasses.replace(task, stage=index), bar).finalize()
            self.curvature.update(part.curvature)
            self.sources.update(part.sources)
            self.factors.update(part.factors)
        self.notes.extend(estimator.notes)


def fill_uncovered(weights: list[WeightInfo], found: _Found) -> None:
    """Weights no estimator could see (inside a subgraph, or behind a layer whose input is not observable) get
    the mean curvature of those that were seen (of the gradient-covered ones where there are any, so the level is
    the Fisher's): the data say nothing about them, so they count as average."""
    left = [w for w in weights if w.name not in found.curvature]
    if not left:
        return
    # the level of the gradient-covered weights where there are any: E[x^2] (activations) is on another scale
    seen = [w for w in weights if w.name in found.curvature]
    graded = [w for w in seen if found.sources.get(w.name) not in NO_GRADIENT_SOURCES]
    means = [(float(np.mean(found.curvature[w.name])), w.numel) for w in graded or seen]
    level = sum(m * n for m, n in means) / sum(n for _, n in means) if means else 1.0
    found.curvature.update({w.name: np.full(w.layout.shape, level, dtype=np.float64) for w in left})
    for w in left:
        found.sources[w.name] = "mean"
        where = f" (inside {w.scope})" if w.scope else ""
        found.notes.append(f"'{w.name}'{where}: no estimator sees this weight; given the mean curvature of the "
                           f"others")


def floor_silent_channels(info: WeightInfo, curvature: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Output channels whose mean curvature is below :data:`CHANNEL_FLOOR` of the tensor's typical channel are
    shifted up so their mean is that floor: calibration that never exercises a channel (a class never predicted)
    says nothing about it, which must not read as "unimportant". One pass over the curvature; None: unchanged."""
    raw = np.asarray(curvature, dtype=np.float64)
    view = info.layout.to_view(raw)
    if view.ndim != 2 or view.shape[1] < 2:
        return None
    means = view.mean(axis=0)
    level = weighted_median(means)
    if not level > 0:
        return None
    floor = CHANNEL_FLOOR * level
    low = means < floor
    if not low.any():
        return None
    view = view.copy()
    view[:, low] += floor - means[low]
    return info.layout.from_view(view).reshape(raw.shape), int(low.sum())


def weighted_median(values: np.ndarray) -> float:
    """The value below which half of the total lies (values >= 0): the typical level of what carries the mass,
    however many near-zero values there are."""
    order = np.sort(np.asarray(values, dtype=np.float64))
    total = order.sum()
    if not total > 0:
        return 0.0
    return float(order[np.searchsorted(np.cumsum(order), 0.5 * total)])
