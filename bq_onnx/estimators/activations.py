"""``activations``: no gradients, the input second moment ``E[x^2]`` per input channel of each weight's layer
(the GPTQ-style proxy). It is also the fallback for weights whose path to the loss crosses an op without a
gradient rule."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np

from bq_onnx.calibration import Calibration
from bq_onnx.context import WeightInfo
from bq_onnx.estimators.base import Batch, Estimator, PosteriorPart, Stage, sample_batches
from bq_onnx.graph import Reduction, activation_site, forward_model
from bq_onnx.posterior import SumAccumulator
from bq_onnx.runtimes.base import Session


class ActivationSums:
    """Per weight, the sum over samples of its layer input's squared values per input channel."""

    def __init__(self, stage: ActivationsStage) -> None:
        self.stage = stage
        self.sums = SumAccumulator()

    def update(self, batch: Batch) -> None:
        s = self.stage
        out = dict(zip(s.session.output_names, s.session.run(s.calib.feeds(batch.rows))))
        stats = {}
        for info in s.infos:
            name, how = s.sites[info.name]
            stats[info.name] = channel_energy(out[name], how, info)
        self.sums.update(stats, samples=batch.count)

    def merge(self, other: ActivationSums) -> ActivationSums:
        self.sums.merge(other.sums)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return self.sums.state()

    def finalize(self) -> PosteriorPart:
        s = self.stage
        mean = self.sums.mean()
        curvature = {info.name: expand_channels(mean[info.name], s.sites[info.name][1], info) for info in s.infos}
        return PosteriorPart(curvature, {info.name: "activations" for info in s.infos})


@dataclasses.dataclass
class ActivationsStage(Stage):
    """Batches of samples through the model, returning every weight's layer input."""

    session: Session
    infos: list[WeightInfo]
    sites: dict[str, tuple[str, Reduction]]  # weight -> (activation value name, how to reduce it)
    calib: Calibration
    batch_size: int
    desc: str = "activations"

    def accumulator(self) -> ActivationSums:
        return ActivationSums(self)

    def restore(self, state: Mapping[str, np.ndarray]) -> ActivationSums:
        acc = ActivationSums(self)
        acc.sums = SumAccumulator.restore(state)
        return acc

    def batches(self, samples: range) -> Iterator[Batch]:
        yield from sample_batches(samples, self.batch_size)


class Activations(Estimator):
    name = "activations"

    def stages(self) -> Iterator[Stage]:
        p = self.problem
        main = p.prepared.model.graph
        sites, seen = {}, []
        for info in self.weights:
            value, how = activation_site(info.value)
            if value is None or value.graph is not main or not value.name:  # read inside a subgraph, or no input
                self.notes.append(f"'{info.name}': no layer input of the main graph feeds it; no activations")
                continue
            sites[info.name] = (value.name, how)
            seen.append(info)
        if not seen:
            return
        session = p.sessions.open(forward_model(p.prepared.model, sorted({name for name, _ in sites.values()})))
        yield ActivationsStage(session, seen, sites, p.calib, p.calib.run_size(p.options.batch_size))


def channel_energy(x: np.ndarray, how: Reduction, info: WeightInfo) -> np.ndarray:
    """Sum over everything but the channel axis of x^2 (summed over the batch; the accumulator divides)."""
    kind, arg = how
    if kind == "tokens":
        vocab = info.layout.shape[0]
        return np.bincount(x.reshape(-1).astype(np.int64) % vocab, minlength=vocab).astype(np.float64)
    x = np.asarray(x, dtype=np.float64)
    axis = {"last": x.ndim - 1, "recurrent": x.ndim - 1, "second_last": x.ndim - 2, "axis": arg, "channels": 1,
            "in_channels": 1}[kind]
    other = tuple(a for a in range(x.ndim) if a != axis)
    return np.sum(np.square(x), axis=other)


def expand_channels(energy: np.ndarray, how: Reduction, info: WeightInfo) -> np.ndarray:
    """Per-channel input energy -> per-element curvature in the weight's own shape."""
    kind, arg = how
    shape = info.layout.shape
    if kind == "tokens":  # table [V, D]: every element of row v is read as often as token v
        return np.broadcast_to(energy[:, None], shape).astype(np.float64)
    if kind in ("last", "axis", "second_last") and len(shape) == 2 or kind == "recurrent":
        k, n = info.layout.view_shape
        view = np.broadcast_to(energy[:k, None], (k, n))
        return info.layout.from_view(np.ascontiguousarray(view))
    if kind == "in_channels":  # ConvTranspose [C_in, M/g, kh, kw]: element (c, ...) reads input channel c
        return np.broadcast_to(energy.reshape((-1,) + (1,) * (len(shape) - 1)), shape).astype(np.float64)
    if kind == "channels":  # Conv [M, C/g, kh, kw]: element (m, c) reads channel group(m) * C/g + c
        groups = arg
        m, c_local = shape[0], shape[1]
        per_group = m // groups
        channel = (np.arange(m)[:, None] // per_group) * c_local + np.arange(c_local)[None, :]
        return np.broadcast_to(energy[channel].reshape(m, c_local, *([1] * (len(shape) - 2))), shape).astype(
            np.float64
        )
    return np.broadcast_to(np.mean(energy), shape).astype(np.float64)
