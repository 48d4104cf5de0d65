"""Which loss fits which output: ``--loss`` terms (or the default rule) resolved against the model's outputs and
their FP32 values on the calibration data, and the loss's divergence in float64 numpy (the measured tables).

The default rule (no ``--loss``, or a term of kind ``auto``), on the ``--output-name`` output or else the first
float output (integer and boolean outputs, such as token ids, are never fitted):

1. ``kl`` on probabilities when every FP32 row of the last axis (>= 2 entries) is non-negative and sums to 1
   (within 1e-3): the output is a distribution, checked on the data.
2. ``cosine`` when every FP32 row of the last axis (>= 2 entries) has unit L2 norm (within 1e-3): a normalized
   embedding.
3. ``kl`` on logits when the output comes straight from a linear layer (MatMul or Gemm, or one plus a constant
   bias) with a last axis of >= 2 classes: a classifier's or a language model's head. Logits cannot be told from
   a linear regression by their values, so this test is structural; ``--loss OUTPUT=smse`` overrides it.
4. otherwise ``smse``, the scale-free MSE: channels lie on the smallest non-batch axis of size > 1 (ties: the
   later; a detector's ``[N, 22, 2100]`` -> axis 1; ``[N, D]`` -> the last axis) and each is divided by its FP32
   spread ``s_c``, the standard deviation over calibration samples and every other axis, floored at ``1e-3`` of
   the channel's RMS and ``1e-6`` of the output's RMS (a constant channel does not get an infinite weight).

An explicit ``kl``/``ce`` also reads probabilities where rule 1 holds; an explicit ``mse`` is the plain,
unscaled one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.loss import FLOATS, LossPlan, Term, output_value
from bq_onnx.calibration import Calibration
from bq_onnx.errors import UsageError
from bq_onnx.graph import forward_model
from bq_onnx.loss_spec import LossTerm
from bq_onnx.runs import Runs, samples_first
from bq_onnx.runtimes.sessions import TempSessions

ROW_TOLERANCE = 1e-3
"""How far a row's sum (probabilities) or L2 norm (embeddings) may be from 1."""
SPREAD_FLOOR = 1e-3
"""A channel's spread is at least this fraction of its RMS value."""


def default_output(model: ir.Model, output: str | None) -> str:
    """``output`` (checked to be a float graph output) or the first float graph output."""
    if output is not None:
        value = output_value(model, output)
        _check_float(value, "--output-name")
        return output
    for value in model.graph.outputs:
        if value.dtype is None or value.dtype in FLOATS:
            return value.name
    raise UsageError("the model has no float output for the loss to fit (outputs: "
                     f"{', '.join(f'{v.name} ({_dtype(v)})' for v in model.graph.outputs)})")


def _dtype(value: ir.Value) -> str:
    return value.dtype.name.lower() if value.dtype is not None else "unknown"


def _check_float(value: ir.Value, flag: str) -> None:
    if value.dtype is not None and value.dtype not in FLOATS:
        raise UsageError(f"{flag}: output '{value.name}' is {_dtype(value)}, not float; a loss fits float outputs "
                         f"only")


def outputs_needed(model: ir.Model, spec: Sequence[LossTerm] | None, output: str | None) -> list[str]:
    """The graph outputs the terms read, in first-use order, each checked to exist and be float."""
    names: list[str] = []
    for term in spec or (LossTerm("auto"),):
        if term.output is None:
            name = default_output(model, output)
        else:
            _check_float(output_value(model, term.output), "--loss")
            name = term.output
        if name not in names:
            names.append(name)
    return names


def fp32_values(sessions: TempSessions, model: ir.Model, names: list[str], calib: Calibration,
                batch: int = 64) -> tuple[dict[str, np.ndarray | Runs], dict[str, int]]:
    """The FP32 values of outputs ``names`` on every calibration sample, as float32: stacked along the axis of
    the samples (moved first), or kept per run where no axis is (:func:`bq_onnx.runs.samples_first`); and each
    output's sample axis as the model returns it."""
    session = sessions.open(forward_model(model, names))
    runs = [session.run(feeds) for feeds in calib.batches(batch)]
    sizes = calib.run_sizes(batch)
    out: dict[str, np.ndarray | Runs] = {}
    axes: dict[str, int] = {}
    for i, name in enumerate(names):
        out[name], axes[name] = samples_first([np.asarray(r[i], np.float32) for r in runs], sizes)
    return out, axes


