"""The scalar loss appended to a model so the autodiff can differentiate it: a weighted sum of terms, each on one
float output (or a slice of its last axis), summed over samples (so each sample's gradient sees its own loss).

Per term, with ``t`` the target fed at run time:

* ``kl``/``ce``: ``-sum(t * log q)`` with ``log q = LogSoftmax(y)`` over the last axis (logits), or ``Log(y + eps)``
  where the output already holds probabilities. Feeding the FP32 distribution gives the label-free KL up to the
  constant entropy (no gradient); one-hot labels give cross-entropy; one-hot pseudo-labels or labels drawn from
  the predictive distribution give the empirical and the Monte-Carlo Fisher.
* ``mse``: ``0.5 * sum((y - t)^2)``; ``smse``: the same with each channel of ``axis`` divided by its FP32 spread,
  ``0.5 * sum(((y - t) / s_c)^2)``, so no unit dominates.
* ``cosine``: ``sum over last-axis rows of 1 - <y, t> / sqrt(|y|^2 |t|^2 + eps)``.

One term reads ``bq_target`` shaped like its output; several terms read one ``[N, D_1 + D_2 + ...]`` target, each
term's flattened per-sample target side by side (:func:`bq_onnx.estimators.loss_targets.pack`). Where outputs are
kept per run (their first axis is not the samples: :mod:`bq_onnx.runs`), several terms read one ``[1, L]`` row per
run: each term's whole target for the run, flattened, side by side, cut back at the sizes of the run's outputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bq_onnx.errors import UsageError

LOSS = "bq_loss"
TARGET = "bq_target"
LOSS_KINDS = ("kl", "ce", "mse", "smse", "cosine")
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
LOG_EPS = 1e-12
"""Added to probabilities before the log, so an exact zero gives a large finite loss, not -inf."""
COS_EPS = 1e-12
"""Added to ``|y|^2 |t|^2`` under the square root of the cosine's denominator (a zero row gives cosine 0)."""


@dataclasses.dataclass(frozen=True)
class Term:
    """One resolved loss term: ``kind`` on output ``output``, last-axis slice ``start:stop`` (None: whole axis),
    times ``weight``. ``probabilities``: kl/ce read probabilities, not logits. ``axis``/``scale``: smse's channel
    axis and ``1 / s_c`` per channel. ``dims``: the per-sample shape of the term's (sliced) output."""

    kind: str
    output: str | None = None
    start: int | None = None
    stop: int | None = None
    weight: float = 1.0
    probabilities: bool = False
    axis: int | None = None
    scale: tuple[float, ...] | None = None
    dims: tuple[int, ...] | None = None
    why: str = ""
    sample_axis: int = 0  # where the output holds the samples (a fed-back state [layers, batch, hidden]: 1)

    def describe(self) -> dict:
        """What the report says about this term."""
        out: dict = {"output": self.output, "kind": self.kind, "weight": self.weight}
        if self.start is not None:
            out["last_axis_slice"] = f"{self.start}:{self.stop}"
        if self.kind in ("kl", "ce"):
            out["reads"] = "probabilities" if self.probabilities else "logits"
        if self.kind == "smse":
            out["channel_axis"] = self.axis
        if self.why:
            out["why"] = self.why
        if self.sample_axis:
            out["sample_axis"] = self.sample_axis
        return out


