"""Expected-loss tables: for every block and every allowed width, what storing it at that width costs.

Closed form (BayesQ eqs. 5-8): with a Gaussian posterior ``w ~ N(mu, Sigma)`` and curvature ``H``,
``E[(Q(mu) - w)^T H (Q(mu) - w)] = (Q(mu) - mu)^T H (Q(mu) - mu) + tr(H Sigma)``; the trace does not depend on
the width, so the table holds ``sum_i h_i (Q(mu)_i - mu_i)^2`` with ``h`` the posterior precision (diagonal),
where the quantizer for each width is itself designed to minimize that weighted error (weighted range search,
weighted Lloyd). Without a posterior ``h = 1`` (plain squared error). The ``mc`` table instead measures the loss
the posterior fits (``--loss``, or its default rule: the KL to the FP32 distribution on a classifier; ce terms
measure that KL too, the tables read no labels) against the FP32 model on calibration data with only that block
quantized (slow; validates the closed form). ``--tables measured`` keeps the closed form's shape within each tensor
and measures its level: the tensor alone quantized at the three widths around the budget (:class:`_OneScale`),
because the diagonal curvature misjudges tensors against each other far more than widths against each other
(``benchmarks/table_calibration.md``); under ``--rounding gptq``/``gptq-plain`` the tensor is rounded as it is
written (:func:`written`), so the level measured is that of GPTQ's codes, not nearest's.

Blocks are whole tensors or slices of output channels (``rows:N``), so one tensor can mix widths. Quantizing
a whole tensor once per width and summing per-column errors is exact for per-column quantizers; the Lloyd
codebook is per tensor, so its slices share one codebook in the table and in the final model alike.

Several designs per width (``--quantizer vq``/``auto``, ``--outliers auto``): for every tensor and width each
candidate (scalar uniform, scalar Lloyd codebook, vector codebooks of each allowed length, each without and with
outliers) is designed and scored, and the one with the least ``loss + lambda * stored bits`` is the table's entry
at that width (recorded in :attr:`Tables.designs` for the quantize stage). ``lambda`` is the tensor's own exchange rate
of loss for stored bits around that width (the slope of the first candidate's curve between the neighbouring
widths), the rate at which the allocator would trade there: a design that is better but costs more bits (a
larger codebook, outliers) is taken only when its gain pays for them at that rate. Outliers are payload (they
count against ``--bits``); a per-tensor codebook is shared by the tensor's slices, so each slice's metadata
carries its share by columns.
"""

from __future__ import annotations

import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.loss import LossPlan
from bq_onnx.calibration import Calibration
from bq_onnx.config import COMPENSATING
from bq_onnx.context import Context, WeightInfo
from bq_onnx.cuts import Cuts
from bq_onnx.errors import UsageError
from bq_onnx.idle import drop_pages
from bq_onnx.loss_spec import LossTerm
from bq_onnx.progress import progress
from bq_onnx.qtensor import QuantizedTensor, take_columns
from bq_onnx.quantizers import Spec, candidates
from bq_onnx.quantizers.grids import DesignGrid, grid_of
from bq_onnx.sizes import block_metadata_bits, codebook_bits, storage_of, stored_payload_bits, weight_storage
from bq_onnx.stages.bracket import bracket, min_bits, scored_widths
from bq_onnx.weights import design, weight_view

MC_SAMPLES = 128
"""Calibration samples the measured (``--tables mc``) tables run on: the first ones."""


@dataclasses.dataclass
class BlockTable:
    """Loss and cost of one block at each allowed width."""

    name: str
    weight: str
    columns: tuple[int, int]
    numel: int
    bits: tuple[int, ...]
    loss: np.ndarray
    cost: np.ndarray  # stored bits (payload bits alone with --bits-payload)
    payload: np.ndarray  # the grid's bits per weight plus outliers (the papers' reading)
    metadata: np.ndarray
    stored: np.ndarray  # what the format stores: codes in their container (native) or packed, plus metadata


@dataclasses.dataclass
class Tables:
    """The expected-loss tables of every block, and the design chosen per (weight, width) where several were
    scored (``--quantizer vq``/``auto``, ``--outliers auto``, ``--group-size auto``); ``grids``: each chosen
    design's grid, so the quantize stage chooses only its codes again (:mod:`bq_onnx.quantizers.grids`).

    ``widths``: the bracket the tables were scored at (:mod:`bq_onnx.stages.bracket`; None: every allowed width);
    :meth:`widen` scores them again at a wider one, in place, so every holder of these tables sees it."""

    blocks: list[BlockTable]
    designs: dict[tuple[str, int], Spec]
    widths: tuple[int, ...] | None = None
    grids: dict[tuple[str, int], DesignGrid] = dataclasses.field(default_factory=dict, compare=False)
    grid_posterior: object = dataclasses.field(default=None, compare=False)  # the grids' posterior (None: none)
    rescore: Callable[[tuple[int, ...] | None], Tables] | None = dataclasses.field(
        default=None, repr=False, compare=False)

    def widen(self, widths: tuple[int, ...] | None) -> None:
        """The tables scored at ``widths`` (None: every allowed width) instead, in place."""
        if self.rescore is None:
            raise RuntimeError("these tables cannot be scored again")
        wider = self.rescore(widths)
        self.blocks, self.designs, self.widths = wider.blocks, wider.designs, wider.widths
        self.grids, self.grid_posterior = wider.grids, wider.grid_posterior


MAX_SLICES = 1024
"""Allocation blocks per tensor at most: a wider tensor's runs of output channels grow by whole multiples of the
granularity (a ``[1, 2^22]`` weight at ``rows:8`` would otherwise be 524,288 blocks, each scored per width and
candidate: minutes in the tables and the allocator for no measurable gain)."""