def reference_plan(sessions: TempSessions, model: ir.Model, spec: Sequence[LossTerm] | None, output: str | None,
                   calib: Calibration, batch: int = 64) -> tuple[LossPlan, list[np.ndarray]]:
    """The resolved loss and, per term, its FP32 (sliced) output on every calibration sample."""
    names = outputs_needed(model, spec, output)
    values, axes = fp32_values(sessions, model, names, calib, batch)
    stacked = {k: v.stacked() if isinstance(v, Runs) else v for k, v in values.items()}
    plan, outs = resolve(model, spec, output, stacked, axes)
    if any(isinstance(v, Runs) for v in values.values()):
        plan = dataclasses.replace(plan, per_run=True)
    return plan, [_term_runs(t, values[t.output]) if isinstance(values[t.output], Runs) else y
                  for t, y in zip(plan.terms, outs)]


def _term_runs(t: Term, runs: Runs) -> Runs:
    """A term's FP32 output kept per run: each run's output, sliced like the term."""
    return runs.map(lambda y: y[..., t.start:t.stop]) if t.start is not None else runs


def resolve(model: ir.Model, spec: Sequence[LossTerm] | None, output: str | None,
            values: dict[str, np.ndarray], axes: dict[str, int] | None = None) -> tuple[LossPlan, list[np.ndarray]]:
    """Each term bound to its output, slice and kind (``auto`` by the rule above), with its FP32 values
    (samples first; ``axes``: where an output returns them, where not its first axis)."""
    outputs_needed(model, spec, output)  # every output exists and is float
    terms, outs = [], []
    for term in spec or (LossTerm("auto"),):
        name = term.output if term.output is not None else default_output(model, output)
        y = values[name]
        start, stop = _slice(term, y, name)
        if start is not None:
            y = y[..., start:stop]
        kind, probabilities, axis, scale, why = _kind(model, name, term.kind, y, sliced=start is not None)
        terms.append(Term(kind, name, start, stop, term.weight, probabilities=probabilities, axis=axis, scale=scale,
                          dims=tuple(y.shape[1:]), why=why, sample_axis=(axes or {}).get(name, 0)))
        outs.append(y)
    return LossPlan(tuple(terms)), outs


def _slice(term: LossTerm, y: np.ndarray, name: str) -> tuple[int | None, int | None]:
    if not term.sliced:
        return None, None
    if y.ndim < 2:
        raise UsageError(f"--loss {term}: output '{name}' has no axis besides the samples to slice")
    size = y.shape[-1]
    start, stop, step = slice(term.start, term.stop).indices(size)
    if stop <= start:
        raise UsageError(f"--loss {term}: the slice is empty on a last axis of {size}")
    return start, stop


def _kind(model: ir.Model, name: str, kind: str, y: np.ndarray, sliced: bool
          ) -> tuple[str, bool, int | None, tuple[float, ...] | None, str]:
    """(kind, reads probabilities, smse channel axis, smse 1/spread, why) for one term's FP32 values."""
    last = y.shape[-1] if y.ndim >= 2 else 1
    probabilities = last >= 2 and is_distribution(y)
    if kind in ("kl", "ce"):
        if last < 2:
            raise UsageError(f"--loss {kind} on '{name}': a distribution needs a last axis of >= 2 entries, "
                             f"got shape {list(y.shape)}")
        return kind, probabilities, None, None, "asked for"
    if kind == "mse" or kind == "cosine":
        return kind, False, None, None, "asked for"
    if kind == "smse":
        axis, scale = channel_scale(y)
        return kind, False, axis, scale, "asked for"
    if probabilities:
        return "kl", True, None, None, "FP32 rows are non-negative and sum to 1: a distribution"
    if last >= 2 and has_unit_rows(y):
        return "cosine", False, None, None, "FP32 rows have unit L2 norm: an embedding"
    if last >= 2 and not sliced and linear_head(model, name):
        return "kl", False, None, None, f"a linear layer's output over {last} classes: logits"
    axis, scale = channel_scale(y)
    return "smse", False, axis, scale, "no distribution: each channel divided by its FP32 spread"


