"""The input second moment ``A = E[x x^T]`` of each MatMul/Gemm/Conv weight's layer, in its ``(K, N)`` view's ``K``
order, from calibration runs (what ``--rounding gptq`` compensates rounding errors with).

A weight read directly by one MatMul (a 2-D ``[K, N]`` weight), Gemm (input B, either ``transB``) or 2-D Conv (im2col
patches, one ``A`` per group, the K-FAC estimator's own :func:`bq_onnx.estimators.kfac.im2col_batch`) gets one;
anything else (layout chains, several readers, subgraphs, embeddings, recurrent layers) gets none and is rounded to
nearest. Rows are every position of every sample (tokens, patches), padding tokens included; ``A`` is their mean,
shrunk toward its diagonal by ``K / (K + rows)`` (:func:`shrink`). Under ``--rounding gptq`` with enough calibration
samples the last 32 are left out of ``A``: the tables measure the rounding choice on them
(:mod:`bq_onnx.stages.tables`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx.calibration import Calibration
from bq_onnx.context import Context, WeightInfo
from bq_onnx.disk_rows import DiskRows
from bq_onnx.estimators.kfac import im2col_batch
from bq_onnx.graph import forward_model

SAMPLES = 128
"""Calibration samples ``A`` is estimated from (GPTQ's usual 128)."""

BATCH = 8
"""Samples per forward run."""

MAX_K = 8192
"""Reduction sizes past this get no ``A`` (a ``K x K`` float64 matrix would pass 512 MiB)."""

DISK_BYTES = 256 << 20
"""A weight whose in-memory GPTQ metric would keep at least this many bytes (:func:`kept_bytes`: ``K = 2048,
N = 8192`` keeps 320 MiB, ``K = 8192, N = 2048`` 1280 MiB; the zoo's widest, ddddocr's recognizer, 144 MiB,
MiniLM's 45: ``benchmarks/gptq_paths.md``) has its ``A`` summed on disk (:class:`bq_onnx.disk_rows.DiskRows`), a
band of rows at a time, where it stays: GPTQ reads it band by band and rounds bands of output channels
(:class:`bq_onnx.rounding.gptq.DiskMetric`). Why (issue 21): in memory, a 0.125 GiB model with an 8192-wide layer
held 3.2 GiB with ``--calib``."""


def kept_bytes(groups: int, k: int, n: int) -> int:
    """What :class:`bq_onnx.rounding.gptq.Metric` keeps for a ``(K, N)`` weight: the factor and the judged correlation
    per group (``(K, K)`` float64 each) and the two ``(K, N)`` float64 whitenings."""
    return 8 * (2 * groups * k * k + 2 * k * n)


def _reader(info: WeightInfo) -> tuple[ir.Value, str, dict] | None:
    """(layer input, op, attributes) of the one node reading the weight directly as a MatMul/Gemm/Conv weight."""
    uses = list(info.value.uses())
    if info.scope or len(uses) != 1:
        return None
    node, idx = uses[0].node, uses[0].idx
    if node.graph is not info.value.graph:  # a main-graph weight read inside a Loop/If body: its input is not fed
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    rank = len(info.layout.shape)
    ok = ((node.op_type == "MatMul" and idx == 1 and rank == 2) or (node.op_type == "Gemm" and idx == 1)
          or (node.op_type == "Conv" and idx == 1 and rank == 4))
    if not ok or node.inputs[0] is None or not node.inputs[0].name or info.layout.view_shape[0] > MAX_K:
        return None
    return node.inputs[0], node.op_type, attrs


def _rows(x: np.ndarray, op: str, attrs: dict, info: WeightInfo) -> np.ndarray:
    """One run's layer-input rows per group, ``(groups, R, K)`` float64."""
    x = np.asarray(x, dtype=np.float64)
    if op == "Conv":
        patches = im2col_batch(x, info.layout.shape, attrs)  # (B, groups, P, K)
        return patches.transpose(1, 0, 2, 3).reshape(patches.shape[1], -1, patches.shape[3])
    axis = x.ndim - 1 if op == "MatMul" else (0 if attrs.get("transA", 0) else 1)
    return np.moveaxis(x, axis, -1).reshape(1, -1, x.shape[axis])


def shrink(a: np.ndarray, rows: int) -> np.ndarray:
    """``A`` from ``rows`` rows pulled toward its diagonal by ``K / (K + rows)``: with fewer rows than inputs
    (LeNet's 400-wide FC layer on 128 samples) the sample ``A`` is singular and GPTQ would cancel errors along
    directions held-out inputs do not share; with many rows (convolution patches, tokens) it is almost unchanged."""
    k = a.shape[-1]
    alpha = k / (k + max(rows, 1))
    diag = np.einsum("...kk->...k", a)
    out = (1.0 - alpha) * a
    idx = np.arange(k)
    out[..., idx, idx] += alpha * diag
    return out


def input_moments(model: ir.Model, ctx: Context, calibration: Calibration | None) -> dict[str, np.ndarray]:
    """Weight name -> ``A`` (``(groups, K, K)``, mean over rows) for every weight it can be measured for."""
    if calibration is None:
        return {}
    readers = {info.name: (info, r) for info in ctx.weights if (r := _reader(info)) is not None}
    if not readers:
        return {}
    from bq_onnx.runtimes.sessions import TempSessions

    names = sorted({r[0].name for _, r in readers.values()})
    sums: dict[str, np.ndarray | DiskRows] = {}
    counts: dict[str, int] = {}
    sessions = TempSessions()
    try:
        session = sessions.open(forward_model(model, names))
        calib = calibration.take(min(SAMPLES, calibration.num_samples))
        for feeds in calib.batches(BATCH):
            acts = dict(zip(names, session.run(feeds)))
            for name, (info, (value, op, attrs)) in list(readers.items()):
                try:
                    rows = _rows(acts[value.name], op, attrs, info)
                except ValueError:  # a convolution im2col does not cover (auto_pad SAME_*): nearest
                    rows = None
                if rows is None or rows.shape[2] != info.layout.view_shape[0]:
                    readers.pop(name)
                    sums.pop(name, None)
                    continue
                _add(sums, name, rows, info.layout.view_shape[1])
                counts[name] = counts.get(name, 0) + rows.shape[1]
    finally:
        sessions.close()
    moments = {name: _mean(s, counts[name]) for name, s in sums.items()}
    return {name: a for name, a in moments.items() if a is not None}  # a NaN/Inf input: nearest


def on_disk(groups: int, k: int, n: int) -> bool:
    """Whether a ``(K, N)`` weight's ``A`` (``groups`` of them) is kept on disk (:data:`DISK_BYTES`)."""
    return kept_bytes(groups, k, n) >= DISK_BYTES


def _add(sums: dict[str, np.ndarray | DiskRows], name: str, rows: np.ndarray, n: int) -> None:
    """``sums[name] += rows^T rows`` per group; on disk (:func:`on_disk`), a band of ``A``'s rows at a time."""
    g, _, k = rows.shape
    total = sums.get(name)
    if total is None and on_disk(g, k, n):
        total = sums[name] = DiskRows((g, k, k))
    if not isinstance(total, DiskRows):
        sums[name] = (0.0 if total is None else total) + np.swapaxes(rows, 1, 2) @ rows
        return
    for gi in range(g):
        for r0, r1 in total.bands(gi * k, (gi + 1) * k):
            part = total.read(r0, r1)
            part += rows[gi, :, r0 - gi * k : r1 - gi * k].T @ rows[gi]
            total.write(r0, part)


def kept_moment(a: np.ndarray, n: int) -> np.ndarray | DiskRows:
    """``a`` (of a weight with ``n`` output channels) where :func:`input_moments` keeps it (:func:`on_disk`): a
    worker reading the moments the coordinator saved rounds them as the coordinator does."""
    return DiskRows.of(a) if on_disk(a.shape[0], a.shape[-1], n) else a


def _mean(total: np.ndarray | DiskRows, count: int) -> np.ndarray | DiskRows | None:
    """:func:`shrink` of the mean (in place, band by band, on disk); None where it is not finite."""
    if not isinstance(total, DiskRows):
        a = shrink(total / max(count, 1), count)
        return a if np.isfinite(a).all() else None
    k = total.cols
    alpha = k / (k + max(count, 1))
    for r0, r1 in total.bands():
        a = total.read(r0, r1) / max(count, 1)  # the elementwise arithmetic of shrink(), on these rows
        out = (1.0 - alpha) * a
        idx = np.arange(r1 - r0)
        cols = (r0 + idx) % k
        out[idx, cols] += alpha * a[idx, cols]
        if not np.isfinite(out).all():
            return None
        total.write(r0, out)
    return total
