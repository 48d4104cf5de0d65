"""Calibration-only distillation (BayesQ): tune the stored metadata with the integer codes fixed.

Each quantized weight is rebuilt in a training copy of the model as a function of its metadata:
``W = (codes - zp) * scale`` (uniform), ``codebook[codes] * scale + offset`` (codebooks, vector codebooks laid
out along the rows), ``offset`` (0 bits), plus sparse outliers as a constant, with the codes and zero points as
constants and scales, offsets and codebook entries as trainable
initializers. The loss the posterior fits (``--loss`` or its default rule; on a classifier the KL to the FP32
model's output distribution), against the FP32 outputs on the calibration data, is differentiated by the
autodiff pass (standard ops, run by onnxruntime) and minimized by Adam; ce terms fit the FP32 distribution too
(distillation reads no labels: it keeps the FP32 model's behaviour, not a labelled accuracy). Tuned values are
rounded to fp16 (what both formats store; double-quantized scales of the compact format to their column's code
grid, the super scales kept) and returned as new quantized forms; the step with the lowest loss on a
held-out part of the calibration data is kept, so distillation never makes that loss worse.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.gradient import build_gradient_model
from bq_onnx.autodiff.loss import LOSS, TARGET, LossPlan, append_loss
from bq_onnx.calibration import Calibration, load_calibration
from bq_onnx.context import Context
from bq_onnx.decode.ops import BlockDims, expand_blocks, restore_layout, vector_rows
from bq_onnx.emitter import GraphEmitter
from bq_onnx.estimators.loss_plan import outputs_needed, resolve
from bq_onnx.estimators.loss_targets import pack, term_targets
from bq_onnx.graph import forward_model
from bq_onnx.loss_spec import LossTerm
from bq_onnx.model_io import copy_model
from bq_onnx.probabilities import softmax
from bq_onnx.progress import progress
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, to_fp16_exact
from bq_onnx.qtensor import expand_blocks as expand_rows
from bq_onnx.runtimes.sessions import TempSessions

TRAINABLE = ("scale", "offset", "codebook")


def _pieces(q) -> list[tuple[int, int, QuantizedTensor]]:
    return list(q.pieces) if isinstance(q, QuantizedPieces) else [(0, q.shape[1], q)]


def _rebuild(q, pieces: list[tuple[int, int, QuantizedTensor]]):
    if isinstance(q, QuantizedPieces):
        return QuantizedPieces(q.shape, tuple(pieces))
    return pieces[0][2]


def _with_outliers(em: GraphEmitter, x: ir.Value, qt: QuantizedTensor) -> ir.Value:
    """``x`` plus the sparse outliers as a dense constant (kept fixed; equal to the stored sparse add)."""
    if qt.outlier_index is None:
        return x
    dense = np.zeros(qt.shape, dtype=np.float32)
    dense.reshape(-1)[qt.outlier_index] = qt.outlier_value
    return em.op("Add", [x, em.const(dense, "outliers")])


@dataclasses.dataclass
class Distilled:
    """The tuned quantized forms, and what the report says (None when distillation was skipped)."""

    quantized: dict[str, QuantizedTensor | QuantizedPieces]
    report: dict | None
    messages: list[str]


BATCH_SIZE = 32
"""Calibration samples per distillation step (distillation's own; ``--batch-size`` is the estimator's)."""


def distill(model: ir.Model, ctx: Context, calibration: Calibration, batch_size: int = BATCH_SIZE) -> Distilled:
    """Tune the metadata of ``ctx.quantized`` on ``calibration`` (``--distill-steps``); the model is not changed."""
    d = ctx.config.distillation
    return _Distiller(ctx, calibration, d.distill_steps, d.distill_lr, batch_size, d.output, d.calib_samples,
                      d.loss).run(model)


class _Distiller:
    def __init__(self, ctx: Context, calibration: Calibration, steps: int, lr: float, batch_size: int,
                 output: str | None, max_samples: int | None, loss: tuple[LossTerm, ...] | None = None) -> None:
        self.ctx = ctx
        self.calibration = calibration
        self.steps = steps
        self.lr = lr
        self.batch_size = batch_size
        self.output = output
        self.max_samples = max_samples
        self.loss = loss
        self.grids: dict[str, QuantizedTensor] = {}  # double-quantized scale params: the tensor whose grid they keep

    def _stored(self, name: str, value: np.ndarray) -> np.ndarray:
        """A tuned value as the output stores it: fp16, or a double-quantized scale on its column's code grid."""
        qt = self.grids.get(name)
        return to_fp16_exact(value) if qt is None else qt.with_scale(value).scale

    def run(self, model: ir.Model) -> Distilled:
        ctx = self.ctx
        calib = load_calibration(self.calibration, model, self.max_samples)
        n = calib.num_samples
        held = max(1, n // 5) if n > 1 else 0
        train_idx, held_idx = np.arange(n - held), np.arange(n - held, n)
        sessions = TempSessions()
        try:
            plan, targets, entropy_of = self._targets(sessions, model, calib)
            training, params = self._training_model(model)
            append_loss(training, plan)
            graph = build_gradient_model(training, LOSS, list(params), weights_as_inputs=True)
            missing = [p for p in params if p not in graph.gradients]
            if missing:
                return Distilled(dict(ctx.quantized), None, [f"distillation skipped: no gradient for {missing[0]}"])
            session = sessions.open(graph.model)

            def run(values: dict, idx: np.ndarray) -> tuple[float, dict]:
                loss, grads = 0.0, {}
                for rows in calib.runs(idx):  # one run, or runs of a fixed batch whose sums add up
                    feeds = calib.feeds(rows)
                    out = dict(zip(session.output_names, session.run({**feeds, TARGET: targets[rows], **values})))
                    loss += float(out[graph.loss])
                    for p in params:
                        g = out[graph.gradients[p]]
                        grads[p] = g if p not in grads else grads[p] + g
                return loss, grads

            values = {p: v.copy() for p, v in params.items()}
            eval_idx = held_idx if held else train_idx
            entropy = entropy_of(eval_idx)
            best_loss, _ = run(values, eval_idx)
            start_loss, best = best_loss, {p: v.copy() for p, v in values.items()}
            m = {p: np.zeros_like(v) for p, v in values.items()}
            v2 = {p: np.zeros_like(v) for p, v in values.items()}
            rng = np.random.default_rng(ctx.config.distillation.seed)
            for step in progress(range(1, self.steps + 1), "distill", ctx.progress, unit="steps"):
                idx = rng.choice(train_idx, size=min(self.batch_size, len(train_idx)), replace=False)
                _, grads = run(values, np.sort(idx))
                for p in params:  # Adam, step size relative to each tensor's scale
                    g = grads[p].astype(np.float64)
                    m[p] = 0.9 * m[p] + 0.1 * g
                    v2[p] = 0.999 * v2[p] + 0.001 * g * g
                    mhat, vhat = m[p] / (1 - 0.9**step), v2[p] / (1 - 0.999**step)
                    size = max(float(np.sqrt(np.mean(np.square(params[p])))), 1e-8)
                    values[p] = (values[p] - self.lr * size * mhat / (np.sqrt(vhat) + 1e-12)).astype(np.float32)
                rounded = {p: self._stored(p, v) for p, v in values.items()}
                loss, _ = run(rounded, eval_idx)
                if loss < best_loss:
                    best_loss, best = loss, rounded
            count = len(eval_idx)
            what = "kl" if all(t.kind in ("kl", "ce") for t in plan.terms) else "loss"
            return Distilled(self._written_back(best), {
                "steps": self.steps,
                "held_out_samples": int(count),
                f"{what}_before": (start_loss - entropy) / count,
                f"{what}_after": (best_loss - entropy) / count,
                "loss": plan.describe(),
            }, [])
        finally:
            sessions.close()

    def _targets(self, sessions: TempSessions, model: ir.Model, calib: Calibration
                 ) -> tuple[LossPlan, np.ndarray, Callable[[np.ndarray], float]]:
        """The loss, the FP32 targets it is fed, and the constant that turns the loss graph's value on samples
        ``idx`` into the divergence: the loss graph's kl terms are the cross-entropy to the FP32 distribution,
        which minus its entropy is the KL (mse, smse and cosine terms are zero at the FP32 outputs already)."""
        names = outputs_needed(model, self.loss, self.output)
        forward = sessions.open(forward_model(model, names))
        runs = [forward.run(b) for b in calib.batches(64)]
        values = {n: np.concatenate([r[i] for r in runs]).astype(np.float32) for i, n in enumerate(names)}
        plan, fp32 = resolve(model, self.loss, self.output, values)
        term = plan.terms[0]
        if len(plan.terms) == 1 and term.kind in ("kl", "ce") and not term.probabilities and term.start is None:
            per = [np.concatenate([softmax(r[0]) for r in runs])]  # batch by batch, as always
        else:
            rng = np.random.default_rng(0)  # the reference targets draw nothing
            per = [term_targets("reference", t, y, None, rng) for t, y in zip(plan.terms, fp32)]

        def entropy(idx: np.ndarray) -> float:
            total = 0.0
            for t, p in zip(plan.terms, per):
                if t.kind in ("kl", "ce"):
                    held = p[idx].astype(np.float64)
                    total += t.weight * float(-np.sum(held * np.log(np.clip(held, 1e-30, None))))
            return total

        return plan, pack(per) if plan.packed else per[0], entropy

    def _training_model(self, model: ir.Model) -> tuple[ir.Model, dict[str, np.ndarray]]:
        """A copy whose quantized weights are decoded from trainable metadata initializers."""
        ctx = self.ctx
        training = copy_model(model)
        graph = training.graph
        params: dict[str, np.ndarray] = {}
        shared: dict = {}
        nodes: list[ir.Node] = []
        for info in ctx.weights:
            if info.scope:  # no gradient reaches into a subgraph: its weights keep their first design
                continue
            em = GraphEmitter(f"{info.name}.distill/", shared)
            views = []
            for i, (_, _, qt) in enumerate(_pieces(ctx.quantized[info.name])):
                prefix = f"{info.name}.p{i}"
                k, n = qt.shape
                dims = BlockDims.constant(em, k, n, qt.block_size)

                def trainable(name: str, array: np.ndarray, prefix: str = prefix, em: GraphEmitter = em) -> ir.Value:
                    full = f"{prefix}.{name}"
                    params[full] = np.asarray(array, dtype=np.float32).copy()
                    return em.tensor(params[full], full)

                if qt.kind == "mean":
                    x = expand_blocks(em, trainable("offset", qt.offset), dims)
                    views.append(_with_outliers(em, em.op("Expand", [x, dims.kn]) if dims.single_block else x, qt))
                    continue
                scale = expand_blocks(em, trainable("scale", qt.scale), dims)
                if qt.double_scales:  # tuned freely, then put back on the code grid of its super scales (kept)
                    self.grids[f"{prefix}.scale"] = qt
                if qt.kind == "vector":
                    index = em.const(qt.codes.astype(np.int64), "codes")
                    ragged = qt.codes.shape[0] * qt.vector_dim != k
                    rows = vector_rows(em, index, trainable("codebook", qt.codebook), dims.rows_n,
                                       dims.k if ragged else None)
                    views.append(_with_outliers(em, em.op("Mul", [rows, scale]), qt))
                    continue
                if qt.kind == "uniform":
                    if qt.symmetric:
                        zp = np.float32(qt.implicit_zero_point)
                    else:
                        zp = expand_rows(qt.zero_point.astype(np.float32), k, qt.block_size)
                    centered = qt.codes.astype(np.float32) - zp
                    views.append(_with_outliers(em, em.op("Mul", [em.const(centered, "codes"), scale]), qt))
                else:
                    table = trainable("codebook", qt.codebook)
                    levels = em.op("Gather", [table, em.const(qt.codes.astype(np.int64), "codes")], axis=0)
                    x = em.op("Mul", [levels, scale])
                    if qt.offset is not None:
                        x = em.op("Add", [x, expand_blocks(em, trainable("offset", qt.offset), dims)])
                    views.append(_with_outliers(em, x, qt))
            view = views[0] if len(views) == 1 else em.op("Concat", views, axis=1)
            decoded = restore_layout(em, view, info.layout)
            if info.value.dtype != ir.DataType.FLOAT:
                decoded = em.op("Cast", [decoded], to=info.value.dtype)
            old = graph.initializers[info.name]
            old.replace_all_uses_with(decoded)
            graph.initializers.pop(info.name)
            for value in em.tape.initializers:
                graph.register_initializer(value)
            nodes.extend(em.tape.nodes)
        for value in shared.values():
            graph.register_initializer(value)
        graph.insert_before(graph[0], nodes)
        return training, params

    def _written_back(self, values: dict[str, np.ndarray]) -> dict[str, QuantizedTensor | QuantizedPieces]:
        quantized = dict(self.ctx.quantized)
        for info in self.ctx.weights:
            q = self.ctx.quantized[info.name]
            pieces = []
            for i, (start, stop, qt) in enumerate(_pieces(q)):
                changes = {f: values[f"{info.name}.p{i}.{f}"] for f in TRAINABLE if f"{info.name}.p{i}.{f}" in values}
                if qt.double_scales and "scale" in changes:  # already on the grid: this re-derives the codes
                    qt = qt.with_scale(changes.pop("scale"))
                pieces.append((start, stop, dataclasses.replace(qt, **changes)))
            quantized[info.name] = _rebuild(q, pieces)
        return quantized