def is_distribution(y: np.ndarray) -> bool:
    """Every row of the last axis non-negative and summing to 1."""
    y = np.asarray(y, dtype=np.float64)
    return bool(y.size and y.min() >= -1e-6 and np.abs(y.sum(axis=-1) - 1.0).max() <= ROW_TOLERANCE)


def has_unit_rows(y: np.ndarray) -> bool:
    """Every row of the last axis of unit L2 norm."""
    y = np.asarray(y, dtype=np.float64)
    return bool(y.size and np.abs(np.linalg.norm(y, axis=-1) - 1.0).max() <= ROW_TOLERANCE)


def linear_head(model: ir.Model, name: str) -> bool:
    """Whether graph output ``name`` is a MatMul/Gemm output, or one plus a constant bias."""
    node = output_value(model, name).producer()
    if node is not None and node.op_type == "Add" and len(node.inputs) == 2:
        consts = [v is not None and (v.const_value is not None or v.is_initializer()) for v in node.inputs]
        if sum(consts) == 1:
            node = node.inputs[consts.index(False)].producer()
    return node is not None and node.op_type in ("MatMul", "Gemm")


def channel_axis(shape: Sequence[int]) -> int | None:
    """The smallest non-batch axis of size > 1 (ties: the later); None when there is none."""
    axes = [a for a in range(1, len(shape)) if shape[a] > 1]
    return min(reversed(axes), key=lambda a: shape[a]) if axes else None


def channel_scale(y: np.ndarray) -> tuple[int | None, tuple[float, ...]]:
    """smse's channel axis and ``1 / s_c`` per channel (one value when there is no channel axis)."""
    y = np.asarray(y, dtype=np.float64)
    axis = channel_axis(y.shape)
    rows = np.moveaxis(y, axis, 0).reshape(y.shape[axis], -1) if axis is not None else y.reshape(1, -1)
    overall = float(np.sqrt(np.mean(np.square(y)))) if y.size else 0.0
    if overall == 0.0:
        return axis, tuple(1.0 for _ in rows)
    spread = rows.std(axis=1)
    floor = np.maximum(SPREAD_FLOOR * np.sqrt(np.mean(np.square(rows), axis=1)), 1e-6 * overall)
    return axis, tuple(float(v) for v in 1.0 / np.maximum(spread, floor))


def divergence(plan: LossPlan, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> np.ndarray:
    """Per sample, the loss of ``candidate`` outputs against the FP32 ``reference`` (float64): KL(ref || cand)
    for kl/ce terms (no labels here), the (scaled) squared error, or 1 - cosine; weighted and summed.
    Terms of different row counts (outputs kept per run, stacked) give one figure: the sum of each term's mean."""
    rows = {len(r) for r in reference}
    if len(rows) > 1:  # outputs kept per run stack to rows that are not the samples: one figure, each term's mean
        return np.array([sum(float(np.mean(divergence(LossPlan((t,)), [r], [c])))
                             for t, r, c in zip(plan.terms, reference, candidate))])
    total = np.zeros(len(reference[0]))
    for t, r, c in zip(plan.terms, reference, candidate):
        r, c = np.asarray(r, np.float64), np.asarray(c, np.float64)
        n = len(r)
        if t.kind in ("kl", "ce"):
            if t.probabilities:
                log_p, log_q = np.log(r + 1e-12), np.log(c + 1e-12)
            else:
                log_p, log_q = _log_softmax(r), _log_softmax(c)
            per = np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)
        elif t.kind in ("mse", "smse"):
            d = c - r
            if t.kind == "smse":
                d = d * _broadcast(t, r.ndim)
            per = 0.5 * np.square(d)
        else:
            dot, norms = np.sum(c * r, axis=-1), np.sqrt(np.sum(c * c, axis=-1) * np.sum(r * r, axis=-1) + 1e-12)
            per = 1.0 - dot / norms
        total += t.weight * per.reshape(n, -1).sum(axis=1)
    return total


def _broadcast(t: Term, rank: int) -> np.ndarray:
    scale = np.asarray(t.scale, dtype=np.float64)
    return scale.reshape([len(scale)] + [1] * (rank - 1 - t.axis)) if t.axis is not None else scale


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
