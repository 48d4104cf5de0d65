"""The batched Fisher diagonal: ``sum_n g_n^2`` of the weights :mod:`bq_onnx.estimators.per_sample` covers, from
gradient runs on many samples at once (each sample's weight gradient formed from its layer input and output
gradient), for ``laplace`` and ``fisher-mc``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from bq_onnx.autodiff.loss import TARGET, LossPlan
from bq_onnx.calibration import Calibration
from bq_onnx.estimators.base import Batch, PosteriorPart, Stage, sample_batches
from bq_onnx.estimators.loss_targets import TargetDraws
from bq_onnx.estimators.memory import activation_bytes_per_sample, adapted_batch
from bq_onnx.estimators.per_sample import covers, squared_gradient_sum
from bq_onnx.estimators.prepared import Prepared, gradient_graph
from bq_onnx.estimators.probes import ProbeSite, add_probes
from bq_onnx.graph import all_values, batch_major_weights, forget_shapes, weights_of
from bq_onnx.layout import WeightLayout
from bq_onnx.model_io import copy_model
from bq_onnx.posterior import Spill
from bq_onnx.runtimes.base import Session
from bq_onnx.runtimes.sessions import TempSessions
from bq_onnx.spilling import LazyArrays


@dataclasses.dataclass
class BatchedGraph:
    """A gradient graph with respect to output probes, run on ``batch`` samples at a time, that also returns
    every probed layer's input."""

    session: Session
    sites: list[ProbeSite]
    gradients: dict[str, str]
    layouts: dict[str, WeightLayout]
    batch: int
    constants: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # layer inputs the model holds

    @classmethod
    def build(cls, sessions: TempSessions, prepared: Prepared, calib: Calibration, loss: LossPlan | str,
              output: str | None, batch: int) -> BatchedGraph | None:
        """The gradient graph at ``batch`` samples, or fewer where that many samples' activations and gradients
        would exceed :func:`~bq_onnx.estimators.memory.activation_budget`; None when no weight is covered."""
        model = copy_model(prepared.model)  # one copy serves the batch check and the gradient graph
        batch_major = batch_major_weights(model, prepared.weights, calib)
        if not batch_major:
            return None
        batch = adapted_batch(activation_bytes_per_sample(model, calib), batch)
        forget_shapes(model)  # the symbolic shapes give way to the batch's static ones
        sites = add_probes(model, weights_of(model, prepared.weights), next(calib.batches(batch)), gather=True)
        sites = [s for s in sites if s.weight in batch_major and covers(s, batch_major[s.weight])]
        if not sites:
            return None
        probes = list(dict.fromkeys(s.probe for s in sites))  # lookups summed by one Add share its probe
        graph = gradient_graph(prepared, loss, output, probes, as_inputs=False, model=model)
        sites = [s for s in sites if s.probe in graph.gradients]
        if not sites:
            return None
        values = {v.name: v for v in all_values(graph.model)}
        inputs = {v.name for v in graph.model.graph.inputs}
        present = {v.name for v in graph.model.graph.outputs}
        held = graph.model.graph.initializers
        constants = {name: held[name].const_value.numpy() for name in {s.activation for s in sites} - inputs
                     if name in held and held[name].const_value is not None}  # e.g. BERT's position ids
        for name in sorted({s.activation for s in sites} - inputs - present - set(constants)):
            graph.model.graph.outputs.append(values[name])
        layouts = {w.name: w.layout for w in prepared.weights}
        return cls(sessions.open(graph.model), sites, dict(graph.gradients), layouts, batch, constants)

    @property
    def covered(self) -> list[str]:
        return [s.weight for s in self.sites]


