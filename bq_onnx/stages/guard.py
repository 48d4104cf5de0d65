"""The guard: the allocation measured on held-out data before it is written, against uniform at the same budget.

The expected-loss tables are a local, quadratic model of the loss around the trained weights (diagonal Laplace or
Fisher curvature). Far from the weights (a block at 0 or 1 bit, classes the calibration data never shows, a
weight whose curvature had to be guessed) they can call a block free that is not. So before anything is written,
the chosen model is run on samples the posterior, the tables and distillation never saw (``--holdout``, a
quarter of ``--calib`` by default, chosen with ``--seed``) and its loss (the ``--loss`` against FP32) is
compared with that of the uniform allocation the same budget buys (``--allocator uniform``: one width
everywhere, the largest whose stored size fits).

Before that comparison the tables themselves are checked tensor by tensor (:func:`_check_tables`): each tensor
is measured alone as the allocation stores it, and one whose measured/predicted ratio is over
:data:`PREDICTION_FACTOR` times the median ratio gets its table scaled up by that much and the budget is spent
again (on silero-vad's sequence export, the fixed STFT basis of its first Conv: 15x its prediction); each probe
runs on the fit split's first run and on the rest only where its value decides something (:func:`_settled`: the
same outcome as every run, in fewer). Tensors are probed on the fit split, so the held-out samples only choose
between candidates; the candidates are the allocation, its repairs, the allocation with every block floored at
the uniform width (:func:`_floored`), the data-free allocation (the one bq-onnx makes without ``--calib``: tables
and grids without the posterior, :func:`_data_free`), uniform on those plain grids and uniform; what is written
is no worse than uniform on both splits, and an alternative (data-free or floored) replaces the allocation or its
best repair only when clearly better on the held-out samples (:func:`_confirm_on_fit`).

Where the allocation measures worse than uniform, or its measured loss exceeds its prediction by more than
:data:`PREDICTION_FACTOR` times what uniform's does (the tables' scale is calibrated by uniform's own
measured/predicted ratio), it is repaired: every tensor stored below the uniform width is measured alone (the
others FP32), those whose measured damage most exceeds their scaled prediction (the fewest that make up half the
total excess) get at least the uniform width, and the budget is spent again around them. At most
:data:`MAX_REPAIRS` rounds; the best measured candidate is kept, and where even that is worse than uniform, the
uniform allocation is written instead (with a note). Without calibration data (random inputs or
``--verify-inputs``) nothing is repaired on data that do not represent the task: the allocation is kept when it
measures no worse than uniform, else uniform is written with a note saying why. Where no uniform width of at least
2 bits fits the budget (0-bit blocks on request in the native format), blocks at 0 or 1 bit are still measured,
tensor by tensor, against the typical measured/predicted ratio of the others (:func:`_far_repair`).

The same measurement checks the user's quality targets (``--max-loss``, ``--min-cosine``, ``--min-agreement``):
a missed one is a :class:`QualityError` before anything is written.

Over 500 lines on purpose: the split, the measurement, the repair rounds and the fallback share one held-out set,
one FP32 reference and one way of spending the budget again; apart, each would need the others' state passed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from bq_onnx.allocation import Allocation
from bq_onnx.calibration import Calibration, load_calibration
from bq_onnx.compare import OutputStats
from bq_onnx.context import Context
from bq_onnx.cuts import Cuts
from bq_onnx.errors import BqError, DataError, QualityError, UsageError
from bq_onnx.estimators.loss_plan import divergence, outputs_needed, resolve
from bq_onnx.graph import forward_model
from bq_onnx.idle import drop_pages, to_disk
from bq_onnx.progress import progress, release_freed_memory
from bq_onnx.qtensor import row_bands
from bq_onnx.runs import sample_axis
from bq_onnx.runtimes.folding import folds_too_much
from bq_onnx.runtimes.sessions import TempSessions, page_out_sessions
from bq_onnx.samples import random_feeds
from bq_onnx.stages.allocate import FILLED_UNIFORM
from bq_onnx.stages.tables import Tables

PREDICTION_FACTOR = 2.0
"""How far the allocation's measured/predicted loss ratio may exceed uniform's before it is repaired: the tables
may be off by a constant (their scale is calibrated on uniform), not by a factor that only the allocation's
own choices (the blocks it took bits from) would show."""
MAX_REPAIRS = 4
"""Rounds of repair (each: probe, raise, re-spend the budget, measure) before falling back to uniform."""
MAX_HELD = 256
"""Held-out samples measured at most (the rest of the split goes back to the posterior)."""
RUN = 32
"""Samples per measured run (a fixed-batch model runs its own batch)."""
DATA_FREE_RUNS = 4
"""Random runs measured without calibration data or ``--verify-inputs``."""
MIN_UNIFORM = 2
"""The narrowest uniform width that is a reference: below it (every block its mean, or 1 bit) nothing compares."""
PROBE_SAMPLES = 32
"""Samples of the fit split the tensor probes run on at least (twice the held-out count where that is more,
at most :data:`MAX_HELD`)."""
SCOPED_PROBE_BYTES = 64 * 2**20
"""Weights (bytes) up to which a subgraph's weight is probed through a copy of the model (a session each)."""
MAX_CORRECTION = 1e9
"""The largest factor by which :func:`_check_tables` scales a tensor's predicted loss (a bound against a
prediction of exactly zero, not a smoothing: the scaled table says what was measured)."""
MAX_PROBES = 64
"""Tensors measured one at a time per repair round at most (the largest bit deficits first)."""
FILLED = "uniform, filled"
"""The candidate label (and result) of uniform with whole layers raised into the budget it leaves (:func:`_filled`)."""
DATA_FREE_UNIFORM = "data-free uniform"
"""The candidate label of uniform on grids made without the posterior (:func:`_data_free`)."""
DATA_FREE_FILLED = "data-free uniform, filled"
"""The same with whole layers raised into the budget its single width leaves (:func:`_data_free`)."""
DATA_FREE = ("data-free", DATA_FREE_UNIFORM, DATA_FREE_FILLED)
"""The labels of the candidates made on the data-free tables."""
FLOORED = "floored at uniform"
"""The candidate label (and result) of the allocation with every block at least the uniform width
(:func:`_floored`)."""
NEAREST = "rounded to nearest"
"""The candidate label (and result) of the allocation as repaired, its codes rounded to nearest instead of by GPTQ,
where ``--rounding auto`` chose GPTQ (:func:`_nearest`)."""
ALTERNATIVES = (*DATA_FREE, FLOORED, NEAREST)
"""Candidates that are not the method's answer (the allocation and its repairs): see :func:`_confirm_on_fit`."""


@dataclasses.dataclass
class Spent:
    """One spending of the budget: the rewritten model and what the stages left on the context for it."""

    out: ir.Model
    allocation: Allocation | None
    quantized: dict
    distillation: dict | None
    layers: list[dict]
    stored_bytes: int | None
    config: object | None = None  # the options it was spent with, where they differ from the run's (nearest)

    @classmethod
    def of(cls, out: ir.Model, ctx: Context) -> Spent:
        return cls(out, ctx.allocation, ctx.quantized, ctx.distillation, ctx.layers, ctx.stored_bytes)

    def apply(self, ctx: Context) -> None:
        ctx.allocation, ctx.quantized, ctx.distillation = self.allocation, self.quantized, self.distillation
        ctx.layers, ctx.stored_bytes = self.layers, self.stored_bytes
        if self.config is not None:
            ctx.config = self.config