@dataclasses.dataclass(frozen=True)
class LossPlan:
    """The loss: its terms, summed with their weights. ``per_run``: some output is kept per run (the target of
    several terms is then one row per run, cut at the outputs' run-time sizes)."""

    terms: tuple[Term, ...]
    per_run: bool = False

    @classmethod
    def single(cls, kind: str, output: str | None = None) -> LossPlan:
        if kind not in LOSS_KINDS:
            raise UsageError(f"--loss must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
        if kind == "smse":  # its spreads come from FP32 outputs
            raise ValueError("smse needs the FP32 spreads: resolve it with bq_onnx.estimators.loss_plan.resolve")
        return cls((Term(kind, output),))

    @property
    def packed(self) -> bool:
        """Whether the target is several terms' flattened targets side by side."""
        return len(self.terms) > 1

    def describe(self) -> list[dict]:
        return [t.describe() for t in self.terms]


def output_value(model: ir.Model, output: str | None) -> ir.Value:
    outputs = {v.name: v for v in model.graph.outputs}
    if output is None:
        return model.graph.outputs[0]
    if output not in outputs:
        raise UsageError(f"output '{output}' is not a graph output (outputs: {', '.join(outputs)})")
    return outputs[output]


def append_loss(model: ir.Model, loss: str | LossPlan, output: str | None = None, axis: int = -1) -> None:
    """Replace the graph outputs by ``bq_loss`` (a :class:`LossPlan`, or one kind of :data:`LOSS_KINDS` on
    ``output``); add the input ``bq_target``. In place. ``axis``: the class axis of a one-kind kl/ce loss."""
    plan = LossPlan.single(loss, output) if isinstance(loss, str) else loss
    graph = model.graph
    tape = ir.tape.Tape()
    for t in plan.terms:
        _trust_real_rank(output_value(model, t.output), t)
    ys = [_term_output(tape, output_value(model, t.output), t, f"bq_loss_{i}_") for i, t in enumerate(plan.terms)]
    if plan.packed and plan.per_run:
        target = ir.Value(name=TARGET, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, None]))
        targets, offset = [], _ints(tape, "bq_target_offset", [0])
        for i, y in enumerate(ys):
            key = f"bq_target_{i}_"
            size = tape.op("Reshape", [tape.op("Size", [y]), _ints(tape, key + "one", [1])])
            stop = tape.op("Add", [offset, size])
            part = tape.op("Slice", [target, offset, stop, _ints(tape, key + "axes", [1])])
            targets.append(tape.op("Reshape", [part, tape.op("Shape", [y])]))
            offset = stop
    elif plan.packed:
        if any(t.dims is None for t in plan.terms):
            raise ValueError("a loss of several terms needs each term's per-sample shape")
        width = sum(int(np.prod(t.dims)) for t in plan.terms)
        batch = ys[0].shape[0] if ys[0].shape is not None and len(ys[0].shape) else None
        target = ir.Value(name=TARGET, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([batch, width]))
        targets, offset = [], 0
        for i, t in enumerate(plan.terms):
            size = int(np.prod(t.dims))
            key = f"bq_target_{i}_"
            part = tape.op("Slice", [target, _ints(tape, key + "start", [offset]),
                                     _ints(tape, key + "stop", [offset + size]), _ints(tape, key + "axes", [1])])
            targets.append(tape.op("Reshape", [part, _ints(tape, key + "shape", [-1, *t.dims])]))
            offset += size
    else:
        shape = ys[0].shape if plan.terms[0].dims is None else _run_shape(ys[0].shape, plan.terms[0].dims)
        target = ir.Value(name=TARGET, type=ir.TensorType(ir.DataType.FLOAT), shape=shape)
        targets = [target]
    loss = None
    for i, (t, y, tt) in enumerate(zip(plan.terms, ys, targets)):
        part = _term_loss(tape, t, y, tt, axis, f"bq_loss_{i}_")
        if t.weight != 1.0:
            part = tape.op("Mul", [part, _scalar(tape, f"bq_loss_{i}_weight", t.weight)])
        loss = part if loss is None else tape.op("Add", [loss, part])
    assert loss is not None
    loss.name = LOSS
    loss.type = ir.TensorType(ir.DataType.FLOAT)
    loss.shape = ir.Shape([])
    graph.inputs.append(target)
    for value in tape.initializers:
        graph.register_initializer(value)
    graph.extend(tape.nodes)
    graph.outputs.clear()
    graph.outputs.append(loss)


def _trust_real_rank(y: ir.Value, t: Term) -> None:
    """Forget ``y``'s declared shape where its rank is not the FP32 output's (``t.dims``, from the values the
    model really returns): a file may declare an output wrongly (``[1, seqlen]`` for a ``[T, 1, C]`` CTC head),
    and a loss, target or gradient built on the declared shape would not fit the real one."""
    if t.dims is not None and y.shape is not None and len(y.shape) != 1 + len(t.dims):
        y.shape = ir.Shape([None] * (1 + len(t.dims)))