class BatchedFisher:
    """Sums of ``g_n^2`` per covered weight in its ``(K, N)`` view, and the number of samples summed.

    With ``spill``, each batch's layer inputs and output gradients are kept on disk rather than summed in
    memory, for every site where ``batches`` of them take less room than its float64 ``(K, N)`` sum (a wide
    layer and a few hundred samples: megabytes instead of twice the weight). The sum is then formed when read,
    from the same batches in the same order, so the numbers are the same.
    """

    def __init__(self, graph: BatchedGraph, calib: Calibration, targets: TargetDraws | Sequence[np.ndarray],
                 source: str, spill: Spill | None = None, batches: int = 0) -> None:
        self.graph, self.calib, self.targets, self.source = graph, calib, targets, source
        self.spill, self.batches = spill, batches
        self.sums = {s.weight: np.zeros(graph.layouts[s.weight].view_shape) for s in graph.sites}
        self.stored: dict[str, list[tuple[Path, Path]]] = {}
        self.count = 0

    def update(self, batch: Batch) -> None:
        """Add ``sum_n g_n^2`` of the batch's samples (a short batch is padded with its own samples)."""
        g = self.graph
        count = batch.count
        rows = batch.rows.start + np.arange(g.batch) % count
        feeds = self.calib.feeds(rows)
        out = dict(zip(g.session.output_names, g.session.run({**feeds, TARGET: self.targets[batch.draw][rows]})))
        for site in g.sites:
            name = site.activation
            act = feeds[name] if name in feeds else g.constants[name] if name in g.constants else out[name]
            grad = out[g.gradients[site.probe]]
            layout = g.layouts[site.weight]
            if self.spill is not None and site.weight in self.sums and site.weight not in self.stored:
                kept = (act.nbytes + grad.nbytes) * self.batches
                if kept < 8 * int(np.prod(layout.view_shape)):
                    del self.sums[site.weight]
                    self.stored[site.weight] = []
            if site.weight in self.stored:
                self.stored[site.weight].append((self.spill.put(act[:count]), self.spill.put(grad[:count])))
                continue
            self.sums[site.weight] += squared_gradient_sum(site, layout.shape, layout.view_shape, act[:count],
                                                           grad[:count])
        self.count += count

    def merge(self, other: BatchedFisher) -> BatchedFisher:
        for weight in self.graph.covered:
            if weight in self.stored and weight in other.stored:
                self.stored[weight].extend(other.stored[weight])
            else:
                self.sums[weight] = self.total(weight) + other.total(weight)
                self.stored.pop(weight, None)
        self.count += other.count
        return self

    def state(self) -> dict[str, np.ndarray]:
        """The count, the sums held in memory and, of a site kept on disk, each batch's layer inputs and output
        gradients (read back in order, so the merged sum is formed as one pass forms it)."""
        out = {"count": np.array(self.count, dtype=np.int64), **{f"sum/{w}": v for w, v in self.sums.items()}}
        for weight, pairs in self.stored.items():
            out[f"stored/{weight}"] = np.array(len(pairs), dtype=np.int64)
            for i, (act, grad) in enumerate(pairs):
                out[f"act/{i}/{weight}"] = np.load(act)
                out[f"grad/{i}/{weight}"] = np.load(grad)
        return out

    def restore(self, state: Mapping[str, np.ndarray]) -> BatchedFisher:
        """This (empty) accumulator holding ``state``; stored batches go to its spill folder."""
        self.count = int(state["count"])
        self.sums = {key[4:]: np.array(v, dtype=np.float64) for key, v in state.items() if key.startswith("sum/")}
        for key, value in state.items():
            if key.startswith("stored/"):
                weight = key[len("stored/"):]
                spill = self.spill or Spill()
                self.spill = spill
                self.stored[weight] = [(spill.put(state[f"act/{i}/{weight}"]), spill.put(state[f"grad/{i}/{weight}"]))
                                       for i in range(int(value))]
        return self

    def finalize(self) -> PosteriorPart:
        """Per weight, the mean of ``g_n^2``; a site kept on disk is summed when read."""
        names = [w for w in self.graph.covered if w in self.sums or w in self.stored]
        layouts = self.graph.layouts
        return PosteriorPart(LazyArrays(names, lambda w: layouts[w].from_view(self.total(w) / self.count)),
                             {w: self.source for w in names})

    def total(self, weight: str) -> np.ndarray:
        """``sum_n g_n^2`` of ``weight`` so far, in its ``(K, N)`` view."""
        if weight in self.sums:
            return self.sums[weight]
        site = next(s for s in self.graph.sites if s.weight == weight)
        layout = self.graph.layouts[weight]
        total = np.zeros(layout.view_shape)
        for act, grad in self.stored[weight]:
            total += squared_gradient_sum(site, layout.shape, layout.view_shape, np.load(act), np.load(grad))
        return total


@dataclasses.dataclass
class BatchedFisherStage(Stage):
    """Every draw's targets over the samples in batches of the graph's size, into one :class:`BatchedFisher`."""

    graph: BatchedGraph
    calib: Calibration
    targets: TargetDraws
    draws: int
    source: str
    spill: Spill | None = None

    def __post_init__(self) -> None:
        self.desc = f"{self.source} (batched)"

    def accumulator(self) -> BatchedFisher:
        batches = self.draws * -(-self.calib.num_samples // self.graph.batch)  # a whole pass's batches
        return BatchedFisher(self.graph, self.calib, self.targets, self.source, self.spill, batches)

    def restore(self, state: Mapping[str, np.ndarray]) -> BatchedFisher:
        return self.accumulator().restore(state)

    def settle(self) -> None:
        for draw in range(self.draws):
            self.targets[draw]

    def batches(self, samples: range) -> Iterator[Batch]:
        for draw in range(self.draws):
            yield from sample_batches(samples, self.graph.batch, draw)
