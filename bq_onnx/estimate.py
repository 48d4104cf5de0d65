"""Run calibration data through onnxruntime and turn what comes out into a posterior over every weight.

Gradients come from the model's own gradient graph (``bq_onnx.passes.autodiff``: standard ops, run by
onnxruntime), with a loss appended by ``bq_onnx.passes.loss``:

* ``laplace``: squared per-sample gradients of the cross-entropy to the label (or, without labels, to the FP32
  model's top-1 class): the empirical Fisher diagonal. For ``mse`` outputs without labels the target is the FP32
  output plus unit Gaussian noise (the Gauss-Newton diagonal, as ``fisher-mc``).
* ``fisher-mc``: the same with labels drawn from the model's predictive distribution (the true Fisher).
* ``hutchinson``: diag(H) ~ E[v * Hv], Rademacher ``v``, Hv by central finite differences of gradients of the
  loss against fixed targets (KL to the FP32 output by default: its Hessian at the trained weights is the
  Fisher, so this estimates the same matrix with a different estimator).
* ``kfac``: ``A = E[a a^T]`` of layer inputs and ``G = E[g g^T]`` of output gradients (MatMul/Gemm/Conv).
* ``activations``: no gradients: the input second moment ``E[x^2]`` per input channel (the GPTQ-style proxy).
  It is also the fallback for weights whose path to the loss crosses an op without a gradient rule.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bq_onnx.calibration import Calibration, CalibrationSource, load_calibration
from bq_onnx.config import OptimizeConfig
from bq_onnx.context import Context, WeightInfo
from bq_onnx.errors import DataError, ModelError, UsageError
from bq_onnx.model_io import copy_model, load_model, model_nbytes, save_model
from bq_onnx.passes.find_weights import FindWeightsPass
from bq_onnx.passes.loss import LOSS, LOSS_KINDS, TARGET, AppendLossPass, output_value
from bq_onnx.pipeline import prepare_passes, run_passes
from bq_onnx.posterior import (
    DEFAULT_PRIOR_PRECISION,
    METHODS,
    Posterior,
    Spill,
    SumAccumulator,
    WeightPosterior,
)
from bq_onnx.progress import progress
from bq_onnx.runtimes import get_runtime

#: Relative size of the finite-difference step for Hessian-vector products (times the weight's RMS).
HVP_STEP = 1e-3

#: Default cap, in MiB, on the intermediate tensors of one batched gradient run (see :func:`activation_budget`).
ACTIVATION_BUDGET_MB = 1024


#: Bytes a gradient graph holds per byte of forward node outputs: each output's gradient, the backward rules'
#: own intermediates and onnxruntime's arena (EfficientNet-Lite0's peaks at batch 32 and 10 put it at 3 to 4).
GRADIENT_GRAPH_FACTOR = 4


def activation_budget() -> int:
    """Bytes that the forward activations and their gradients of one batched gradient run may take: 1 GiB by
    default, ``BQ_ONNX_ACTIVATION_BUDGET_MB`` (MiB) overrides it. The batched Fisher runs
    ``clamp(budget // bytes_per_sample, 1, batch_size)`` samples at a time, so memory follows the model's
    activation size rather than a fixed batch (EfficientNet-Lite0 at 224x224: ~100 MiB a sample); the requested
    ``batch_size`` stays the upper bound, and the result is the same up to float summation order."""
    value = os.environ.get("BQ_ONNX_ACTIVATION_BUDGET_MB")
    try:
        return max(int(float(value) * 2**20), 1) if value else ACTIVATION_BUDGET_MB * 2**20
    except ValueError:
        return ACTIVATION_BUDGET_MB * 2**20


def _activation_bytes_per_sample(model: ir.Model, calib: Calibration) -> int | None:
    """Bytes of the float node outputs of ``model`` at one sample, times :data:`GRADIENT_GRAPH_FACTOR`: the
    intermediate tensors that a gradient graph holds per sample. Shape inference on ``model`` (a copy whose node
    shapes this rewrites); None when shapes cannot be inferred."""
    _forget_shapes(model)
    try:
        specialise(model, next(calib.batches(1)))
    except Exception:  # noqa: BLE001 - unknown size: the caller keeps the requested batch
        return None
    total = 0
    for node in model.graph:
        for out in node.outputs:
            if out.shape is None or out.dtype is None or not out.dtype.is_floating_point():
                continue
            if not all(isinstance(d, int) for d in out.shape):
                continue
            total += int(np.prod(out.shape, dtype=np.int64) * out.dtype.itemsize)
    return GRADIENT_GRAPH_FACTOR * total if total else None


def adapted_batch(bytes_per_sample: int | None, requested: int, budget: int | None = None) -> int:
    """``clamp(budget // bytes_per_sample, 1, requested)`` (budget: :func:`activation_budget`)."""
    if not bytes_per_sample:
        return requested
    budget = activation_budget() if budget is None else budget
    return int(min(max(budget // bytes_per_sample, 1), requested))


@dataclasses.dataclass
class Prepared:
    """The model as the pipeline sees it, and the weights it would quantize."""

    model: ir.Model
    weights: list[WeightInfo]
    source: object


def prepare(source, min_size: int = 128, keep_fp: Sequence[str] = ()) -> Prepared:
    ctx = Context(OptimizeConfig.from_options(min_size=min_size, keep_fp=tuple(keep_fp)))
    model = run_passes(load_model(source), [*prepare_passes(ctx), FindWeightsPass(ctx)])
    return Prepared(model, ctx.weights, source)


def forward_model(model: ir.Model, outputs: Sequence[str | None]) -> ir.Model:
    """A copy of ``model`` whose outputs are the named values (``None``: the first graph output)."""
    copy = copy_model(model)
    values = {v.name: v for v in _all_values(copy)} | {v.name: v for v in copy.graph.outputs}
    chosen = [output_value(copy, name) if name is None or name in {v.name for v in copy.graph.outputs}
              else values[name] for name in outputs]
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(chosen)
    return copy


class TempSessions:
    """Sessions over temporary files (sessions are created from paths; models over 2 GB need it)."""

    def __init__(self, threads: int | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bq-post-")
        self._count = 0
        self.threads = threads

    def open(self, model: ir.Model):
        self._count += 1
        path = Path(self._tmp.name) / f"m{self._count}.onnx"
        save_model(model, path)
        if model_nbytes(model) > UNPACKED_SESSION_BYTES:
            return unpacked_session(path, self.threads)
        return get_runtime("onnxruntime").session(path, exact=True, threads=self.threads)

    def close(self) -> None:
        self._tmp.cleanup()


#: Models with more bytes of initializers than this get :func:`unpacked_session` sessions.
UNPACKED_SESSION_BYTES = 512 * 2**20


def unpacked_session(path: str | os.PathLike, threads: int | None = None):
    """An onnxruntime CPU session (as ``get_runtime("onnxruntime").session(path, exact=True)``) that holds no
    copy of the weights: onnxruntime memory-maps the external data file and reads the weights from there.

    Two optimizations would copy them. Pre-packing copies every MatMul/Gemm weight into a packed buffer while
    the mapping is still open (measured on the 128 MiB scale-benchmark model: gradient session peak +150 MiB
    unpacked, +290 MiB packed). Constant folding stores ``Transpose(W)`` of every weight a gradient graph reads
    transposed as a new initializer (measured on the 1 GiB model: +450 MiB resident with folding, +40 MiB
    without). Neither changes the speed of these graphs measurably (3 batches of 32: 1.54 s / 1.56 s).
    Unpacked kernels round differently from packed ones (float32 sums in another order: per-element curvatures
    differ by up to 0.5 % where a sample's output gradients nearly cancel), so models up to
    :data:`UNPACKED_SESSION_BYTES` keep the runtime's usual sessions and their results."""
    import onnxruntime as ort

    from bq_onnx.runtimes.ort import OrtSession

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    try:
        return OrtSession(ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                               disabled_optimizers=["ConstantFolding"]))
    except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: onnxruntime cannot load the model: {first}") from None


def _forward(sessions: TempSessions, prepared: Prepared, output: str | None, calib: Calibration, batch: int = 64):
    session = sessions.open(forward_model(prepared.model, [output]))
    return np.concatenate([session.run(feeds)[0] for feeds in calib.batches(batch)]).astype(np.float32)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def _one_hot(index: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((*index.shape, classes), dtype=np.float32)
    np.put_along_axis(out, index[..., None], 1.0, axis=-1)
    return out


def _check_labels(labels: np.ndarray | None, outputs: np.ndarray, loss: str) -> np.ndarray | None:
    if labels is None:
        return None
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


def _targets(method: str, loss: str, outputs: np.ndarray, labels: np.ndarray | None, rng: np.random.Generator):
    """Per calibration sample, the target fed to the loss graph for one gradient draw."""
    if loss == "mse":
        if method == "hutchinson":
            return outputs if labels is None else labels
        if labels is not None and method == "laplace":
            return labels
        return outputs + rng.standard_normal(outputs.shape).astype(np.float32)
    probs = softmax(outputs)
    classes = outputs.shape[-1]
    if method == "hutchinson":
        return probs if labels is None else _one_hot(labels, classes)
    if method == "fisher-mc":
        u = rng.random(probs.shape[:-1] + (1,))
        drawn = np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), classes - 1)
        return _one_hot(drawn, classes)
    pseudo = labels if labels is not None else outputs.argmax(axis=-1)
    return _one_hot(pseudo, classes)


def _gradient_graph(prepared: Prepared, loss: str, output: str | None, wrt: list[str], as_inputs: bool,
                    model: ir.Model | None = None):
    from bq_onnx.passes.autodiff import build_gradient_model

    model = run_passes(model if model is not None else copy_model(prepared.model), [AppendLossPass(loss, output)])
    return build_gradient_model(model, LOSS, wrt, weights_as_inputs=as_inputs)


def gradients(
    model,
    feeds: Mapping[str, np.ndarray],
    *,
    loss: str = "kl",
    labels: np.ndarray | None = None,
    wrt: Sequence[str] | None = None,
    output: str | None = None,
    min_size: int = 128,
) -> dict[str, np.ndarray]:
    """Gradients of the loss over the batch ``feeds`` with respect to weights (default: all quantizable ones).

    ``loss``: ``kl`` (to the FP32 model's own output distribution; zero at the trained weights, useful at
    perturbed ones), ``ce`` (cross-entropy to integer ``labels``), ``mse`` (to ``labels``, or to the FP32
    output without labels).
    """
    if loss not in LOSS_KINDS:
        raise UsageError(f"loss must be one of {', '.join(LOSS_KINDS)}, got {loss!r}")
    prepared = prepare(model, min_size=min_size)
    names = list(wrt) if wrt is not None else [w.name for w in prepared.weights]
    missing = [n for n in names if n not in prepared.model.graph.initializers]
    if missing:
        raise UsageError(f"not an initializer of the model: {', '.join(missing)}")
    calib = load_calibration(dict(feeds), prepared.model)
    sessions = TempSessions()
    try:
        outputs = _forward(sessions, prepared, output, calib, batch=calib.num_samples)
        if loss == "ce" and labels is None:
            raise UsageError("loss 'ce' needs labels")
        labels = _check_labels(labels, outputs, loss)
        if loss == "kl":
            target = softmax(outputs)
        elif loss == "ce":
            target = _one_hot(labels, outputs.shape[-1])
        else:
            target = outputs if labels is None else labels
        graph = _gradient_graph(prepared, loss, output, names, as_inputs=False)
        if graph.unsupported:
            first = next(iter(graph.unsupported.items()))
            raise UsageError(f"no gradient for '{first[0]}': no rule for {', '.join(first[1])}")
        session = sessions.open(graph.model)
        result = session.run({**calib.arrays, TARGET: target})
        by_name = dict(zip(session.output_names, result))
        return {w: by_name[graph.gradients[w]] for w in names}
    finally:
        sessions.close()


@dataclasses.dataclass
class PosteriorOptions:
    """How to estimate the posterior; the CLI's ``--method``, ``--loss``, ... map onto these."""

    method: str = "laplace"
    loss: str = "kl"
    labels: np.ndarray | None = None
    output: str | None = None
    prior_precision: float = DEFAULT_PRIOR_PRECISION
    probes: int = 4
    mc_samples: int = 1
    calib_samples: int | None = None
    batch_size: int = 32
    seed: int = 0

    def check(self) -> None:
        if self.method not in METHODS or self.method == "external":
            known = ", ".join(m for m in METHODS if m != "external")
            raise UsageError(f"--method must be one of {known}, got {self.method!r}")
        if self.loss not in LOSS_KINDS:
            raise UsageError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {self.loss!r}")
        if self.loss == "ce" and self.labels is None:
            raise UsageError("--loss ce needs labels (--labels)")
        if self.probes < 1 or self.mc_samples < 1 or self.batch_size < 1:
            raise UsageError("--probes, --mc-samples and --batch-size must be >= 1")
        if not self.prior_precision > 0:
            raise UsageError(f"--prior-precision must be > 0, got {self.prior_precision}")


def estimate_posterior(
    model,
    calibration: CalibrationSource | Calibration,
    method: str = "laplace",
    *,
    min_size: int = 128,
    keep_fp: Sequence[str] = (),
    progress_bar: bool = False,
    **options,
) -> Posterior:
    """A diagonal Gaussian posterior over every quantizable weight of ``model`` from calibration data.

    ``options`` are the fields of :class:`PosteriorOptions` (loss, labels, output, prior_precision, probes,
    mc_samples, calib_samples, batch_size, seed).
    """
    opts = PosteriorOptions(method=method, **options)
    opts.check()
    return estimate_prepared(prepare(model, min_size=min_size, keep_fp=keep_fp), calibration, opts, progress_bar)


def estimate_prepared(
    prepared: Prepared, calibration: CalibrationSource | Calibration, opts: PosteriorOptions, progress_bar: bool
) -> Posterior:
    """The estimator on a model already prepared by the pipeline (used by ``optimize --calib``)."""
    opts.check()
    calib = load_calibration(calibration, prepared.model, opts.calib_samples)
    n = calib.num_samples
    rng = np.random.default_rng(opts.seed)
    method, loss = opts.method, opts.loss
    notes: list[str] = []
    factors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    sessions = TempSessions()
    spill = Spill()  # every weight's curvature goes to disk as soon as it is known; the posterior reads it back
    try:
        curvature = SpilledArrays(spill)
        sources: dict[str, str] = {}
        names = [w.name for w in prepared.weights]
        if method != "activations":
            outputs = _forward(sessions, prepared, opts.output, calib)
            labels = _check_labels(opts.labels, outputs, loss)
            grad_model, sites = None, []
            if method == "kfac":
                from bq_onnx.kfac import add_probes

                grad_model = copy_model(prepared.model)
                first = next(calib.batches(1))
                sites = add_probes(grad_model, [w for w in _weights_of(grad_model, prepared)], first)
            elif method in ("laplace", "fisher-mc"):
                batched = _batched_squared_gradients(sessions, prepared, calib, outputs, labels, opts, rng,
                                                     progress_bar, spill)
                curvature.update(batched)
                sources.update({w: method for w in batched})
                names = [w for w in names if w not in batched]
                grad_model = specialise(copy_model(prepared.model), next(calib.batches(1)))
            probes = [site.probe for site in sites]
            graph = _gradient_graph(prepared, loss, opts.output, names + probes, as_inputs=method == "hutchinson",
                                    model=grad_model) if names or probes else None
            if graph is None:
                names = []
            for weight, ops in (graph.unsupported.items() if graph is not None else ()):
                if weight in names:
                    notes.append(f"'{weight}': no gradient rule for {', '.join(ops)}; used the activations estimator")
            wrt = [w for w in names if w in graph.gradients] if graph is not None else []
            if method == "kfac":
                sites = [site for site in sites if site.probe in graph.gradients]
                session = sessions.open(graph.model)
                stats, found = _kfac(sessions, session, graph, prepared, sites, wrt, calib, outputs, labels, loss,
                                       opts.mc_samples, opts.batch_size, rng, progress_bar)
                curvature.update(stats)
                factors.update(found)
                sources.update({w: "kfac" if w in found else "fisher-mc" for w in stats})
                wrt = []
            if wrt:
                session = sessions.open(graph.model)
                if method == "hutchinson":
                    stats = _hutchinson(session, graph, prepared, wrt, calib, outputs, labels, loss, opts.probes,
                                        opts.batch_size, rng, progress_bar)
                    layouts = {w.name: w.layout for w in prepared.weights}
                    stats = {w: rank_one_smooth(d, layouts[w]) for w, d in stats.items()}
                else:
                    stats = _squared_gradients(session, graph, wrt, calib, outputs, labels, loss, method,
                                               opts.mc_samples, rng, progress_bar)
                curvature.update(stats)
                sources.update({w: method for w in wrt})
        rest = [w for w in prepared.weights if w.name not in curvature]
        if rest:
            curvature.update(_activation_curvature(sessions, prepared, rest, calib, opts.batch_size, progress_bar))
            sources.update({w.name: "activations" for w in rest})
    finally:
        sessions.close()
    weights = {}
    for info in prepared.weights:  # one weight at a time: read its curvature, finish it, write it back
        raw = curvature[info.name]
        filled = fill_unseen_rows(info, raw)
        if filled is not None:
            raw, count = filled
            notes.append(f"'{info.name}': {count} embedding row(s) never read by the calibration data were given "
                         f"the mean curvature of the rows that were")
        weights[info.name] = spilled_posterior(info.value.const_value, raw, n, opts.prior_precision,
                                               sources[info.name], spill, curvature.path(info.name))
        del raw, filled
        if method == "kfac" and info.name in factors:
            weights[info.name].kfac = factors[info.name]
    return Posterior(method, n, opts.prior_precision, weights, notes)


def _squared_gradients(session, graph, wrt, calib, outputs, labels, loss, method, mc_samples, rng, bar):
    acc = SumAccumulator()
    for draw in range(mc_samples):
        targets = _targets(method, loss, outputs, labels, rng)
        for i, feeds in enumerate(progress(calib.batches(1), f"{method} {draw + 1}/{mc_samples}", bar)):
            result = session.run({**feeds, TARGET: targets[i : i + 1]})
            by_name = dict(zip(session.output_names, result))
            acc.update({w: np.square(by_name[graph.gradients[w]]) for w in wrt})
    return acc.mean()


def _batched_squared_gradients(sessions, prepared, calib, outputs, labels, opts, rng, bar,
                               spill: Spill | None = None) -> Mapping[str, np.ndarray]:
    """Empirical (laplace) or sampled (fisher-mc) Fisher diagonals of the weights that ``bq_onnx.per_sample``
    covers, from batched runs: each sample's weight gradient is formed from its layer input and output gradient.
    With ``spill``, layers whose inputs and output gradients take less room than their sum are summed one
    weight at a time when the result is read (see :meth:`BatchedFisher.spill_to`).
    """
    n = calib.num_samples
    batch = min(opts.batch_size, n)
    fisher = BatchedFisher.build(sessions, prepared, calib, opts.loss, opts.output, batch) if batch > 1 else None
    if fisher is None:
        return {}
    batch = fisher.batch  # at most the requested one: fewer when a batch's activations exceed the budget
    if spill is not None:
        fisher.spill_to(spill, opts.mc_samples * -(-n // batch))
    for draw in range(opts.mc_samples):
        targets = _targets(opts.method, opts.loss, outputs, labels, rng)
        starts = list(range(0, n, batch))
        for start in progress(starts, f"{opts.method} {draw + 1}/{opts.mc_samples} (batched)", bar):
            fisher.add(calib, targets, start)
    return fisher.result(n * opts.mc_samples)


@dataclasses.dataclass
class BatchedFisher:
    """A gradient graph with respect to output probes, run on ``batch`` samples at a time (see per_sample)."""

    session: object
    sites: list
    gradients: dict[str, str]
    layouts: dict
    batch: int
    sums: dict[str, np.ndarray]
    spill: Spill | None = None
    batches: int = 0  # how many batches the caller will add (decides which sites go to disk)
    stored: dict[str, list[tuple[object, object]]] = dataclasses.field(default_factory=dict)

    def spill_to(self, spill: Spill, batches: int) -> None:
        """Keep each batch's layer inputs and output gradients on disk rather than summing ``g_n^2`` in memory,
        for every site where ``batches`` of them take less room than its float64 ``(K, N)`` sum (a wide layer
        and a few hundred samples: megabytes instead of twice the weight). :meth:`result` then forms each sum
        when it is read, from the same batches in the same order, so the numbers are the same."""
        self.spill, self.batches = spill, batches

    @classmethod
    def build(cls, sessions: TempSessions, prepared: Prepared, calib: Calibration, loss: str, output: str | None,
              batch: int) -> BatchedFisher | None:
        """The gradient graph at ``batch`` samples, or fewer where that many samples' activations and gradients
        would exceed :func:`activation_budget`."""
        from bq_onnx.kfac import add_probes
        from bq_onnx.per_sample import covers

        model = copy_model(prepared.model)  # one copy serves the batch check and the gradient graph
        batch_major = _batch_major_weights(prepared, calib, model)
        if not batch_major:
            return None
        batch = adapted_batch(_activation_bytes_per_sample(model, calib), batch)
        _forget_shapes(model)  # the symbolic shapes give way to the batch's static ones
        sites = add_probes(model, _weights_of(model, prepared), next(calib.batches(batch)), gather=True)
        sites = [s for s in sites if s.weight in batch_major and covers(s, batch_major[s.weight])]
        if not sites:
            return None
        graph = _gradient_graph(prepared, loss, output, [s.probe for s in sites], as_inputs=False, model=model)
        sites = [s for s in sites if s.probe in graph.gradients]
        if not sites:
            return None
        values = {v.name: v for v in _all_values(graph.model)}
        inputs = {v.name for v in graph.model.graph.inputs}
        present = {v.name for v in graph.model.graph.outputs}
        for name in sorted({s.activation for s in sites} - inputs - present):
            graph.model.graph.outputs.append(values[name])
        layouts = {w.name: w.layout for w in prepared.weights}
        sums = {s.weight: np.zeros(layouts[s.weight].view_shape) for s in sites}
        return cls(sessions.open(graph.model), sites, dict(graph.gradients), layouts, batch, sums)

    def add(self, calib: Calibration, targets: np.ndarray, start: int) -> None:
        """Add ``sum_n g_n^2`` of the samples ``start .. start + batch``."""
        from bq_onnx.per_sample import squared_gradient_sum

        count = min(self.batch, calib.num_samples - start)
        rows = start + np.arange(self.batch) % count  # a short last batch is padded with its own samples
        feeds = {k: v[rows] for k, v in calib.arrays.items()}
        out = dict(zip(self.session.output_names, self.session.run({**feeds, TARGET: targets[rows]})))
        for site in self.sites:
            act = feeds[site.activation] if site.activation in feeds else out[site.activation]
            grad = out[self.gradients[site.probe]]
            layout = self.layouts[site.weight]
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

    def result(self, count: int) -> Mapping[str, np.ndarray]:
        """Per weight, the mean of ``g_n^2`` over ``count`` samples; a site kept on disk is summed when read."""
        names = [s.weight for s in self.sites if s.weight in self.sums or s.weight in self.stored]
        return LazyArrays(names, lambda w: self.layouts[w].from_view(self._total(w) / count))

    def _total(self, weight: str) -> np.ndarray:
        from bq_onnx.per_sample import squared_gradient_sum

        if weight in self.sums:
            return self.sums[weight]
        site = next(s for s in self.sites if s.weight == weight)
        layout = self.layouts[weight]
        total = np.zeros(layout.view_shape)
        for act, grad in self.stored[weight]:
            total += squared_gradient_sum(site, layout.shape, layout.view_shape, np.load(act), np.load(grad))
        return total


class LazyArrays(Mapping):
    """A read-only mapping whose values are computed when read (and not kept)."""

    def __init__(self, names: Sequence[str], compute: Callable[[str], np.ndarray]) -> None:
        self._names = list(names)
        self._compute = compute

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return self._compute(name)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class SpilledArrays(MutableMapping):
    """Arrays by name, each written to a :class:`Spill` when set and read back whole when got: a mapping of
    every weight's curvature that holds none of them in memory."""

    def __init__(self, spill: Spill) -> None:
        self.spill = spill
        self._paths: dict[str, object] = {}

    def path(self, name: str):
        return self._paths[name]

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        self._paths[name] = self.spill.put(np.asarray(value), self._paths.get(name))

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self._paths[name], allow_pickle=False)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def __delitem__(self, name: str) -> None:
        del self._paths[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._paths)

    def __len__(self) -> int:
        return len(self._paths)


def spilled_posterior(tensor, curvature: np.ndarray, samples: int, prior_precision: float, source: str,
                      spill: Spill, path=None) -> WeightPosterior:
    """:func:`bq_onnx.posterior.posterior_from_curvature` with nothing held: the clipped curvature is written to
    ``spill`` (over ``path`` when given), the precision is derived from it when read, and the mean is read from
    the model's own tensor (``tensor``: external data is read from its file, never copied)."""
    clipped = np.maximum(np.asarray(curvature, dtype=np.float64), 0.0)
    path = spill.put(clipped, path)
    del clipped

    def mean() -> np.ndarray:
        return np.asarray(tensor.numpy(), dtype=np.float32)

    return WeightPosterior(mean, None, spill.reader(path), source, samples=samples, prior_precision=prior_precision)


def _batch_major_weights(prepared: Prepared, calib: Calibration, model: ir.Model | None = None) -> dict[str, int]:
    """Weights whose single consumer reads and writes sample-major tensors (first axis = the calibration
    sample axis, by shape inference with a symbolic batch), with their use counts. A model whose inputs have a
    fixed first dimension is not batched at all. ``model``: a copy of the prepared model whose shapes this may
    rewrite (default: a fresh copy)."""
    from onnx_ir.passes.common import ShapeInferencePass

    model = copy_model(prepared.model) if model is None else model
    symbol = "bq_samples"
    for value in model.graph.inputs:
        if value.name not in calib.arrays:
            continue
        if value.shape is not None and len(value.shape) and isinstance(value.shape[0], int):
            return {}
        dims = list(calib.arrays[value.name].shape[1:])
        value.shape = ir.Shape([symbol, *dims])
    _forget_shapes(model)  # exported annotations would stop the symbol from propagating
    try:
        ShapeInferencePass(check_type=False, strict_mode=False)(model)
    except Exception:  # noqa: BLE001 - no inferred shapes: nothing is known to be sample-major
        return {}

    def sample_major(value: ir.Value | None) -> bool:
        if value is None or value.shape is None or len(value.shape) < 2:
            return False
        dim = value.shape[0]
        return isinstance(dim, ir.SymbolicDim) and dim.value == symbol

    found = {}
    for info in prepared.weights:
        uses = list(model.graph.initializers[info.name].uses())
        if not uses:
            continue
        node = uses[0].node
        reads = node.inputs[1] if node.op_type == "Gather" and len(node.inputs) > 1 else node.inputs[0]
        if sample_major(reads) and sample_major(node.outputs[0]):
            found[info.name] = len(uses)
    return found


def fill_unseen_rows(info: WeightInfo, curvature: np.ndarray) -> tuple[np.ndarray, int] | None:
    """Rows of a Gather table (token embeddings) that no calibration sample reads get the mean curvature of the
    rows that were read: the data say nothing about them, but a deployed model will meet those tokens, so they are
    treated as exchangeable with the seen ones rather than as unimportant (which would store them at 0 bits)."""
    uses = list(info.value.uses())
    if not uses or any(u.node.op_type != "Gather" or u.idx != 0 for u in uses):
        return None
    if any(int(a.value) != 0 for u in uses for k, a in u.node.attributes.items() if k == "axis"):
        return None
    rows = np.asarray(curvature, dtype=np.float64).reshape(curvature.shape[0], -1)
    seen = rows.sum(axis=1) > 0
    if seen.all() or not seen.any():
        return None
    filled = rows.copy()
    filled[~seen] = rows[seen].mean(axis=0)
    return filled.reshape(curvature.shape), int((~seen).sum())


def _forget_shapes(model: ir.Model) -> None:
    for node in model.graph:
        for out in node.outputs:
            out.shape = None


def _hutchinson(session, graph, prepared, wrt, calib, outputs, labels, loss, probes, batch_size, rng, bar):
    """E[v * Hv] with Hv = (g(w + eps v) - g(w - eps v)) / (2 eps), over batches (Hessian of the batch sum).

    Probes perturb one weight tensor at a time: a joint probe over all tensors adds the couplings between
    tensors to every estimate as zero-mean noise that, in a 60k-weight LeNet, needs hundreds of probes to
    average out (measured: 2.3x off the exact last-layer Fisher with 8 joint probes, 1.01x with per-tensor ones).
    It costs two gradient runs per tensor per probe and batch.
    """
    targets = _targets("hutchinson", loss, outputs, labels, rng)
    base = {w: np.asarray(prepared.model.graph.initializers[w].const_value.numpy(), dtype=np.float32) for w in wrt}
    steps = {w: np.float32(HVP_STEP * max(float(np.sqrt(np.mean(np.square(v)))), 1e-8)) for w, v in base.items()}
    acc = SumAccumulator()
    starts = range(0, calib.num_samples, batch_size)
    for start in progress(list(starts), "hutchinson", bar):
        feeds = {k: v[start : start + batch_size] for k, v in calib.arrays.items()}
        feeds[TARGET] = targets[start : start + batch_size]
        count = len(feeds[TARGET])
        stats = {w: np.zeros(base[w].shape) for w in wrt}
        for _ in range(probes):
            for w in wrt:
                v = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=base[w].shape)
                g = graph.gradients[w]
                plus = dict(zip(session.output_names, session.run({**feeds, w: base[w] + steps[w] * v})))[g]
                minus = dict(zip(session.output_names, session.run({**feeds, w: base[w] - steps[w] * v})))[g]
                hv = (plus.astype(np.float64) - minus.astype(np.float64)) / (2.0 * float(steps[w]))
                stats[w] += v * hv / probes
        acc.update(stats, samples=count)
    return acc.mean()


def specialise(model: ir.Model, sample: Mapping[str, np.ndarray]) -> ir.Model:
    """Fix the inputs to one sample's shapes and infer the rest: per-sample gradient graphs run at batch 1, and
    static shapes let the autodiff use its direct Conv weight-gradient form (2-3x faster than the unfold form
    that symbolic shapes need)."""
    from onnx_ir.passes.common import ShapeInferencePass

    for value in model.graph.inputs:
        if value.name in sample:
            value.shape = ir.Shape(list(sample[value.name].shape))
    ShapeInferencePass(check_type=False, strict_mode=False)(model)
    return model


def _weights_of(model: ir.Model, prepared: Prepared) -> list[WeightInfo]:
    """The prepared weights, re-pointed at the same-named initializers of a copy of the model."""
    return [dataclasses.replace(w, value=model.graph.initializers[w.name]) for w in prepared.weights]


def _kfac(sessions, session, graph, prepared, sites, wrt, calib, outputs, labels, loss, mc_samples, batch_size,
          rng, bar):
    """K-FAC factors for MatMul/Gemm/Conv weights (sampled labels: the true Fisher); others get fisher-mc."""
    from bq_onnx.kfac import KfacStats, gradient_rows, input_rows

    covered = {site.weight for site in sites}
    layouts = {w.name: w.layout for w in prepared.weights}
    # A: layer inputs, from batched forward runs of the plain model
    capture = forward_model(prepared.model, sorted({site.activation for site in sites}))
    stats = KfacStats()
    if sites:
        forward = sessions.open(capture)
        for feeds in progress(list(calib.batches(batch_size)), "kfac inputs", bar):
            acts = dict(zip(forward.output_names, forward.run(feeds)))
            for site in sites:
                x = acts[site.activation]
                for i in range(len(x)):
                    stats.add_inputs(site.weight, input_rows(site, x[i : i + 1], layouts[site.weight].shape))
    # G: output gradients (probes), and fisher-mc squared gradients for the weights K-FAC does not cover
    diag = SumAccumulator()
    for draw in range(mc_samples):
        targets = _targets("fisher-mc", loss, outputs, labels, rng)
        for i, feeds in enumerate(progress(calib.batches(1), f"kfac {draw + 1}/{mc_samples}", bar)):
            out = dict(zip(session.output_names, session.run({**feeds, TARGET: targets[i : i + 1]})))
            for site in sites:
                rows = gradient_rows(site, out[graph.gradients[site.probe]])
                stats.add_gradients(site.weight, rows, 1.0 / mc_samples)
            diag.update({w: np.square(out[graph.gradients[w]]) for w in wrt if w not in covered})
    stats.count = calib.num_samples
    curvature = diag.mean() if diag.count else {}
    factors = {}
    for site in sites:
        a, g, view_diag = stats.result(site.weight)
        factors[site.weight] = (a, g)
        curvature[site.weight] = layouts[site.weight].from_view(view_diag)
    return curvature, factors


def rank_one_smooth(raw: np.ndarray, layout) -> np.ndarray:
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


# --- activations -----------------------------------------------------------------------------------------------


def _activation_site(weight: ir.Value):
    """(activation value, how to reduce it) for the first consumer that reads the weight as a weight."""
    for use in weight.uses():
        node, idx = use.node, use.idx
        op = node.op_type
        attrs = {k: a.value for k, a in node.attributes.items()}
        if op == "MatMul" and idx == 1:
            return node.inputs[0], ("last", None)
        if op == "MatMul" and idx == 0:
            return node.inputs[1], ("second_last", None)
        if op == "Gemm" and idx == 1:
            return node.inputs[0], ("axis", 0 if attrs.get("transA", 0) else 1)
        if op == "Gemm" and idx == 0:
            return node.inputs[1], ("axis", 1 if attrs.get("transB", 0) else 0)
        if op == "Conv" and idx == 1:
            return node.inputs[0], ("channels", int(attrs.get("group", 1)))
        if op == "ConvTranspose" and idx == 1:
            return node.inputs[0], ("in_channels", None)
        if op == "Gather" and idx == 0:
            return node.inputs[1], ("tokens", None)
    return None, None


def _activation_curvature(sessions, prepared: Prepared, infos: list[WeightInfo], calib, batch_size, bar):
    sites = {}
    for info in infos:
        value, how = _activation_site(prepared.model.graph.initializers[info.name])
        if value is None:
            raise DataError(f"weight '{info.name}': cannot find the activation that feeds it")
        sites[info.name] = (value.name, how)
    session = sessions.open(forward_model(prepared.model, sorted({name for name, _ in sites.values()})))
    acc = SumAccumulator()
    for feeds in progress(list(calib.batches(batch_size)), "activations", bar):
        out = dict(zip(session.output_names, session.run(feeds)))
        stats = {}
        for info in infos:
            name, how = sites[info.name]
            stats[info.name] = _channel_energy(out[name], how, info)
        acc.update(stats, samples=len(next(iter(feeds.values()))))
    curvature = {}
    for info in infos:
        curvature[info.name] = _expand_channels(acc.mean()[info.name], sites[info.name][1], info)
    return curvature


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs


def _channel_energy(x: np.ndarray, how, info: WeightInfo) -> np.ndarray:
    """Sum over everything but the channel axis of x^2 (summed over the batch; the accumulator divides)."""
    kind, arg = how
    if kind == "tokens":
        vocab = info.layout.shape[0]
        return np.bincount(x.reshape(-1).astype(np.int64) % vocab, minlength=vocab).astype(np.float64)
    x = np.asarray(x, dtype=np.float64)
    axis = {"last": x.ndim - 1, "second_last": x.ndim - 2, "axis": arg, "channels": 1, "in_channels": 1}[kind]
    other = tuple(a for a in range(x.ndim) if a != axis)
    return np.sum(np.square(x), axis=other)


def _expand_channels(energy: np.ndarray, how, info: WeightInfo) -> np.ndarray:
    """Per-channel input energy -> per-element curvature in the weight's own shape."""
    kind, arg = how
    shape = info.layout.shape
    if kind == "tokens":  # table [V, D]: every element of row v is read as often as token v
        return np.broadcast_to(energy[:, None], shape).astype(np.float64)
    if kind in ("last", "axis", "second_last") and len(shape) == 2:
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