def _run_shape(declared: ir.Shape | None, dims: tuple[int, ...]) -> ir.Shape:
    """One run's target shape: the declared output shape where it has the real rank, else a first axis of any
    size and the real per-sample dims' rank (dims themselves may differ between runs of different widths)."""
    if declared is not None and len(declared) == 1 + len(dims):
        return declared
    return ir.Shape([None] * (1 + len(dims)))


def _term_output(tape: ir.tape.Tape, y: ir.Value, t: Term, prefix: str) -> ir.Value:
    """The output a term reads: checked to be float, cast to float32, sliced on the last axis."""
    if y.dtype is not None and y.dtype not in FLOATS:
        raise UsageError(f"--loss: output '{y.name}' is {y.dtype.name.lower()}, not float; a loss fits float "
                         f"outputs only")
    if y.dtype is not None and y.dtype != ir.DataType.FLOAT:
        y = tape.op("Cast", [y], attributes={"to": ir.DataType.FLOAT})
    if t.sample_axis:  # samples first, as the targets hold them
        if t.dims is None:
            raise ValueError("a term whose samples are not on the first axis needs its per-sample shape")
        rank = 1 + len(t.dims)
        perm = [t.sample_axis] + [a for a in range(rank) if a != t.sample_axis]
        y = tape.op("Transpose", [y], attributes={"perm": perm})
        y.type, y.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([None] * rank)
    if t.start is None and t.stop is None:
        return y
    start, stop = 0 if t.start is None else t.start, np.iinfo(np.int64).max if t.stop is None else t.stop
    bounds = [_ints(tape, prefix + "slice_start", [start]), _ints(tape, prefix + "slice_stop", [stop])]
    return tape.op("Slice", [y, *bounds, _ints(tape, prefix + "slice_axes", [-1])])


def _term_loss(tape: ir.tape.Tape, t: Term, y: ir.Value, target: ir.Value, axis: int, prefix: str) -> ir.Value:
    if t.kind in ("mse", "smse"):
        diff = tape.op("Sub", [y, target])
        if t.kind == "smse" and t.scale is not None:
            rank = 1 + len(t.dims) if t.dims is not None else None
            shape = [len(t.scale)] + [1] * (rank - 1 - t.axis) if rank is not None and t.axis is not None else [-1]
            inv = np.asarray(t.scale, dtype=np.float32).reshape(shape)
            diff = tape.op("Mul", [diff, tape.initializer(ir.tensor(inv, name=prefix + "inv_spread"))])
        total = tape.op("ReduceSum", [tape.op("Mul", [diff, diff])], attributes={"keepdims": 0})
        return tape.op("Mul", [total, _scalar(tape, "bq_half" if prefix == "bq_loss_0_" else prefix + "half", 0.5)])
    if t.kind == "cosine":
        last = _ints(tape, prefix + "last_axis", [-1])
        dot = tape.op("ReduceSum", [tape.op("Mul", [y, target]), last], attributes={"keepdims": 0})
        yy = tape.op("ReduceSum", [tape.op("Mul", [y, y]), last], attributes={"keepdims": 0})
        tt = tape.op("ReduceSum", [tape.op("Mul", [target, target]), last], attributes={"keepdims": 0})
        norms = tape.op("Sqrt", [tape.op("Add", [tape.op("Mul", [yy, tt]), _scalar(tape, prefix + "eps", COS_EPS)])])
        cos = tape.op("Div", [dot, norms])
        return tape.op("ReduceSum", [tape.op("Sub", [_scalar(tape, prefix + "one", 1.0), cos])],
                       attributes={"keepdims": 0})
    if t.probabilities:
        log_q = tape.op("Log", [tape.op("Add", [y, _scalar(tape, prefix + "log_eps", LOG_EPS)])])
    else:
        log_q = tape.op("LogSoftmax", [y], attributes={"axis": axis})
    return tape.op("Neg", [tape.op("ReduceSum", [tape.op("Mul", [target, log_q])], attributes={"keepdims": 0})])


def _scalar(tape: ir.tape.Tape, name: str, value: float) -> ir.Value:
    return tape.initializer(ir.tensor(np.float32(value), dtype=ir.DataType.FLOAT, name=name))


def _ints(tape: ir.tape.Tape, name: str, values: list[int]) -> ir.Value:
    return tape.initializer(ir.tensor(np.asarray(values, dtype=np.int64), name=name))