def slices(n: int, granularity: int | None) -> list[tuple[int, int]]:
    """Column ranges of one tensor: the whole tensor, or runs of ``granularity`` output channels (a multiple of it
    where the tensor would have more than :data:`MAX_SLICES` runs)."""
    if not granularity or granularity >= n:
        return [(0, n)]
    step = granularity * -(-n // (granularity * MAX_SLICES))
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def block_name(weight: str, columns: tuple[int, int], n: int) -> str:
    return weight if columns == (0, n) else f"{weight}[{columns[0]}:{columns[1]}]"


def expected_loss_tables(model: ir.Model, ctx: Context, calibration: Calibration | None = None,
                         widths: tuple[int, ...] | str | None = None) -> Tables:
    """One :class:`BlockTable` per block of every weight at every allowed width (``widths`` None), at these
    ``widths``, or (``"budget"``, what the pipeline asks for) at those the budget can reach
    (:func:`bq_onnx.stages.bracket.bracket`, grown by :meth:`Tables.widen` where an allocation binds); closed form
    or measured with ``--tables mc`` on ``calibration``; the model is not changed. Inside
    :func:`bq_onnx.distributed.distributed` the weights are shared out to worker processes
    (:data:`TENSOR_RUNNER`); the tables are the same."""
    run = TableRun(model, ctx, calibration, bracket(model, ctx) if widths == "budget" else widths)
    share = TENSOR_RUNNER.get()
    if share is not None and len(ctx.weights) > 1:
        results: Iterable[TensorTables] = share(run)
    else:
        results = (run.tensor(info) for info in progress(ctx.weights, "loss tables", ctx.progress))
    for result in results:
        run.absorb(result)
        drop_pages()  # what the weight read of its view and importance kept on disk (bq_onnx.weights.weight_view)
    tables = run.finish()

    def rescore(wider: tuple[int, ...] | None) -> Tables:
        said = list(ctx.messages)
        out = expected_loss_tables(model, ctx, calibration, wider)
        ctx.messages[:] = said + [m for m in ctx.messages[len(said):] if m not in said]
        return out

    tables.rescore = rescore
    return tables


#: Within :func:`bq_onnx.distributed.distributed`: computes :meth:`TableRun.tensor` of every weight of a run (some
#: in this process, the others in workers that build their own :class:`TableRun` from files) and returns the
#: results in the order of ``run.ctx.weights``. Set there, so that this module never imports the workers' code.
TENSOR_RUNNER: contextvars.ContextVar[Callable[[TableRun], list[TensorTables]] | None] = contextvars.ContextVar(
    "bq_onnx_tensor_runner", default=None)


@dataclasses.dataclass
class TensorTables:
    """One weight's blocks and chosen designs (and their grids), and what the steps across weights read from it
    (the measured scale, the rounding kept nearest, the notes): what a worker sends back for each of its weights."""

    weight: str
    blocks: list[BlockTable]
    designs: dict[tuple[str, int], Spec]
    scale: dict
    kept_nearest: list[tuple[str, int]]
    measured: int
    messages: list[str]
    grids: dict[tuple[str, int], DesignGrid] = dataclasses.field(default_factory=dict)


class TableRun:
    """The tables of one run, weight by weight: :meth:`tensor` computes one weight (in any process that built a
    run from the same model, context and calibration), :meth:`absorb` takes its result in, in the order of
    ``ctx.weights``, and :meth:`finish` applies what spans weights (the one scale, the rounding notes)."""

    def __init__(self, model: ir.Model, ctx: Context, calibration: Calibration | None,
                 widths: tuple[int, ...] | None = None) -> None:
        a = ctx.config.allocation
        self.model, self.ctx, self.calibration = model, ctx, calibration
        self.allowed = tuple(sorted(a.allowed_bits))
        self.payload_only = a.bits_payload and a.size_mb is None
        if a.tables == "mc" and calibration is None:
            raise UsageError("--tables mc needs calibration data (--calib)")
        self.fmt = storage_of(ctx.config, ctx.derived)  # the target's containers and scale width (native)
        self.scorer = _Scorer(ctx)
        self.blocks: list[BlockTable] = []
        self.designs: dict[tuple[str, int], Spec] = {}
        self.grids: dict[tuple[str, int], DesignGrid] = {}
        self.measure = _MonteCarlo(ctx, model, calibration, MC_SAMPLES, a.output, a.loss) if a.tables == "mc" \
            else None
        budget = None
        if a.tables == "measured":
            from bq_onnx.stages.bracket import per_weight_budget

            budget = per_weight_budget(model, ctx)
        self.scale = _OneScale(ctx, model, calibration, self.allowed, budget) if self.measure is None else None
        self.compensation = _Compensation(ctx, model, calibration, self.allowed) \
            if ctx.config.quantization.rounding in COMPENSATING else None
        self.said = len(ctx.messages)  # notes from here on are the tables' (one each, however many processes)
        # the bracket (bq_onnx.stages.bracket); every width where a helper reads them all (measured widths)
        full = self.scale is not None and bool(self.scale.targets)
        self.widths = None if full else widths

    @property
    def reads_calibration(self) -> bool:
        """Whether a weight's tables read the calibration samples (measured tables, the one scale, GPTQ's choice)."""
        return self.calibration is not None and (
            self.measure is not None or self.compensation is not None
            or (self.scale is not None and bool(self.scale.targets or self.scale.anchors)))

    def tensor(self, info: WeightInfo) -> TensorTables:
        """The blocks of one weight at its scored widths (:func:`bq_onnx.stages.bracket.scored_widths`)."""
        ctx = self.ctx
        allowed = scored_widths(ctx, self.allowed, self.widths, min_bits(ctx, info.name))
        said = len(ctx.messages)
        anchors = len(self.scale.anchor_ratios) if self.scale is not None else 0
        kept, measured = (len(self.compensation.kept_nearest), self.compensation.measured) \
            if self.compensation is not None else (0, 0)
        k, n = info.layout.view_shape
        ranges = slices(n, ctx.config.allocation.granularity)
        view, importance = weight_view(ctx, info)
        own = weight_storage(self.fmt, info)  # onnxruntime's MatMulNBits stores fp32 scales (bq_onnx.sizes)
        scored = [self.scorer.score(info, view, importance, bits, ranges, own) for bits in allowed]
        chosen = self._choose(info, view, importance, ranges, own, allowed, scored)
        loss = np.zeros((len(ranges), len(allowed)))
        payload = np.zeros_like(loss)
        meta = np.zeros_like(loss)
        stored = np.zeros_like(loss)
        designs: dict[tuple[str, int], Spec] = {}
        grids: dict[tuple[str, int], DesignGrid] = {}
        for j, (bits, option) in enumerate(zip(allowed, chosen)):
            if len(scored[j]) > 1:
                designs[(info.name, bits)] = option.spec
            if option.grid is not None:
                grids[(info.name, bits)] = option.grid
            found = None
            if self.measure is not None:
                decoded = design(ctx, view, importance, bits, info.name, option.spec).dequantize()
                found = self.measure.block_losses(info, view, decoded, ranges)
            loss[:, j] = found if found is not None else option.loss
            payload[:, j] = option.payload
            meta[:, j] = option.meta
            stored[:, j] = option.stored_payload + option.meta
        if self.compensation is not None:  # first: the scale then measures the codes as written (GPTQ's or nearest's)
            loss = self.compensation.adjust(info, view, importance, chosen, ranges, loss, allowed)
        if self.scale is not None:
            loss = self.scale.adjust(info, view, importance, chosen, loss)
        blocks = [BlockTable(block_name(info.name, columns, n), info.name, columns, k * (columns[1] - columns[0]),
                             allowed, loss[i], payload[i] if self.payload_only else stored[i], payload[i], meta[i],
                             stored[i])
                  for i, columns in enumerate(ranges)]
        scale = self.scale.take(info.name, anchors) if self.scale is not None else {}
        if self.compensation is not None:
            kept_nearest = self.compensation.kept_nearest[kept:]
            del self.compensation.kept_nearest[kept:]
            measured, self.compensation.measured = self.compensation.measured - measured, measured
        else:
            kept_nearest, measured = [], 0
        messages = ctx.messages[said:]
        del ctx.messages[said:]
        return TensorTables(info.name, blocks, designs, scale, kept_nearest, measured, messages, grids)

    def _choose(self, info, view: np.ndarray, importance, ranges, own, scored_at: tuple[int, ...],
                scored: list[list[_Option]]) -> list[_Option]:
        """:func:`_choose` as over every allowed width: where several designs compete, each scored width's rate
        reads its allowed neighbours' first design, so an unscored neighbour's is scored for that (and dropped)."""
        if len(scored_at) == len(self.allowed) or all(len(options) == 1 for options in scored):
            return _choose(scored)
        need = set(scored_at)
        for bits in scored_at:
            j = self.allowed.index(bits)
            need.update(self.allowed[max(j - 1, 0):j + 2])
        widths = sorted(need)
        at = dict(zip(scored_at, scored))
        extended = [at[b] if b in at else self.scorer.score(info, view, importance, b, ranges, own, first=True)
                    for b in widths]
        picked = _choose(extended)
        return [picked[widths.index(b)] for b in scored_at]

    def absorb(self, result: TensorTables) -> None:
        """Take one weight's result in (the next weight of ``ctx.weights``)."""
        self.blocks.extend(result.blocks)
        self.designs.update(result.designs)
        self.grids.update(result.grids)
        if self.scale is not None:
            self.scale.put(result.weight, result.scale)
        if self.compensation is not None:
            for name, bits in result.kept_nearest:
                self.ctx.rounded[("nearest", name, bits)] = True
            self.compensation.kept_nearest.extend(result.kept_nearest)
            self.compensation.measured += result.measured
        said = self.ctx.messages[self.said:]
        self.ctx.messages.extend(m for m in result.messages if m not in said)

    def finish(self) -> Tables:
        """The tables, once every weight's result is in."""
        if self.measure is not None:
            self.measure.close()
        if self.scale is not None:
            self.scale.finish(self.blocks)
        if self.compensation is not None:
            self.compensation.finish()
        return Tables(self.blocks, self.designs, self.widths, self.grids, self.ctx.posterior)

    def close(self) -> None:
        """Close the measuring sessions without finishing (a worker's run)."""
        sessions = [self.measure, *(helper.mc for helper in (self.scale, self.compensation) if helper is not None)]
        for mc in sessions:
            if mc is not None:
                mc.close()


KL_TO_CLOSED_FORM = 2.0
"""Measured loss -> closed-form scale, per calibration sample of the posterior: the closed form is
``sum h (Q(mu) - mu)^2`` with ``h = N * curvature + prior`` and the curvature the per-sample Fisher (or
Gauss-Newton) of the loss, while the loss against FP32 with the tensor perturbed by ``delta`` is
``1/2 delta^T F delta`` per sample (the KL, or half the squared error) to second order. So a table measured as
the mean loss ``L`` is put on the closed-form scale as ``KL_TO_CLOSED_FORM * N * L``. With the true Fisher
(``fisher-mc``) ``2 N L`` over the closed form is about 1 (``tests/test_one_scale.py`` checks it); single tensors
scatter by the correlated errors the diagonal misses, and the empirical Fisher (``laplace``, the default) reads
low on a confident model. :class:`_OneScale` divides that estimator bias out by measuring a few gradient-covered
weights as well."""


def measured_widths(allowed: tuple[int, ...], budget: float | None = None) -> tuple[int, ...]:
    """The widths a weight is measured at: the smallest, a middle and the largest non-zero allowed width, and 0
    where allowed (its loss is not on the curve of the others). With ``budget`` (``--tables measured``: bits per
    weight) the three allowed non-zero widths nearest ``floor(budget)`` instead (one below it, it, one above), where
    the allocation spends almost every block; the others take the nearest measured width's ratio."""
    nonzero = [b for b in allowed if b > 0]
    picks = {0} if 0 in allowed else set()
    if nonzero and budget is not None and np.isfinite(budget):
        near = sorted(nonzero, key=lambda b: (abs(b - math.floor(budget)), b))[:3]
        return tuple(sorted(picks | set(near)))
    if nonzero:
        picks |= {nonzero[0], nonzero[len(nonzero) // 2], nonzero[-1]}
    return tuple(sorted(picks))


def interpolate_ratio(bits: tuple[int, ...], measured: dict[int, float], closed: np.ndarray) -> np.ndarray:
    """Per allowed width, measured over closed-form loss: measured where measured, log-linear in bits between.

    Uniform quantization noise falls as ``4^-bits``, so the log of a loss is linear in bits; interpolating the log
    of the *ratio* to the closed form instead keeps what the closed form knows of each width's own design (a Lloyd
    codebook, outliers, a group size) and equals the log-linear loss where the closed form itself is ``4^-bits``.
    """
    knots = [(b, measured[b] / closed[bits.index(b)]) for b in sorted(measured)
             if closed[bits.index(b)] > 0 and np.isfinite(measured[b])]
    if not knots:
        return np.ones(len(bits))
    top = max(r for _, r in knots)
    xs = np.array([b for b, _ in knots], dtype=np.float64)
    ys = np.log(np.array([max(r, 1e-12 * top, 1e-300) for _, r in knots]))
    return np.exp(np.interp(np.asarray(bits, dtype=np.float64), xs, ys))


ANCHORS = 3
"""Gradient-covered weights (the largest the session can feed) measured as well, to calibrate the conversion."""


def written(ctx: Context, name: str, view: np.ndarray, importance, qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` rounded as the quantize stage will write it: GPTQ's codes under ``--rounding gptq``/``gptq-plain`` for
    a weight with layer-input moments (``gptq`` weighted by the posterior ``importance``, ``gptq-plain`` not),
    nearest's where the rounding choice kept them (:class:`_Compensation`) or there is no ``A``. Why: a table
    measured on nearest's codes prices a rounding the model never stores (GPTQ moves a tensor's loss by a factor
    that differs from tensor to tensor)."""
    rounding = ctx.config.quantization.rounding
    a = ctx.moments.get(name) if rounding in COMPENSATING and ctx.moments else None
    if a is None:
        return qt
    from bq_onnx.stages.quantize import compensated

    return compensated(ctx, name, view, qt, a, None if rounding == "gptq-plain" else importance)


class _OneScale:
    """Puts the tables of weights without gradients on the scale of the gradient-covered ones.

    A weight whose posterior source is the ``activations`` estimator or the ``mean`` fill has a curvature on
    another scale (``E[x^2]``) than the Fisher of the others. With calibration data, such a weight the measuring
    session can feed gets a measured table: the tensor alone quantized at :func:`measured_widths`, the loss against
    FP32 measured on at most :data:`MC_SAMPLES` samples, the other widths interpolated (:func:`interpolate_ratio`),
    times ``KL_TO_CLOSED_FORM * N``; each block gets the tensor's ratio, so the measured loss is split over blocks
    as the closed form splits it. The estimator's own bias (the ``laplace`` default, an empirical Fisher on the
    FP32 top-1 class, is below the true Fisher on a confident model) is divided out: up to :data:`ANCHORS`
    gradient-covered weights are measured the same way, and the geometric mean of their measured over closed-form
    ratios is the calibration. A weight that cannot be fed (inside a subgraph) keeps its closed form with the
    curvature rescaled so its mean is the gradient-covered weights' level (where there are none: the measured
    weights' median ratio), and is recorded on ``ctx.unpriced``: the allocation keeps it at the uniform width
    (:func:`bq_onnx.stages.allocate.head_floors`). Without calibration nothing changes.

    ``budget`` (``--tables measured``, bits per weight): every weight is a target, gradient-covered or not, measured
    at the widths around the budget (:func:`measured_widths`). Why: the diagonal curvature ranks tensors wrongly
    relative to each other (EfficientNet-Lite0 at 4 bits: a tensor's measured over predicted loss spreads from 0.4
    to 8.7 over its eight largest low-width tensors, ``benchmarks/table_calibration.md``), so the allocator buys
    bits where they measure least; measured, every tensor's table is on one scale, the measured one (no anchors:
    there is no closed-form tensor left to calibrate against).

    Under ``--rounding gptq``/``gptq-plain`` every measured tensor is rounded as the quantize stage writes it
    (:func:`written`), and the closed form it is scaled against is the one already priced after compensation
    (:class:`_Compensation` runs first), so the ratio corrects the level of what is stored.
    """

    def __init__(self, ctx: Context, model: ir.Model, calibration: Calibration | None,
                 allowed: tuple[int, ...], budget: float | None = None) -> None:
        from bq_onnx.estimators.driver import NO_GRADIENT_SOURCES

        self.ctx, self.model, self.calibration, self.allowed = ctx, model, calibration, allowed
        self.widths = measured_widths(allowed, budget)
        self.every = budget is not None
        posterior = ctx.posterior
        self.targets: set[str] = set()
        if calibration is not None and posterior is not None:
            self.targets = {w.name for w in ctx.weights if w.name in posterior.weights and (
                budget is not None or posterior.weights[w.name].source in NO_GRADIENT_SOURCES)}
        self.graded = [w for w in ctx.weights if posterior is not None and w.name in posterior.weights
                       and w.name not in self.targets]
        fed = sorted((w for w in self.graded if not w.scope), key=lambda w: -w.numel)
        self.anchors = {w.name for w in fed[:ANCHORS]} if any(not w.scope for w in ctx.weights
                                                              if w.name in self.targets) else set()
        self.mc: _MonteCarlo | None = None
        self.broken = False  # the measuring session could not be built
        self.ratios: dict[str, float] = {}  # measured targets: geometric mean of measured / closed form
        self.anchor_ratios: list[float] = []  # every measured width of every anchor: measured / closed form
        self.pending: dict[str, float] = {}  # weights that cannot be fed -> their mean curvature

    def adjust(self, info, view: np.ndarray, importance, chosen: list[_Option], loss: np.ndarray) -> np.ndarray:
        """``loss`` (blocks x widths, closed form) of one weight, measured where it is a target that can be fed
        (before calibration, which :meth:`finish` applies); an anchor's ratios are recorded, its loss kept."""
        if info.name in self.anchors:
            closed = loss.sum(axis=0)
            for b, value in self._measure(info, view, importance, chosen).items():
                j = self.allowed.index(b)
                if closed[j] > 0 and value > 0:
                    self.anchor_ratios.append(value / closed[j])
            return loss
        if info.name not in self.targets:
            return loss
        if info.scope:
            self.pending[info.name] = float(np.mean(self.ctx.posterior.weights[info.name].curvature))
            return loss
        measured = self._measure(info, view, importance, chosen)
        if not measured:
            return loss
        closed = loss.sum(axis=0)
        ratio = interpolate_ratio(self.allowed, measured, closed)
        self.ratios[info.name] = float(np.exp(np.mean(np.log(ratio))))
        out = loss * ratio[None, :]
        for b, value in measured.items():  # a width measured but with no closed-form loss: spread evenly
            j = self.allowed.index(b)
            if not closed[j] > 0:
                out[:, j] = value / len(out)
        return np.minimum.accumulate(out, axis=1)  # a wider width never costs more loss (measurement noise)

    def _measure(self, info, view: np.ndarray, importance, chosen: list[_Option]) -> dict[int, float]:
        """The tensor alone quantized at each of :func:`measured_widths`: ``KL_TO_CLOSED_FORM * N`` times the
        mean measured loss against FP32."""
        if self.broken:
            return {}
        if self.mc is None:
            a = self.ctx.config.allocation
            try:
                self.mc = _MonteCarlo(self.ctx, self.model, self.calibration, MC_SAMPLES, a.output, a.loss)
            except Exception as exc:  # noqa: BLE001 - the closed form is what the tables had before: keep it
                self.broken = True
                self.ctx.messages.append(f"could not measure loss tables for the weights without gradients "
                                         f"({exc}); their closed form (E[x^2]) stands")
                return {}
        measured = {}
        for bits in self.widths:
            spec = chosen[self.allowed.index(bits)].spec
            decoded = written(self.ctx, info.name, view, importance,
                              design(self.ctx, view, importance, bits, info.name, spec))
            value = self.mc.block_losses(info, view, decoded.dequantize(), [(0, view.shape[1])])
            if value is not None:
                measured[bits] = KL_TO_CLOSED_FORM * self.ctx.posterior.samples * value[0]
        return measured

    def take(self, name: str, anchors: int) -> dict:
        """What :meth:`adjust` recorded for weight ``name`` (its anchor ratios: those past the first ``anchors``),
        removed here; :meth:`put` records it again (in the weights' order, wherever it was computed)."""
        out = {"anchor_ratios": self.anchor_ratios[anchors:]}
        del self.anchor_ratios[anchors:]
        if name in self.ratios:
            out["ratio"] = self.ratios.pop(name)
        if name in self.pending:
            out["pending"] = self.pending.pop(name)
        return out

    def put(self, name: str, record: dict) -> None:
        self.anchor_ratios.extend(record.get("anchor_ratios", ()))
        if "ratio" in record:
            self.ratios[name] = record["ratio"]
        if "pending" in record:
            self.pending[name] = record["pending"]

    @property
    def calibration_factor(self) -> float:
        """Measured over closed-form loss of the gradient-covered anchors (geometric mean; 1 without any)."""
        return float(np.exp(np.mean(np.log(self.anchor_ratios)))) if self.anchor_ratios else 1.0

    def finish(self, blocks: list[BlockTable]) -> None:
        """Calibrate the measured tables, rescale the weights that could not be fed, close the session, and say
        what was done."""
        if self.mc is not None:
            self.mc.close()
        factors = self._factors()
        bias = self.calibration_factor
        factors.update(dict.fromkeys(self.ratios, 1.0 / bias))
        for t in blocks:
            if t.weight in factors:
                t.loss = t.loss * factors[t.weight]
        if self.ratios:
            how = (f"calibrated on {len(self.anchors)} gradient-covered weight(s) measured the same way (measured "
                   f"over closed-form loss: {bias:.3g})" if self.anchor_ratios else "no gradient-covered weight to "
                   "calibrate on")
            self.ctx.messages.append(
                f"{len(self.ratios)} weight(s) {'' if self.every else 'without gradients '}got loss tables "
                "measured on calibration data "
                f"(widths {', '.join(map(str, self.widths))}, the rest interpolated) on the "
                f"closed-form scale ({KL_TO_CLOSED_FORM:g} N x the mean loss; {how})")
        if self.pending:  # kept at the uniform width (bq_onnx.stages.allocate.head_floors); the same set each time
            self.ctx.unpriced = set(self.pending)

    def _factors(self) -> dict[str, float]:
        """Loss multiplier per weight that cannot be fed: its curvature brought to the gradient-covered level."""
        if not self.pending:
            return {}
        posterior = self.ctx.posterior
        n, prior = posterior.samples, posterior.prior_precision
        if self.graded:
            total = sum(float(np.sum(posterior.weights[w.name].curvature)) for w in self.graded)
            level = total / sum(w.numel for w in self.graded)
            return {name: (n * level + prior) / (n * mean + prior) for name, mean in self.pending.items()}
        if self.ratios:
            return dict.fromkeys(self.pending, float(np.median(list(self.ratios.values()))))
        return {}


COMPENSATED_WIDTHS = 5
"""Under ``--rounding gptq`` the tables price compensation at the widths up to this one; wider widths take the widest
priced width's ratio (on a fine grid the rounding errors are independent of the weights, so the ratio settles),
which saves GPTQ runs the allocation hardly ever needs."""

CHOSEN_WIDTHS = 4
"""At the widths up to this one the rounding of each tensor is chosen by measurement (GPTQ or nearest, whichever
loses less with that tensor alone quantized): on a coarse grid a lower layer-output error does not always mean a
lower loss (LeNet's 400-wide FC layer at 2 bits: GPTQ lowers its output error by a sixth on held-out digits and
still more than doubles the KL to FP32, with 128 calibration samples or 500; the layer metric misses how its errors
act downstream)."""

CHOICE_SAMPLES = 32
"""Calibration samples the choice is measured on (the last ones; ``A`` is measured on the others)."""


def _choice_split(calibration: Calibration | None) -> tuple[Calibration | None, Calibration | None]:
    """(the samples ``A`` is measured on, the last :data:`CHOICE_SAMPLES` the rounding choice is measured on), or
    (all, None) with fewer than twice as many samples: GPTQ fits the samples ``A`` comes from, so a choice measured
    on them favours it (LeNet's FC layer at 2 bits measures better on them and is three times worse held out)."""
    if calibration is None:
        return None, None
    n = calibration.num_samples
    if n < 2 * CHOICE_SAMPLES or calibration.run_size(1) != 1:
        return calibration, None

    def part(rows: np.ndarray) -> Calibration:
        return Calibration(calibration.select(rows), calibration.source, dict(calibration.axes),
                           calibration.fixed_batch, calibration.spilled)

    rows = np.arange(n)
    return part(rows[: n - CHOICE_SAMPLES]), part(rows[n - CHOICE_SAMPLES :])


AUTO_SAMPLES = 16
"""Calibration samples (after the guard's hold-out) from which ``--rounding auto`` is GPTQ."""


def auto_rounding(calibration: Calibration | None) -> tuple[str, str]:
    """What ``--rounding auto`` becomes for a run fitted on ``calibration``, and a note where it stays nearest.

    GPTQ from :data:`AUTO_SAMPLES` samples: with 24 (the zoo's 32 less the hold-out) it lowered the task error on 6
    of 9 zoo models at 4 bits and raised it on none (``benchmarks/zoo_gptq_s12.md``); with 6 its ``A`` fits them
    and the PP-OCR classifier lost accuracy that nearest kept (``tests/test_zoo.py``). The guard also measures the
    allocation rounded to nearest (:func:`bq_onnx.stages.guard._nearest`)."""
    if calibration is None:
        return "nearest", ""
    if calibration.num_samples < AUTO_SAMPLES:
        return "nearest", (f"--rounding auto: nearest ({calibration.num_samples} calibration sample(s) left for the "
                           f"posterior; GPTQ's compensation needs {AUTO_SAMPLES} or more)")
    return "gptq", ""


class _Compensation:
    """Under ``--rounding gptq``/``gptq-plain`` the final codes are GPTQ's, not nearest's: each block's loss at each
    width is the nearest-rounding loss times what GPTQ leaves of it.

    At the widths up to :data:`CHOSEN_WIDTHS`, with calibration data and ``--rounding gptq`` (``gptq-plain`` is GPTQ
    as published, the baseline), that ratio is measured: the loss against FP32 with the tensor alone quantized,
    GPTQ-rounded over rounded to nearest (:class:`_MonteCarlo`); where GPTQ does
    not lose less the quantize stage keeps nearest's codes for that tensor and width (``ctx.rounded``) and the ratio
    is 1. Elsewhere the ratio is what GPTQ leaves of the layer-output error nearest leaves
    (:func:`bq_onnx.stages.quantize.compensation_ratio`, on the ``A``, precision and design the quantize stage then
    reuses). Without it the allocation prices every width as if rounded to nearest and spends bits where
    compensation already recovers most of the error. Weights without an ``A`` keep their loss."""

    def __init__(self, ctx: Context, model: ir.Model, calibration: Calibration | None,
                 allowed: tuple[int, ...]) -> None:
        from bq_onnx.stages.quantize import layer_moments

        self.ctx, self.model, self.allowed = ctx, model, allowed
        self.plain = ctx.config.quantization.rounding == "gptq-plain"
        fit, self.calibration = (calibration, None) if self.plain else _choice_split(calibration)
        self.moments = layer_moments(ctx, model, fit)  # kept on the context: the quantize stage uses the same A
        self.mc: _MonteCarlo | None = None
        self.broken = self.calibration is None
        self.kept_nearest: list[tuple[str, int]] = []
        self.measured = 0

    def adjust(self, info, view: np.ndarray, importance, chosen: list[_Option], ranges, loss: np.ndarray,
               widths: tuple[int, ...]) -> np.ndarray:
        """``loss`` (blocks x ``widths``, the scored ones) scaled per block by the compensation ratio of each width's
        chosen design; a width past :data:`COMPENSATED_WIDTHS` takes the ratio at the widest allowed width up to it
        (every allowed width's, whether scored or not: the tables are those of every width)."""
        from bq_onnx.rounding.gptq import NO_GRID
        from bq_onnx.stages.quantize import compensated, compensation_ratio

        a = self.moments.get(info.name)
        if a is None:
            return loss
        out = loss.copy()
        weighting = None if self.plain else importance
        priced = [b for b in self.allowed if b <= COMPENSATED_WIDTHS] or [self.allowed[0]]
        carried = None  # the ratio of the widest priced width, for the widths past it
        for j, bits in enumerate(widths):
            if bits <= COMPENSATED_WIDTHS or bits == self.allowed[0]:
                qt = design(self.ctx, view, importance, bits, info.name, chosen[j].spec)
                ratio = compensation_ratio(self.ctx, info.name, view, qt, a, weighting, ranges)
                if bits <= CHOSEN_WIDTHS and qt.kind not in NO_GRID and (ratio < 1).any():
                    rounded = compensated(self.ctx, info.name, view, qt, a, weighting)
                    measured = self._measured_ratio(info, view, qt, rounded)
                    if measured is not None and measured >= 1.0:
                        self.ctx.rounded[("nearest", info.name, bits)] = True
                        self.kept_nearest.append((info.name, bits))
                        ratio = np.ones(len(ranges))
                    elif measured is not None:  # a measured gain never prices a width below the metric's ratio
                        ratio = np.minimum(1.0, ratio * max(1.0, measured / self._total(ratio, loss[:, j])))
            else:
                if carried is None:
                    widest = priced[-1]
                    spec = chosen[widths.index(widest)].spec if widest in widths else None
                    qt = design(self.ctx, view, importance, widest, info.name, spec)
                    carried = compensation_ratio(self.ctx, info.name, view, qt, a, weighting, ranges)
                ratio = carried
            out[:, j] = loss[:, j] * ratio
        return np.minimum.accumulate(out, axis=1)  # a wider width never costs more loss

    @staticmethod
    def _total(ratio: np.ndarray, loss: np.ndarray) -> float:
        total = float(loss.sum())
        return float((ratio * loss).sum() / total) if total > 0 else float(ratio.mean())

    def _measured_ratio(self, info, view: np.ndarray, qt, rounded) -> float | None:
        """Loss with the tensor alone GPTQ-rounded over the loss with it rounded to nearest (None: not measurable);
        kept per GPTQ result (the bracket's and the guard's rescoring ask again for the same codes)."""
        if self.broken or info.scope:
            return None
        key = ("choice", info.name, qt.bits)
        hit = self.ctx.rounded.get(key)
        if hit is not None and hit[0] is rounded:
            return hit[1]
        if self.mc is None:
            a = self.ctx.config.allocation
            try:
                self.mc = _MonteCarlo(self.ctx, self.model, self.calibration, CHOICE_SAMPLES, a.output, a.loss)
            except Exception as exc:  # noqa: BLE001 - the metric's ratio is what the tables had before: keep it
                from bq_onnx.stages.quantize import gptq_label

                self.broken = True
                self.ctx.messages.append(f"{gptq_label(self.ctx)}: could not measure the rounding choice ({exc}); "
                                         "GPTQ's codes are used wherever they lower the layer-output error")
                return None
        whole = [(0, view.shape[1])]
        near = self.mc.block_losses(info, view, qt.dequantize(), whole)
        comp = self.mc.block_losses(info, view, rounded.dequantize(), whole)
        if near is None or comp is None or not near[0] > 0:
            return None
        self.measured += 1
        self.ctx.rounded[key] = (rounded, float(comp[0] / near[0]))
        return self.ctx.rounded[key][1]

    def finish(self) -> None:
        """Close the measuring session and say what was chosen."""
        if self.mc is not None:
            self.mc.close()
        if self.measured:
            from bq_onnx.stages.quantize import gptq_label

            self.ctx.messages.append(
                f"{gptq_label(self.ctx)}: rounding chosen by measurement at widths <= {CHOSEN_WIDTHS} ({self.measured} "
                f"tensor-width pair(s), {CHOICE_SAMPLES} calibration samples): {len(self.kept_nearest)} kept "
                "nearest's codes (GPTQ lost more there)")


class _Scorer:
    """Scores every candidate design of a tensor at a width by the closed-form expected loss."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def score(self, info, view: np.ndarray, importance, bits: int, ranges, fmt: str,
              first: bool = False) -> list[_Option]:
        """Every candidate design of one tensor at one width (``first``: the first alone): per-slice loss, payload
        and metadata."""
        q, d = self.ctx.config.quantization, self.ctx.derived
        n = view.shape[1]
        options = []
        plain: dict[tuple[str, int, int], object] = {}
        blocks = d.block_choices_for(info.name, view.shape[0])
        specs = candidates(q.quantizer, d.outliers, bits, view.size, blocks)
        for spec in specs[:1] if first else specs:
            key = (spec.method, spec.dim, spec.block)
            qt = design(self.ctx, view, importance, bits, info.name, spec, base=plain.get(key))
            if not spec.outliers:
                plain[key] = qt
            per_column = self._column_losses(info, view, qt, importance)
            shared = codebook_bits(qt)
            loss, payload, meta, stored = (np.empty(len(ranges)) for _ in range(4))
            for i, (a, b) in enumerate(ranges):  # one slice's codes at a time: no second copy of the whole codes
                part = take_columns(qt, a, b)
                loss[i] = per_column[a:b].sum()
                payload[i] = float(part.payload_bits)
                meta[i] = block_metadata_bits(part, fmt) + shared * (b - a) / n
                stored[i] = float(stored_payload_bits(part, fmt))
            options.append(_Option(spec, loss, payload, meta, stored, grid_of(qt, spec)))
        return options

    def _column_losses(self, info, view: np.ndarray, qt: QuantizedTensor, importance) -> np.ndarray:
        """Expected loss per output column: ``delta^T H delta`` with H diagonal (the posterior precision) or,
        where the posterior has K-FAC factors, ``H = N (A (x) G) + lambda`` so correlated errors count together:
        ``delta^T H delta = N tr(D^T A D G) + lambda |D|^2`` with ``D`` the (K, N) error.

        The diagonal form is summed slice by slice of columns (:data:`LOSS_CHUNK_BYTES` of the view at a time):
        the decoded tensor, its float64 error and the squares would otherwise be about 8x the weight at once
        (issue 21's streaming bound). Each column's sum runs down its rows in the same order either way."""
        posterior = self.ctx.posterior
        wp = posterior.weights.get(info.name) if posterior is not None else None
        if wp is not None and wp.kfac is not None:
            delta = qt.dequantize().astype(np.float64) - view
            a, g = wp.kfac
            return posterior.samples * np.sum(delta * (a @ delta @ g), axis=0) + posterior.prior_precision * np.sum(
                delta**2, axis=0
            )
        k, n = view.shape
        step = n if view.nbytes <= LOSS_CHUNK_BYTES else max(1, LOSS_CHUNK_BYTES // max(1, k * view.itemsize))
        out = np.empty(n, dtype=np.float64)
        for a in range(0, n, step):
            b = min(a + step, n)
            decoded = qt.dequantize() if (a, b) == (0, n) else take_columns(qt, a, b).dequantize()
            err = (decoded.astype(np.float64) - view[:, a:b]) ** 2
            if importance is not None:
                err *= importance[:, a:b]
            out[a:b] = err.sum(axis=0)
        return out


LOSS_CHUNK_BYTES = 4 << 20
"""Bytes of a weight's (float32) view whose expected loss the tables sum at once (:meth:`_Scorer._column_losses`;
decoding a slice and squaring its error in float64 hold about 8x its bytes)."""


@dataclasses.dataclass
class _Option:
    """One candidate design of a tensor at one width, per slice of output channels."""

    spec: Spec
    loss: np.ndarray
    payload: np.ndarray
    meta: np.ndarray
    stored_payload: np.ndarray
    grid: DesignGrid | None = None  # the design without its codes (:mod:`bq_onnx.quantizers.grids`)

    @property
    def stored(self) -> float:
        return float(self.stored_payload.sum() + self.meta.sum())


def _choose(scored: list[list[_Option]]) -> list[_Option]:
    """Per width the option with the least ``loss + lambda * (stored - stored of the first option)``.

    ``lambda`` = loss saved per stored bit along the first option's curve between the neighbouring widths (one
    side at the ends). With a single width there is no rate: options costing more than the first are left out.
    """
    base_loss = [float(opts[0].loss.sum()) for opts in scored]
    base_bits = [opts[0].stored for opts in scored]
    out = []
    for j, opts in enumerate(scored):
        lo, hi = max(j - 1, 0), min(j + 1, len(scored) - 1)
        if lo == hi:
            fits = [o for o in opts if o.stored <= base_bits[j]] or opts[:1]
            out.append(min(fits, key=lambda o: float(o.loss.sum())))
            continue
        rate = max(base_loss[lo] - base_loss[hi], 0.0) / max(base_bits[hi] - base_bits[lo], 1e-12)
        out.append(min(opts, key=lambda o: float(o.loss.sum()) + rate * (o.stored - base_bits[j])))
    return out


class _MonteCarlo:
    """The measured table: the mean loss against the FP32 outputs on calibration samples with one block quantized
    (:func:`bq_onnx.estimators.loss_plan.divergence`; one kl term on logits: the KL computed as it always was)."""

    def __init__(self, ctx: Context, model: ir.Model, calibration: Calibration, max_samples: int,
                 output: str | None, loss: tuple[LossTerm, ...] | None = None) -> None:
        from bq_onnx.calibration import load_calibration
        from bq_onnx.estimators.loss_plan import outputs_needed
        from bq_onnx.graph import forward_model
        from bq_onnx.runtimes.sessions import TempSessions

        self.ctx = ctx
        self.calib = load_calibration(calibration, model, max_samples)
        self.model, self.output, self.spec = model, output, loss
        self.names = outputs_needed(model, loss, output)
        copy = forward_model(model, self.names)
        self.fed = {info.name for info in ctx.weights if not info.scope}  # a subgraph's weights cannot be fed
        for name in sorted(self.fed):  # overridable initializers: fed per measurement
            copy.graph.inputs.append(copy.graph.initializers[name])
        self.sessions = TempSessions()
        self.session = self.sessions.open(copy)
        self.batches = list(self.calib.batches(64))
        self.cuts: Cuts | None = None  # from the first measurement on (the FP32 run is the plan's)
        self.plan, self.fp32 = self._resolve()
        term = self.plan.terms[0]
        self.classic = len(self.plan.terms) == 1 and term.kind in ("kl", "ce") and not term.probabilities \
            and term.start is None and term.weight == 1.0
        if self.classic:
            self.reference = self._log_probs({})

    def _resolve(self) -> tuple[LossPlan, list[np.ndarray]]:
        """The loss and each term's FP32 output on the measured samples."""
        from bq_onnx.estimators.loss_plan import resolve

        runs = [self.session.run(b) for b in self.batches]
        values = {name: np.concatenate([r[i] for r in runs]).astype(np.float32) for i, name in enumerate(self.names)}
        return resolve(self.model, self.spec, self.output, values)

    def _runs(self, weights: dict) -> list[list[np.ndarray]]:
        """The outputs on every batch with ``weights`` swapped in (one weight: from the last
        cut before its readers, :mod:`bq_onnx.cuts`)."""
        if len(weights) == 1:
            if self.cuts is None:
                self.cuts = Cuts(self.model, self.names, self.batches, sorted(self.fed))
            (name, value), = weights.items()
            return self.cuts.runs_for(name, value, lambda: self._whole(weights))
        return self._whole(weights)

    def _whole(self, weights: dict) -> list[list[np.ndarray]]:
        return [self.session.run({**b, **weights}) for b in self.batches]

    def _terms(self, weights: dict) -> list[np.ndarray]:
        """Each loss term's (sliced) output with ``weights`` swapped in."""
        runs = self._runs(weights)
        out = []
        for t in self.plan.terms:
            y = np.concatenate([r[self.names.index(t.output)] for r in runs])
            out.append(y[..., t.start:t.stop] if t.start is not None else y)
        return out

    def _log_probs(self, weights: dict) -> np.ndarray:
        z = np.concatenate([r[0] for r in self._runs(weights)])
        z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))

    def block_losses(self, info, view: np.ndarray, decoded: np.ndarray, ranges) -> list[float] | None:
        """Measured loss per block range; None for a weight that cannot be fed (the closed form stands)."""
        if info.name not in self.fed:
            return None
        if not self.classic:
            from bq_onnx.estimators.loss_plan import divergence

            losses = []
            for start, stop in ranges:
                mixed = view.copy()
                mixed[:, start:stop] = decoded[:, start:stop]
                weight = info.layout.from_view(mixed).astype(info.value.dtype.numpy())
                losses.append(float(np.mean(divergence(self.plan, self.fp32, self._terms({info.name: weight})))))
            return losses
        losses = []
        p = np.exp(self.reference)
        for start, stop in ranges:
            mixed = view.copy()
            mixed[:, start:stop] = decoded[:, start:stop]
            weight = info.layout.from_view(mixed).astype(info.value.dtype.numpy())
            log_q = self._log_probs({info.name: weight})
            losses.append(float(np.mean(np.sum(p * (self.reference - log_q), axis=-1))))
        return losses

    def close(self) -> None:
        if self.cuts is not None:
            self.cuts.close()
        self.sessions.close()