@dataclasses.dataclass
class HeldOut:
    """The samples the guard measures on, as runs the model accepts, and what they are."""

    runs: list[dict[str, np.ndarray]]
    kind: str  # held-out | calibration | verify-inputs | random
    samples: int
    sizes: list[int] | None = None  # samples per run (None: random runs, each of the batch the model declares)

    @property
    def task_data(self) -> bool:
        """Samples of the task (held out of --calib): repairs may be steered by them."""
        return self.kind in ("held-out", "calibration")


def split(calibration: Calibration, share: float, seed: int) -> tuple[Calibration, Calibration | None]:
    """``calibration`` as (fit, held out): ``share`` of its runs (whole runs of a fixed batch), at least one and
    never all, at most :data:`MAX_HELD` samples, chosen with ``seed``; (all, None) when it cannot be split."""
    n = calibration.num_samples
    size = calibration.run_size(1)
    units = -(-n // size)
    held = min(round(units * share), max(MAX_HELD // size, 1)) if share > 0 else 0
    held = min(max(held, 1), units - 1) if share > 0 else 0
    if held <= 0:
        return calibration, None
    chosen = np.zeros(units, dtype=bool)
    chosen[np.random.default_rng(seed).choice(units, held, replace=False)] = True
    rows = np.arange(n)
    held_rows = rows[chosen[rows // size]]
    fit_rows = rows[~chosen[rows // size]]

    def part(rows: np.ndarray) -> Calibration:
        return Calibration(calibration.select(rows), calibration.source, dict(calibration.axes),
                           calibration.fixed_batch, calibration.spilled)

    return part(fit_rows), part(held_rows)


def held_out_data(model: ir.Model, ctx: Context, held: Calibration | None, calibration: Calibration | None
                  ) -> HeldOut:
    """What the guard measures on: the held-out split, else the calibration samples themselves, else
    ``--verify-inputs``, else seeded random inputs."""
    if held is not None:
        return _held(held, "held-out")
    if calibration is not None:
        return _held(calibration.take(min(calibration.num_samples, MAX_HELD)), "calibration")
    inputs = ctx.config.inputs
    if inputs.verify_inputs is not None:
        return _held(load_calibration(inputs.verify_inputs, model, MAX_HELD, axes=dict(inputs.batch_axis)),
                     "verify-inputs")
    seed = ctx.config.guard.seed
    runs = [random_feeds(model, seed=seed + i, shapes=dict(inputs.input_shape)) for i in range(DATA_FREE_RUNS)]
    return HeldOut(runs, "random", DATA_FREE_RUNS)


def _held(data: Calibration, kind: str) -> HeldOut:
    return HeldOut(list(data.batches(RUN)), kind, data.num_samples, data.run_sizes(RUN))


@dataclasses.dataclass
class _Try:
    """A candidate as measured: its loss on the held-out samples and its output fidelity."""

    label: str
    spent: Spent
    loss: float
    fidelity: dict[str, dict]
    predicted: float | None
    fit_loss: float | None = None  # on the fit split, where the guard confirms a held-out win (_confirm_on_fit)
    per_sample: np.ndarray | None = None  # the held-out loss per sample (one figure where runs are not samples)

    def row(self, numel: int) -> dict:
        row = {"label": self.label, "measured_loss": self.loss, "predicted_loss": self.predicted,
               "stored_bits": 8 * self.spent.stored_bytes / numel if self.spent.stored_bytes else None}
        if self.fit_loss is not None:
            row["fit_loss"] = self.fit_loss
        return row


class _Decoded:
    """Weights decoded by numpy as the runs feed them, kept per design object (held, so never another's id) up to
    :data:`DECODED_BYTES`, least recently used out. Why: the candidates share designs (the design cache hands back
    the same objects), each is run on the held-out and the fit split, and the tensor probes decode the measured
    allocation's tensors again: 2.3 s of decoding on MiniLM-L3, half of it repeated."""

    def __init__(self) -> None:
        self._kept: dict[int, tuple[object, np.ndarray]] = {}

    def get(self, info, quantized) -> np.ndarray:
        hit = self._kept.pop(id(quantized), None)
        if hit is None:
            array = info.layout.from_view(_decode(info, quantized)).astype(info.value.dtype.numpy(), copy=False)
            array.setflags(write=False)
            hit = (quantized, array)
        self._kept[id(quantized)] = hit  # most recent last
        while self._kept and sum(a.nbytes for _, a in self._kept.values()) > DECODED_BYTES:
            del self._kept[next(iter(self._kept))]
        return hit[1]


DECODED_BYTES = 128 * 2**20
"""Bytes of decoded weights :class:`_Decoded` keeps at most."""

PAGE_OUT_BYTES = 256 * 2**20
"""A candidate fed at least this many bytes of decoded weights runs with the pages its session read of the FP32
weights handed back first (:func:`page_out_sessions`), and on a model of that many bytes of weights every spend of
the budget starts so: on smaller models they cost less than reading them again."""


def _decode(info, quantized) -> np.ndarray:
    """``quantized.dequantize()``; a big weight whose layout is its view band by band of rows (the same values),
    the codes each band read unmapped again where they wait on disk: decoded whole, a candidate's codes were all
    resident beside the decoded weight (issue 21: 0.27x the weight at 1 GiB)."""
    k, n = info.layout.view_shape
    bands = None if info.layout.needs_transpose or 4 * k * n <= DECODED_BYTES else row_bands(quantized, 4 * k * n)
    if bands is None:
        return quantized.dequantize()
    out = np.empty((k, n), dtype=np.float32)
    for a, band in bands:
        out[a:a + len(band)] = band
        del band
        drop_pages()
    return out


@dataclasses.dataclass
class _Probed:
    """One tensor's probe: its loss per sample on the probe's first runs (``parts``, one array each), of ``runs``
    in all; complete when every run is measured (a probe that is not scored per run holds its mean alone)."""

    parts: list[np.ndarray]
    runs: int

    @property
    def complete(self) -> bool:
        return len(self.parts) >= self.runs

    @property
    def loss(self) -> float:
        """The mean loss over the samples measured (every sample once complete: what one scoring of all the runs
        gives, the samples' losses being the same arrays)."""
        return float(np.mean(np.concatenate(self.parts)))

    @property
    def error(self) -> float:
        """The standard error of :attr:`loss` (0 with fewer than 2 samples)."""
        values = np.concatenate(self.parts)
        return float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0


class _Measure:
    """Runs models on the held-out samples and scores them against FP32: the loss the posterior fits and, per
    float output, agreement, cosine and relative error."""

    def __init__(self, model: ir.Model, ctx: Context, held: HeldOut, decoded: _Decoded | None = None) -> None:
        a = ctx.config.allocation
        self.model, self.ctx, self.held = model, ctx, held
        self.decoded = _Decoded() if decoded is None else decoded  # shared with the probe's measure
        self.loss_names = outputs_needed(model, a.loss, a.output)
        floats = [v.name for v in model.graph.outputs if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16,
                                                                      ir.DataType.DOUBLE, ir.DataType.BFLOAT16)]
        self.names = list(dict.fromkeys(self.loss_names + floats))
        self.sessions = TempSessions()
        self._fed = None
        self._cuts: Cuts | None = None
        self.probe = self  # where tensors are measured one at a time (guard_allocation: the fit split)
        self.reference = self._run(model)
        self.axes: dict[str, int] = {}
        if held.sizes is not None:  # where each output holds the samples (a fed-back state: not its first axis)
            for name in self.loss_names:
                i = self.names.index(name)
                found = sample_axis([np.asarray(r[i]) for r in self.reference], held.sizes)
                self.axes[name] = found or 0
        values = {name: self._stack(name, self.reference) for name in self.loss_names}
        bad = [name for name, v in values.items() if not np.all(np.isfinite(v))]
        if bad:  # nothing compares with NaN: the guard cannot measure on these inputs
            raise DataError(f"the FP32 output '{bad[0]}' is not finite on these inputs")
        self.plan, self.fp32 = resolve(model, a.loss, a.output, values, self.axes)
        self.rows = self._rows()

    def _rows(self) -> list[tuple[int, int]] | None:
        """Each run's rows in the stacked outputs, where every loss term holds one row per sample of each run
        (so a probe can be scored on its first runs: :meth:`tensor_probe`); None where not, or with one run."""
        sizes = self.held.sizes
        if sizes is None or len(sizes) < 2:
            return None
        for t in self.plan.terms:
            if [len(self._stack(t.output, [r])) for r in self.reference] != list(sizes):
                return None
        ends = np.cumsum(sizes).tolist()
        return [(end - size, end) for size, end in zip(sizes, ends)]

    def _run(self, model: ir.Model, weights: dict[str, np.ndarray] | None = None,
             which: list[int] | None = None) -> list[list[np.ndarray]]:
        session = self.sessions.open(forward_model(model, self.names)) if weights is None else self._fed_session()
        runs = self.held.runs if which is None else [self.held.runs[i] for i in which]
        return [session.run({**feeds, **(weights or {})}) for feeds in runs]

    def _fed_session(self):
        """The FP32 model with every main-graph weight also an input, so one tensor can be swapped in."""
        if self._fed is None:
            copy = forward_model(self.model, self.names)
            for info in self.ctx.weights:
                if not info.scope and info.name in copy.graph.initializers:
                    copy.graph.inputs.append(copy.graph.initializers[info.name])
            self._fed = self.sessions.open(copy)
        return self._fed

    def _stack(self, name: str, runs: list[list[np.ndarray]]) -> np.ndarray:
        i, axis = self.names.index(name), self.axes.get(name, 0)
        return np.concatenate([np.moveaxis(np.asarray(r[i], dtype=np.float32), axis, 0) for r in runs])

    def loss(self, runs: list[list[np.ndarray]]) -> float:
        return float(np.mean(self.losses(runs)))

    def _run_losses(self, run: list[np.ndarray], i: int) -> np.ndarray:
        """The loss per sample of run ``i`` alone (its rows of the FP32 reference; :attr:`rows`)."""
        lo, hi = self.rows[i]
        terms = []
        for t in self.plan.terms:
            y = self._stack(t.output, [run])
            terms.append(y[..., t.start:t.stop] if t.start is not None else y)
        return divergence(self.plan, [r[lo:hi] for r in self.fp32], terms)

    def losses(self, runs: list[list[np.ndarray]]) -> np.ndarray:
        """The loss per sample (a single figure where the outputs kept per run are not samples)."""
        terms = []
        for t in self.plan.terms:
            y = self._stack(t.output, runs)
            terms.append(y[..., t.start:t.stop] if t.start is not None else y)
        return divergence(self.plan, self.fp32, terms)

    def fidelity(self, runs: list[list[np.ndarray]]) -> dict[str, dict]:
        out = {}
        for i, name in enumerate(self.names):
            stats = OutputStats()
            for ref, cand in zip(self.reference, runs):
                stats.update(ref[i], cand[i], None)
            r = stats.result()
            out[name] = {k: r.get(k) for k in ("agreement", "cosine", "rel_error")} if "error" not in r else r
        return out

    def model_try(self, label: str, spent: Spent) -> _Try:
        idle(spent)  # its rewritten model is not read where it is fed decoded; it waits on disk once measured
        runs = self.runs(spent)
        drop_pages()  # what the runs read of it (its codes, decoded)
        predicted = spent.allocation.loss if spent.allocation is not None else None
        per_sample = self.losses(runs)
        return _Try(label, spent, float(np.mean(per_sample)), self.fidelity(runs), predicted, per_sample=per_sample)

    def runs(self, spent: Spent) -> list[list[np.ndarray]]:
        """The outputs of the model ``spent`` wrote, on these samples."""
        return self._decoded_runs(spent) if folds_too_much(spent.out) else self._run(spent.out)

    def _decoded_runs(self, spent: Spent) -> list[list[np.ndarray]]:
        """``spent`` run as the FP32 model fed its weights decoded by numpy (:meth:`QuantizedTensor.dequantize`,
        the graph's arithmetic): onnxruntime decodes packed codes through float intermediates of about 20x the
        weight (:mod:`bq_onnx.runtimes.folding`). A quantized subgraph weight cannot be fed: the model runs."""
        weights = {}
        for name, quantized in spent.quantized.items():
            info = self.ctx.weight(name)
            if info.scope or info.name not in self.model.graph.initializers:
                return self._run(spent.out)
            weights[name] = self.decoded.get(info, quantized)
        release_freed_memory()  # the decode's freed temporaries, kept by glibc's heap beside the run
        if sum(a.nbytes for a in weights.values()) >= PAGE_OUT_BYTES:
            page_out_sessions()  # the FP32 weights the probes read: the fed run reads none of them
        return self._run(self.model, weights)

    def tensor_probe(self, name: str, spent: Spent, have: _Probed | None = None,
                     first: int | None = None) -> _Probed | None:
        """The loss with only ``name`` quantized as in ``spent`` (None: not quantized there), per sample: on every
        run, or (``first``, where :attr:`rows` allows) on the first ``first`` runs at least, going on from what
        ``have`` measured. A main-graph weight is fed to one shared session; a subgraph's weight (an If or Loop
        body's) cannot be fed, so the model is copied with it replaced (a session per probe, on every run:
        :func:`probe_scoped` says where that is affordable)."""
        info = self.ctx.weight(name)
        if name not in spent.quantized:
            return None
        decoded = self.decoded.get(info, spent.quantized[name])
        if not info.scope:
            if self._cuts is None:  # the probes run from the last cut before the tensor's readers
                self._cuts = Cuts(self.model, self.names, self.held.runs,
                                  [w.name for w in self.ctx.weights if not w.scope])
            if self.rows is None:
                outs = self._cuts.runs_for(name, decoded, lambda: self._run(self.model, {name: decoded}))
                return _Probed([np.array([self.loss(outs)])], 1)
            total, done = len(self.held.runs), len(have.parts) if have is not None else 0
            which = list(range(done, total if first is None else max(min(first, total), done)))
            outs = self._cuts.runs_for(name, decoded, lambda: self._run(self.model, {name: decoded}, which), which)
            parts = [self._run_losses(out, i) for out, i in zip(outs, which)]
            return _Probed((have.parts if have is not None else []) + parts, total)
        if not self.probe_scoped():
            return None
        kept = info.value.const_value
        info.value.const_value = ir.tensor(decoded, name=kept.name)
        try:
            copy = forward_model(self.model, self.names)
        finally:
            info.value.const_value = kept
        session = self.sessions.open(copy)
        return _Probed([np.array([self.loss([session.run(feeds) for feeds in self.held.runs])])], 1)

    def probe_scoped(self) -> bool:
        """Whether subgraph weights are probed: a session per probe, so only on models of at most
        :data:`SCOPED_PROBE_BYTES` of weights."""
        return _weight_bytes(self.ctx) <= SCOPED_PROBE_BYTES

    def close(self) -> None:
        if self._cuts is not None:
            self._cuts.close()
        self.sessions.close()


def idle(spent: Spent) -> None:
    """``spent``'s big arrays (codes, the rewritten model's tensors) moved to disk, in place (:mod:`bq_onnx.idle`):
    a candidate waits there while the next is quantized and measured, and only the one written is read back. The
    first waits there from before the FP32 model's reference runs, which read the float weights whole (at 2 GiB of
    one weight the guard's peak: the weight's pages beside the candidate's 0.6x); arrays already there stay."""
    to_disk(spent.quantized, spent.out)
    drop_pages()  # what moving them read back (the new arrays' checks): 0.27x the weight beside the reference runs


def measure_only(model: ir.Model, ctx: Context, spent: Spent, held: HeldOut) -> None:
    """The held-out loss and fidelity of ``spent`` alone (a fixed width, ``--allocator uniform``, ``--no-guard``):
    what the quality targets are checked on."""
    idle(spent)  # before the FP32 model's reference runs, as in guard_allocation
    measure = _Measure(model, ctx, held)
    try:
        chosen = measure.model_try("allocation", spent)
    finally:
        measure.close()
    ctx.guard = _report(ctx, held, chosen, None, [], "measured", compared=False)


def guard_allocation(model: ir.Model, ctx: Context, first: Spent, spend: Callable[[str | None], Spent],
                     held: HeldOut, fit: Calibration | None = None) -> Spent:
    """The allocation in ``first`` checked against uniform on ``held`` and repaired where it measures worse (the
    module's docstring); returns what to write, applied to ``ctx``. ``spend(method)`` re-spends the budget
    (``"uniform"``, or None: the configured allocator with ``ctx.floors``). ``fit`` (the samples the posterior
    saw) is where tensors are probed one at a time, so the held-out samples that pick the candidate to write
    never steered the candidates themselves (else the repaired ones measure optimistically on a small set)."""
    idle(first)  # before the FP32 model's reference runs: they read the whole float weight beside it (issue 21)
    if _weight_bytes(ctx) >= PAGE_OUT_BYTES:
        spend = _paged_out_first(spend)
    try:
        measure = _Measure(model, ctx, held)
    except BqError as exc:
        if held.task_data:
            raise
        return _fall_back(ctx, first, spend, held, f"the FP32 model cannot be measured on {held.kind} inputs ({exc})")
    probe = None
    try:
        if fit is not None and held.kind == "held-out":
            count = min(fit.num_samples, max(PROBE_SAMPLES, 2 * held.samples), MAX_HELD)
            data = fit.take(count)
            probe = _Measure(model, ctx, _held(data, "fit"), measure.decoded)
            measure.probe = probe
        return _guard(model, ctx, first, spend, held, measure)
    finally:
        measure.close()
        if probe is not None:
            probe.close()


def _paged_out_first(spend: Callable[[str | None], Spent]) -> Callable[[str | None], Spent]:
    """``spend`` that first hands back the pages the tensor probes read of the FP32 weights (issue 21: at 1 GiB of
    weights 1.1 GiB of them stayed resident while the next candidate was quantized and rewritten beside them)."""
    def paged(method: str | None) -> Spent:
        page_out_sessions()
        return spend(method)
    return paged


def _fall_back(ctx: Context, first: Spent, spend: Callable[[str | None], Spent], held: HeldOut, why: str) -> Spent:
    try:
        uniform = spend(FILLED_UNIFORM)  # unmeasured: the budget is spent (plain uniform may leave a third)
    except UsageError:
        uniform = None
    if uniform is None or uniform.allocation.details.get("width", 0) < MIN_UNIFORM:
        first.apply(ctx)
        ctx.messages.append(f"guard: the allocation is not measured: {why}, and no uniform width of at least "
                            f"{MIN_UNIFORM} bits fits the budget; --calib lets it be measured")
        ctx.guard = {"data": held.kind, "samples": held.samples, "result": "unmeasured", "why": why, "repairs": []}
        return first
    uniform.apply(ctx)
    ctx.messages.append(f"guard: wrote the uniform allocation: {why}; --calib lets the allocation be measured "
                        f"and repaired")
    ctx.guard = {"data": held.kind, "samples": held.samples, "result": "uniform", "why": why, "repairs": []}
    return uniform


def _guard(model: ir.Model, ctx: Context, first: Spent, spend: Callable[[str | None], Spent], held: HeldOut,
           measure: _Measure) -> Spent:
    tables = ctx.tables
    chosen = measure.model_try("allocation", first)
    tries = [chosen]
    try:
        uniform = measure.model_try("uniform", spend("uniform"))
    except UsageError:
        uniform = None  # no single width fits the budget: nothing to compare with
    first.apply(ctx)
    if not math.isfinite(chosen.loss) and not held.task_data:
        return _fall_back(ctx, first, spend, held, f"the allocation's loss on {held.kind} inputs is not finite")
    width = uniform.spent.allocation.details.get("width") if uniform is not None else None
    if width is not None and width < MIN_UNIFORM:
        uniform = width = None  # every block at its mean (or 1 bit) is no model to fall back to
    scale = _scale(uniform) or _scale(chosen)
    steps: list[dict] = []
    probed: dict[tuple[str, tuple[int, ...]], _Probed | None] = {}
    current = chosen
    if held.task_data and uniform is not None:  # without a uniform reference, _far_repair measures 0/1-bit blocks
        checked = _check_tables(ctx, chosen, measure, probed, spend, steps)
        if checked is not None:
            tries.append(checked)
            if checked.loss < chosen.loss:
                current = checked  # the repairs go on from the tables as measured
            else:
                ctx.tables = tables  # the corrected tables bought nothing: back to the posterior's
    while (held.task_data and uniform is not None and width is not None and len(steps) < MAX_REPAIRS
           and _needs_repair(current, uniform)):
        current.spent.apply(ctx)
        raised, excess = _culprits(ctx, current.spent, int(width), scale, measure, probed)
        if not raised:
            break
        for t in tables.blocks:
            if t.weight in raised:
                ctx.floors[t.name] = max(ctx.floors.get(t.name, 0), int(width))
        try:
            spent = spend(None)
        except UsageError:  # the raised floors no longer fit the budget
            steps.append({"step": len(steps) + 1, "raised": sorted(raised), "to_bits": int(width),
                          "excess": excess, "result": "does not fit the budget"})
            break
        current = measure.model_try(f"repair {len(steps) + 1}", spent)
        tries.append(current)
        steps.append({"step": len(steps) + 1, "raised": sorted(raised), "to_bits": int(width), "excess": excess,
                      **current.row(_numel(ctx))})
    if uniform is None and held.task_data:
        far = _far_repair(ctx, chosen, measure, probed, spend, steps)
        if far is not None:
            tries.append(far)
    if held.task_data and uniform is not None and width is not None:
        floored = _floored(ctx, int(width), spend, measure, uniform, tries)
        if floored is not None:
            tries.append(floored)
    if held.task_data and uniform is not None and ctx.rounding_auto:
        nearest = _nearest(ctx, spend, measure)
        if nearest is not None:
            tries.append(nearest)
    free_tables = None
    if held.task_data and uniform is not None and ctx.posterior is not None and _has_data_free(ctx):
        with _rounded_to_nearest(ctx):  # as without --calib
            free, free_tables = _data_free(model, ctx, spend, measure)
        tries.extend(free)
    best = min(tries, key=lambda t: t.loss)
    unconfirmed = None
    if held.task_data and uniform is not None and best.loss <= uniform.loss and measure.probe is not measure:
        best, unconfirmed = _confirm_on_fit(tries, uniform, measure)
    if unconfirmed is not None:
        ctx.messages.append(
            f"guard: the allocation measured better than uniform {width}-bit on {held.samples} held-out samples "
            f"({unconfirmed.loss:.4g} against {uniform.loss:.4g}) but worse on the {measure.probe.held.samples} "
            f"samples the posterior was fitted on ({unconfirmed.fit_loss:.4g} against {uniform.fit_loss:.4g}): "
            f"a win the fit samples do not confirm; wrote uniform (more --calib samples let it be confirmed)")
        result, final = "uniform", uniform
    elif not held.task_data and uniform is not None and best.loss > uniform.loss:
        ctx.messages.append(f"guard: the allocation measured worse than uniform {width}-bit on {held.kind} inputs "
                            f"({best.loss:.4g} against {uniform.loss:.4g}): wrote uniform; --calib lets it be "
                            f"measured and repaired")
        result, final = "uniform", uniform
    elif uniform is not None and best.loss > uniform.loss:
        ctx.messages.append(f"guard: after {len(steps)} repair(s) the allocation still measured worse than uniform "
                            f"{width}-bit on {held.samples} {held.kind} samples ({best.loss:.4g} against "
                            f"{uniform.loss:.4g}): wrote uniform")
        result, final = "uniform", uniform
    else:
        result = "kept" if best is chosen else best.label if best.label in ALTERNATIVES else "repaired"
        final = best
    if final is uniform:
        filled = _filled(uniform, spend, measure)
        if filled is not None:
            tries.append(filled)
            result, final = FILLED, filled
            ctx.messages.append(f"guard: the uniform {width}-bit allocation leaves budget: whole layers raised "
                                f"({uniform.loss:.4g} -> {filled.loss:.4g} on {held.samples} {held.kind} samples)")
    if final is chosen or final is uniform or final.label == FILLED:
        ctx.tables = tables  # what is written was spent on the posterior's tables
    elif final.label in DATA_FREE:
        ctx.tables = free_tables
    final.spent.apply(ctx)
    # the tables' scale is known only against uniform's measurement: without it no prediction is shown
    ctx.guard = _report(ctx, held, final, uniform, steps, result, compared=True, first=chosen, scale=_scale(uniform))
    ctx.guard["candidates"] = [t.row(_numel(ctx)) for t in tries]
    ctx.guard["probes"] = {"data": measure.probe.held.kind, "samples": measure.probe.held.samples,
                           "first_runs_only": sum(1 for p in probed.values() if p is not None and not p.complete)}
    return final.spent


def _has_data_free(ctx: Context) -> bool:
    """Whether bq-onnx has an allocation without calibration under these options (``--tables mc`` and
    distillation need calibration; Quantile Inform and Random Bits need the posterior)."""
    a = ctx.config.allocation
    return (a.tables == "closed" and not ctx.config.distillation.distill_steps
            and a.allocator not in ("quantile-inform", "random-bits"))  # these rank blocks by the posterior


def _data_free(model: ir.Model, ctx: Context, spend: Callable[[str | None], Spent], measure: _Measure
               ) -> tuple[list[_Try], object]:
    """The allocation bq-onnx makes without calibration (tables and grids without the posterior: plain squared
    error) and the uniform allocation on those grids, measured as two more candidates. Why: where the posterior
    misleads (a small calibration set, a loss that weighs the wrong outputs) the data-free allocation can measure
    better than both the posterior's and uniform, and the grids alone can be what hurts: on silero-vad's sequence
    export (24 fit clips) uniform 3-bit measured several times better on plain grids than on the posterior's. Where
    that uniform's single width leaves budget, it is measured again with whole layers raised into it (the same
    export stored 3.6 bits at ``--bits 4`` on plain-grid uniform 3-bit). The caller rounds them to nearest, as
    without ``--calib`` (GPTQ's ``A`` is calibration data; its runs on these grids cost what the posterior's did).
    Returns (the candidates, their tables); the context's posterior, tables and floors are restored."""
    from bq_onnx.stages.allocate import head_floors
    from bq_onnx.stages.tables import expected_loss_tables

    posterior, tables, floors, said = ctx.posterior, ctx.tables, dict(ctx.floors), len(ctx.messages)
    try:
        ctx.posterior = None
        ctx.tables = expected_loss_tables(model, ctx, None, "budget")
        ctx.floors = head_floors(model, ctx, ctx.tables)
        del ctx.messages[said:]  # the heads' note was given once already
        free_tables = ctx.tables
        found = []
        for label, method in (("data-free", None), (DATA_FREE_UNIFORM, "uniform"), (DATA_FREE_FILLED, FILLED_UNIFORM)):
            try:
                spent = spend(method)
            except UsageError:
                continue
            if method == FILLED_UNIFORM and not _raises(spent, found[-1] if found else None):
                continue  # nothing raised: the same model as the data-free uniform
            spent.config = ctx.config
            found.append(measure.model_try(label, spent))
        return found, free_tables
    finally:
        ctx.posterior, ctx.tables, ctx.floors = posterior, tables, floors


def _weight_blocks(ctx: Context) -> dict[str, list]:
    """Each weight's table blocks."""
    blocks: dict[str, list] = {}
    for t in ctx.tables.blocks:
        blocks.setdefault(t.weight, []).append(t)
    return blocks


def _damage(name: str, blocks: list, spent: Spent, measure: _Measure, probed: dict,
            first: int | None = None) -> tuple[float | None, float]:
    """The measured loss with ``name`` alone quantized as in ``spent`` (cached per widths; None: not feedable)
    and the tables' prediction for it; ``first``: measured on the probe's first ``first`` runs at least (the mean
    of those), else on every run (a probe measured on fewer runs before is completed)."""
    bits = spent.allocation.bits
    key = (name, tuple(bits[t.name] for t in blocks))
    have = probed.get(key)
    if key not in probed or (have is not None and not have.complete and first is None):
        probed[key] = measure.probe.tensor_probe(name, spent, have, first)
    found = probed[key]
    return (found.loss if found is not None else None), sum(float(t.loss[t.bits.index(bits[t.name])]) for t in blocks)


def _probe_of(name: str, blocks: list, spent: Spent, probed: dict) -> _Probed | None:
    """The probe :func:`_damage` keeps for ``name`` as stored in ``spent``."""
    bits = spent.allocation.bits
    return probed.get((name, tuple(bits[t.name] for t in blocks)))


def _far_repair(ctx: Context, current: _Try, measure: _Measure, probed: dict, spend: Callable[[str | None], Spent],
                steps: list[dict]) -> _Try | None:
    """Without a uniform reference, blocks at 0 or 1 bit (far outside what the local model knows) are still
    measured: each tensor holding some is measured alone and compared with the typical measured/predicted ratio
    of the other tensors (measured alike, the largest first); those over :data:`PREDICTION_FACTOR` times it get
    :data:`MIN_UNIFORM` bits in those blocks and the budget is spent again, once. None: nothing to repair."""
    spent = current.spent
    bits = spent.allocation.bits
    blocks = _weight_blocks(ctx)
    feedable = [name for name in blocks if not ctx.weight(name).scope]
    far = [name for name in feedable if any(bits[t.name] < MIN_UNIFORM for t in blocks[name])]
    if not far:
        return None
    others = sorted((n for n in feedable if n not in far), key=lambda n: -sum(t.numel for t in blocks[n]))

    ratios = []
    for name in progress(others[:MAX_PROBES // 2], "guard probes", ctx.progress):
        measured, predicted = _damage(name, blocks[name], spent, measure, probed)
        if measured is not None and predicted > 0:
            ratios.append(measured / predicted)
    if not ratios:
        return None
    typical = float(np.median(ratios))
    excess = {}
    for name in progress(far[:MAX_PROBES], "guard probes", ctx.progress):
        measured, predicted = _damage(name, blocks[name], spent, measure, probed)
        if measured is not None and measured > PREDICTION_FACTOR * typical * predicted:
            excess[name] = measured - typical * predicted
    if not excess:
        return None
    for name in excess:
        for t in blocks[name]:
            if bits[t.name] < MIN_UNIFORM:
                ctx.floors[t.name] = max(ctx.floors.get(t.name, 0), MIN_UNIFORM)
    step = {"step": len(steps) + 1, "raised": sorted(excess), "to_bits": MIN_UNIFORM, "excess": excess}
    try:
        repaired = measure.model_try(f"repair {step['step']}", spend(None))
    except UsageError:
        steps.append({**step, "result": "does not fit the budget"})
        return None
    steps.append({**step, **repaired.row(_numel(ctx))})
    return repaired


STAGE_RUNS = 1
"""Runs of the fit split (of :data:`RUN` samples) every tensor probe of :func:`_check_tables` is measured on first;
the rest only where the probe's value decides something (:func:`_settled`)."""
SETTLED_ERRORS = 3.0
"""Standard errors of a probe on its first runs by which its measured/predicted ratio must clear the median and
the repair threshold (:data:`PREDICTION_FACTOR` times the median) to be left unfinished (:func:`_settled`)."""


def _settled(name: str, ratios: dict[str, float], typical: float, probe: _Probed | None, predicted: float) -> bool:
    """Whether the probe of ``name``, measured on the first runs of the fit split only, decides nothing more on
    the rest: its ratio is clearly (:data:`SETTLED_ERRORS` standard errors) below the median ``typical``, or
    clearly between it and the repair threshold; not one of the values the median is taken from; not zero (a
    weight the first samples may not reach). Then it is below (or above) the median and not repaired whatever the
    other samples say, so the median, the tensors raised and their factors are those of every probe measured on
    every run. Why: each probe of all-MiniLM-L6-v2 runs the model's tail on 64 samples; most ratios are far from
    both lines."""
    if probe is None or probe.complete:
        return True
    ratio = ratios[name]
    if ratio <= 0 or typical <= 0:
        return False
    exercised = sorted((r, n) for n, r in ratios.items() if r > 0)
    middle = {exercised[(len(exercised) - 1) // 2][1], exercised[len(exercised) // 2][1]}
    if name in middle:  # the median is taken from its value
        return False
    margin = SETTLED_ERRORS * probe.error / predicted
    if margin <= 0:
        return False
    low, high = ratio - margin, ratio + margin
    return high < typical or (low > typical and high < PREDICTION_FACTOR * typical)


def _check_tables(ctx: Context, current: _Try, measure: _Measure, probed: dict,
                  spend: Callable[[str | None], Spent], steps: list[dict]) -> _Try | None:
    """The tables checked tensor by tensor before any comparison: each tensor (the largest first, at most
    :data:`MAX_PROBES`) is measured alone as the allocation stores it, and where its measured/predicted ratio
    exceeds :data:`PREDICTION_FACTOR` times the median ratio, its loss rows are scaled up by how far (at most
    :data:`MAX_CORRECTION`); the budget is then spent again on the corrected tables, once. Why: the curvature is
    local and per tensor; a tensor whose error the rest of the network amplifies (a fixed front-end basis, a
    recurrent weight) looks cheap in it, and the whole-model comparison with uniform alone cannot say which one
    it is. Sets ``ctx.tables`` to the corrected tables; None (tables untouched): nothing was off."""
    spent = current.spent
    blocks = _weight_blocks(ctx)
    scoped = measure.probe_scoped()
    feedable = sorted((n for n in blocks if scoped or not ctx.weight(n).scope),
                      key=lambda n: -sum(t.numel for t in blocks[n]))[:MAX_PROBES]
    if len(feedable) < 2:
        return None
    ratios: dict[str, float] = {}
    predicted_of: dict[str, float] = {}
    for name in progress(feedable, "guard probes", ctx.progress):
        measured, predicted = _damage(name, blocks[name], spent, measure, probed, first=STAGE_RUNS)
        if measured is not None and math.isfinite(measured) and predicted > 0:
            ratios[name] = max(measured, 0.0) / predicted
            predicted_of[name] = predicted
    if len(ratios) < 2:
        return None
    while True:  # the probes measured on the first runs alone completed where their value decides something
        exercised = [r for r in ratios.values() if r > 0]
        typical = float(np.median(exercised)) if len(exercised) >= 2 else 0.0  # 0: every probe completed
        unsure = [n for n in ratios if not _settled(n, ratios, typical, _probe_of(n, blocks[n], spent, probed),
                                                    predicted_of[n])]
        if not unsure:
            break
        for name in unsure:
            measured, _ = _damage(name, blocks[name], spent, measure, probed)
            if measured is not None and math.isfinite(measured):
                ratios[name] = max(measured, 0.0) / predicted_of[name]
            else:
                del ratios[name]
    if len(ratios) < 2:
        return None
    exercised = [r for r in ratios.values() if r > 0]  # a weight the data never reach (an If branch not taken)
    if len(exercised) < 2:                              # says nothing about the tables' scale
        return None
    typical = float(np.median(exercised))
    factors = {n: min(r / typical, MAX_CORRECTION) for n, r in ratios.items() if r > PREDICTION_FACTOR * typical}
    if not factors:
        return None
    original = ctx.tables
    ctx.tables = _corrected(original, factors)
    step = {"step": len(steps) + 1, "kind": "tables", "raised": sorted(factors), "to_bits": None,
            "excess": {n: round(f, 3) for n, f in sorted(factors.items())}}
    try:
        checked = measure.model_try(f"repair {step['step']}", spend(None))
    except UsageError:
        ctx.tables = original
        steps.append({**step, "result": "does not fit the budget"})
        return None
    steps.append({**step, **checked.row(_numel(ctx))})
    return checked


def _filled(uniform: _Try, spend: Callable[[str | None], Spent], measure: _Measure) -> _Try | None:
    """Uniform with the budget its single width leaves spent on whole layers (:data:`FILLED_UNIFORM`), where it
    is smaller than the budget by more than a rounding and measures no worse than uniform; else None. Why: a single
    width can leave a third of the budget (int2 at 2.8 stored bits under ``--bits 4 --target onnxruntime``, where
    int4 with its fp32 scales stores 4.6), and the uniform written as the safe choice should still spend it."""
    try:
        spent = spend(FILLED_UNIFORM)
    except UsageError:
        return None
    if not _raises(spent, uniform):
        return None
    filled = measure.model_try(FILLED, spent)
    return filled if filled.loss <= uniform.loss else None


def _floored(ctx: Context, width: int, spend: Callable[[str | None], Spent], measure: _Measure, uniform: _Try,
             tries: list[_Try]) -> _Try | None:
    """The configured allocation with every block floored at the uniform ``width`` (the budget left above it spent
    by the tables, block by block), measured as a candidate; None where that raises nothing above uniform or does
    not fit. Why: the tables are a local, quadratic model; a step of a bit or two up from a width every block can
    take is where they are reliable, a step down to 2 bits or 0 is where they are not; this keeps the tables'
    choice of where the spare bits go and drops only the extrapolation (the digits MLP's ``quantile-inform``
    golden run writes it). None also where it is one of ``tries``."""
    floors = dict(ctx.floors)
    try:
        for t in ctx.tables.blocks:
            ctx.floors[t.name] = max(floors.get(t.name, 0), width)
        spent = spend(None)
    except UsageError:
        return None
    finally:
        ctx.floors = floors
    if spent.stored_bytes is not None and uniform.spent.stored_bytes is not None \
            and spent.stored_bytes <= uniform.spent.stored_bytes:
        return None  # nothing raised: uniform itself
    if spent.allocation is not None and any(t.spent.allocation is not None
                                            and spent.allocation.bits == t.spent.allocation.bits for t in tries):
        return None  # a candidate already measured (the allocation or a repair had nothing below the width)
    return measure.model_try(FLOORED, spent)


def _nearest(ctx: Context, spend: Callable[[str | None], Spent], measure: _Measure) -> _Try | None:
    """The allocation as the repairs left it, rounded to nearest instead of by GPTQ, measured as a candidate where
    ``--rounding auto`` chose GPTQ; None where it cannot be spent. Why: GPTQ's codes are chosen per tensor on a
    layer metric (and measured against nearest's tensor by tensor where the samples allow,
    :mod:`bq_onnx.stages.tables`), not on the whole model; with a small ``--calib`` its ``A`` fits the few
    samples it saw (the PP-OCR classifier with 6 fit images lost under GPTQ what nearest kept), so the default
    keeps nearest's codes where the held-out samples clearly prefer them. None also where no weight has GPTQ's
    ``A`` (every code is nearest's already): the same model as an answer, it would stand in the alternatives'
    ranking for a better one (silero-vad's sequence export at 3.5 bits wrote its repair, 0.924 agreement, instead
    of the plain-grid uniform, filled, 0.947)."""
    if not ctx.moments:
        return None
    with _rounded_to_nearest(ctx) as nearest:
        try:
            spent = spend(None)
        except UsageError:
            return None
        spent.config = nearest
    return measure.model_try(NEAREST, spent)


@contextlib.contextmanager
def _rounded_to_nearest(ctx: Context) -> Iterator[object]:
    """The run's options with ``--rounding nearest`` while inside (yielded, for the spendings made there)."""
    config = ctx.config
    ctx.config = config.replace(rounding="nearest")
    try:
        yield ctx.config
    finally:
        ctx.config = config


def _raises(filled: Spent, uniform: _Try | None) -> bool:
    """Whether the filled uniform raised anything above ``uniform`` (a uniform try of the same tables)."""
    if uniform is None or uniform.label not in ("uniform", DATA_FREE_UNIFORM):
        return False  # no uniform on these tables to compare with
    stored, plain = filled.stored_bytes, uniform.spent.stored_bytes
    return stored is None or plain is None or stored > plain


def _confirm_on_fit(tries: list[_Try], uniform: _Try, measure: _Measure) -> tuple[_Try, _Try | None]:
    """The candidate to write among those no worse than uniform on both the held-out samples and the fit split
    (the samples the posterior saw). Returns (it, None), or (uniform, the best held-out candidate) where none is.

    The candidates are of two kinds. The method's answer (the allocation and its repairs): of those, the lowest
    held-out loss. The alternatives (the data-free ones, :data:`DATA_FREE`, which saw neither split, and the
    allocation floored at uniform): of those, the lowest loss over both splits (each weighted by its samples; four
    times the held-out samples), among those clearly better than the method's answer on the held-out samples
    (:func:`_clearly_better`, the same samples for both) where there is an answer: one alternative that ranks
    first but is not clearly better does not hide another that is. Only the fit losses that decide are measured
    (a whole-model run of the fit split each): uniform's, the answers' up to the first confirmed one, and the
    alternatives clearly better than it (every alternative where no answer is confirmed).

    Why: the held-out split of a small ``--calib`` is a few samples (8 of 32 clips on silero-vad's sequence
    export, 8 pages on the PP-OCR detector), and the best of several candidates measured on them wins partly by
    chance. On the fit split every posterior-made candidate has the in-sample advantage, so one that measures
    worse than uniform there is worse; requiring both keeps the held-out check unbiased and stops a lucky draw from
    writing a worse model. On the PP-OCR detector the plain-grid uniform, filled, measured lower than the third
    repair on 8 held-out pages and lost the task metric (IoU 0.954 -> 0.862, ``benchmarks/zoo_s10.md``); on the
    PP-OCR classifier the floored allocation, written as the lowest held-out loss (0.0139 on 8 images), lost 12 of
    96 evaluation images against the allocation (accuracy 0.833 against 0.958, ``benchmarks/zoo_s11.md``)."""
    fit = measure.probe
    if uniform.fit_loss is None:
        uniform.fit_loss = fit.loss(fit.runs(uniform.spent))
    winners = sorted((t for t in tries if t.loss <= uniform.loss), key=lambda t: t.loss)

    def confirmed(t: _Try) -> bool:  # measured on the fit split where its fit loss is read (a run each)
        if t.fit_loss is None:
            t.fit_loss = fit.loss(fit.runs(t.spent))
        return t.fit_loss <= uniform.fit_loss

    # the answer: the first confirmed of the method's answers (those after it are not read); an alternative only
    # where clearly better than it held out (the others are not read either)
    answer = next((t for t in winners if t.label not in ALTERNATIVES and confirmed(t)), None)
    alternatives = [t for t in winners if t.label in ALTERNATIVES]
    if answer is not None:  # only an alternative clearly better than the answer may replace it
        alternatives = [t for t in alternatives if _clearly_better(t, answer)]
    alternatives = [t for t in alternatives if confirmed(t)]
    if answer is None and not alternatives:  # no winner confirmed (each was measured)
        return uniform, winners[0]
    held, seen = measure.held.samples, fit.held.samples
    alternative = min(alternatives, key=lambda t: (held * t.loss + seen * t.fit_loss) / (held + seen), default=None)
    return (answer if alternative is None else alternative), None


SE_FACTOR = 1.0
"""Standard errors of the paired per-sample difference by which an alternative (data-free or floored) must beat
the allocation or its best repair on the held-out samples to replace it (:func:`_clearly_better`)."""


def _clearly_better(a: _Try, b: _Try) -> bool:
    """Whether ``a`` measured lower than ``b`` on the held-out samples by more than :data:`SE_FACTOR` standard
    errors of their per-sample difference (paired: the same samples; a plain comparison where the loss is one
    figure)."""
    if a.per_sample is None or b.per_sample is None or len(a.per_sample) < 2 or len(a.per_sample) != len(b.per_sample):
        return a.loss < b.loss
    d = np.asarray(a.per_sample, np.float64) - np.asarray(b.per_sample, np.float64)
    return float(np.mean(d) + SE_FACTOR * np.std(d, ddof=1) / math.sqrt(len(d))) < 0


def _corrected(tables: Tables, factors: dict[str, float]) -> Tables:
    """``tables`` with the loss rows of the weights in ``factors`` scaled by them; scored again at a wider bracket
    (:meth:`Tables.widen`), the scaling is applied again."""
    out = dataclasses.replace(tables, blocks=[
        dataclasses.replace(t, loss=t.loss * factors[t.weight]) if t.weight in factors else t
        for t in tables.blocks])
    rescore = tables.rescore
    if rescore is not None:
        out.rescore = lambda widths: _corrected(rescore(widths), factors)
    return out


def _scale(t: _Try | None) -> float | None:
    """Measured loss per unit of the tables' predicted loss."""
    if t is None or not t.predicted or t.predicted <= 0 or not math.isfinite(t.loss):
        return None
    return t.loss / t.predicted


def _needs_repair(current: _Try, uniform: _Try) -> bool:
    if current.loss > uniform.loss:
        return True
    ours, theirs = _scale(current), _scale(uniform)
    return ours is not None and theirs is not None and ours > PREDICTION_FACTOR * theirs


def _culprits(ctx: Context, spent: Spent, width: int, scale: float | None, measure: _Measure,
              probed: dict) -> tuple[set[str], dict[str, float]]:
    """The tensors below ``width`` whose measured damage (alone, the rest FP32) most exceeds the scaled
    prediction: the fewest that make up half the total excess (the most damaging one when none exceeds it)."""
    bits = spent.allocation.bits
    below = _weight_blocks(ctx)
    candidates = []
    for name, blocks in below.items():
        deficit = sum(t.numel * max(width - bits[t.name], 0) for t in blocks)
        if deficit > 0 and (not ctx.weight(name).scope or measure.probe_scoped()):
            candidates.append((deficit, name))
    candidates = [name for _, name in sorted(candidates, reverse=True)[:MAX_PROBES]]
    damage, excess = {}, {}
    for name in progress(candidates, "guard probes", ctx.progress):
        measured, predicted = _damage(name, below[name], spent, measure, probed)
        if measured is None:
            continue
        damage[name] = measured
        excess[name] = measured - (scale or 0.0) * predicted
    if not damage:
        return set(), {}
    positive = sorted(((e, n) for n, e in excess.items() if e > 0), reverse=True)
    if not positive:
        worst = max(damage, key=damage.get)
        return {worst}, {worst: excess[worst]}
    total, raised, taken = sum(e for e, _ in positive), set(), 0.0
    for e, n in positive:
        raised.add(n)
        taken += e
        if taken >= total / 2:
            break
    return raised, {n: excess[n] for n in sorted(raised)}


def _weight_bytes(ctx: Context) -> int:
    """Bytes of the model's float weights."""
    return sum(w.value.const_value.nbytes for w in ctx.weights)


def _numel(ctx: Context) -> int:
    if ctx.tables is not None:
        return sum(t.numel for t in ctx.tables.blocks)
    return sum(w.numel for w in ctx.weights)


def _report(ctx: Context, held: HeldOut, final: _Try, uniform: _Try | None, steps: list[dict], result: str,
            compared: bool, first: _Try | None = None, scale: float | None = None) -> dict:
    numel = _numel(ctx)
    report = {
        "data": held.kind,
        "samples": held.samples,
        "loss": measure_kind(ctx),
        "result": result,
        "measured_loss": final.loss,
        "predicted_loss": final.predicted,
        "predicted_loss_scaled": final.predicted * scale if final.predicted is not None and scale else None,
        "stored_bits": final.row(numel)["stored_bits"],
        "fidelity": final.fidelity,
        "repairs": steps,
        "prediction_factor": PREDICTION_FACTOR,
    }
    if compared:
        report["uniform"] = ({**uniform.row(numel), "width": uniform.spent.allocation.details.get("width")}
                             if uniform is not None else None)
        report["first"] = first.row(numel) if first is not None else None
    return report


def measure_kind(ctx: Context) -> str:
    """The loss measured, in words."""
    terms = ctx.config.allocation.loss
    return "+".join(t.kind for t in terms) if terms else "auto (--loss default)"


def check_targets(ctx: Context) -> None:
    """Raise :class:`QualityError` when the held-out measurement misses ``--max-loss``, ``--min-cosine`` or
    ``--min-agreement`` (checked before anything is written)."""
    g, report = ctx.config.guard, ctx.guard
    if report is None or "measured_loss" not in report:
        return
    where = f"on {report['samples']} {report['data']} samples"
    if g.max_loss is not None and report["measured_loss"] > g.max_loss:
        raise QualityError(f"held-out loss {report['measured_loss']:.4g} is above --max-loss {g.max_loss:g} {where}; "
                           f"nothing written")
    for name, f in report["fidelity"].items():
        if g.min_cosine is not None and f.get("cosine") is not None and f["cosine"] < g.min_cosine:
            raise QualityError(f"output '{name}': cosine to FP32 {f['cosine']:.4f} is below --min-cosine "
                               f"{g.min_cosine:g} {where}; nothing written")
        if g.min_agreement is not None and f.get("agreement") is not None and f["agreement"] < g.min_agreement:
            raise QualityError(f"output '{name}': top-1 agreement with FP32 {f['agreement']:.4f} is below "
                               f"--min-agreement {g.min_agreement:g} {where}; nothing written")


def wants_measurement(ctx: Context) -> bool:
    """Whether any held-out measurement is needed: the guard compares, or a quality target is set."""
    g = ctx.config.guard
    return guards(ctx) or any(v is not None for v in (g.max_loss, g.min_cosine, g.min_agreement))


def guards(ctx: Context) -> bool:
    """Whether the guard compares the allocation with uniform: an allocation other than uniform exists."""
    return not ctx.config.guard.no_guard and not ctx.fixed and ctx.config.allocation.allocator != "uniform"
