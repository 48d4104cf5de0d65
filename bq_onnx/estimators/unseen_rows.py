"""Curvature for the rows of a lookup table (token embeddings) that no calibration sample reads.

A row's squared-gradient curvature is its use on the calibration data times its sensitivity per use, so a row no
sample reads has none: the data say nothing about it, and a deployed model will meet those tokens. How much? The
Good-Turing estimate answers it from the calibration indices themselves: the share of a new text's tokens that the
calibration never contained is about ``N1 / N`` (rows read exactly once over all reads). The unread rows share that
much of the curvature, evenly; each at most the median seen row (an unread token is no more used than a typical
seen one).

Why not the mean of the seen rows for each (what bq-onnx did, and still does where the indices cannot be traced to
the calibration inputs): 32 calibration sentences read few of MiniLM's 30522 rows, the mean is carried by
[CLS], [SEP] and the most frequent words, and the unread rows at that level made the table look far more important than
the data say: greedy gave it 3.65 bits and the transformer's MatMuls 2-3 (`benchmarks/zoo_damage_minilm-l3.md`,
calib-4); the guard's held-out loss of what it wrote was 236.4 (`benchmarks/zoo_s9.md`) and is 22.48 with this fill
(`benchmarks/zoo_s10.md`, uniform 375.4).
"""

from __future__ import annotations

import numpy as np

from bq_onnx.calibration import Calibration
from bq_onnx.context import WeightInfo
from bq_onnx.runs import Runs

#: Ops that pass index values through unchanged (dtype or shape only), walked back from a Gather's indices.
VALUE_PRESERVING = frozenset({"Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze", "Flatten"})

#: Calibration samples read at a time when counting rows.
COUNT_CHUNK = 256


def table_rows(info: WeightInfo) -> bool:
    """Whether every use of the weight is a Gather reading rows of it (axis 0): a lookup table."""
    uses = list(info.value.uses())
    if not uses or any(u.node.op_type != "Gather" or u.idx != 0 for u in uses):
        return False
    return all(int(a.value) == 0 for u in uses for k, a in u.node.attributes.items() if k == "axis")


def index_source(value) -> str | None:
    """The graph input a Gather's indices are, through dtype and shape changes only; None where they are computed."""
    while value is not None and not value.is_graph_input():
        node = value.producer()
        if node is None or node.op_type not in VALUE_PRESERVING or not node.inputs:
            return None
        value = node.inputs[0]
    return None if value is None else value.name


def row_counts(info: WeightInfo, calib: Calibration) -> np.ndarray | None:
    """How many times the calibration samples read each row of a lookup table (:func:`table_rows`; every Gather of
    it summed), or None where an index is computed rather than fed (position ids built in the graph) or is not in
    the calibration."""
    sources = [index_source(u.node.inputs[1]) for u in info.value.uses()]
    if any(s is None or s not in calib.arrays for s in sources):
        return None
    rows = int(info.value.const_value.shape[0])
    counts = np.zeros(rows, dtype=np.int64)

    def add(values: np.ndarray, times: int = 1) -> None:
        idx = np.asarray(values).astype(np.int64, copy=False).ravel()
        idx = np.where(idx < 0, idx + rows, idx)
        counts[:] += times * np.bincount(idx[(idx >= 0) & (idx < rows)], minlength=rows)

    n = calib.num_samples
    for s in sources:
        if calib.per_run and isinstance(calib.arrays[s], Runs):
            for part in calib.arrays[s].parts:  # one part per sample
                add(part)
        elif calib.axis(s) is None:  # one value every sample reads
            add(calib.arrays[s], times=n)
        else:
            for start in range(0, n, COUNT_CHUNK):
                add(calib.select(slice(start, start + COUNT_CHUNK))[s])
    return counts


def unseen_share(counts: np.ndarray) -> float:
    """Good-Turing's estimate of the share of new reads that go to rows never read: rows read once over all reads,
    at least one read's worth (a new token is never impossible)."""
    total = int(counts.sum())
    if total <= 0:
        return 1.0
    return max(int(np.count_nonzero(counts == 1)), 1) / total


def fill_unseen_rows(curvature: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, int, str] | None:
    """The table's curvature ``[rows, ...]`` with its unread rows filled: with ``counts`` (rows read per row), the
    Good-Turing share of the seen rows' curvature spread evenly over them, each capped at the median seen row;
    without, the mean seen row (the indices could not be counted). Returns (curvature, rows filled, how), or None
    where every row or no row was read."""
    rows = np.asarray(curvature, dtype=np.float64).reshape(curvature.shape[0], -1)
    seen = counts > 0 if counts is not None else rows.sum(axis=1) > 0
    if seen.all() or not seen.any():
        return None
    unseen = int((~seen).sum())
    filled = rows.copy()
    if counts is None:
        filled[~seen] = rows[seen].mean(axis=0)
        how = "the mean curvature of the rows that were"
    else:
        share = unseen_share(counts)
        per_row = rows[seen].sum(axis=0) * (share / (1.0 - share) if share < 1 else np.inf) / unseen
        filled[~seen] = np.minimum(per_row, np.median(rows[seen], axis=0))
        how = (f"together {share:.3g} of what the table's reads weigh (Good-Turing: {share:.1%} of new reads are "
               f"of unseen rows), each at most the median seen row")
    return filled.reshape(curvature.shape), unseen, how
