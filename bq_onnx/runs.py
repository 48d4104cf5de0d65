"""Arrays kept one per run, where samples cannot be stacked along a sample axis.

Two cases need it. Calibration parts of different shapes (text lines of different widths, sequences of different
lengths, or inputs whose counts along their guessed sample axes disagree) cannot be concatenated: each part is
then one run, fed as given. And a model run one fixed batch per run may return an output whose first axis is not
the sample axis (a CTC head's ``[T, 1, C]``): concatenating such outputs would make rows that are not samples, so
they are read back per run, and the loss target of a run is built from that run's output alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from bq_onnx.errors import DataError


class Runs:
    """One array per run: ``parts[i]`` is what run ``i`` reads (an input) or returned (an output); each run covers
    ``per`` consecutive sample rows (1 for calibration parts: each part is one sample)."""

    def __init__(self, parts: Sequence[np.ndarray], per: int = 1) -> None:
        self.parts = list(parts)
        self.per = per

    def __len__(self) -> int:
        return len(self.parts)

    def __repr__(self) -> str:
        shapes = sorted({tuple(p.shape) for p in self.parts})[:3]
        return f"Runs({len(self.parts)} runs, shapes {shapes}{'...' if len(shapes) == 3 else ''})"

    @property
    def num_samples(self) -> int:
        return len(self.parts) * self.per

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    @property
    def ndim(self) -> int:
        return self.parts[0].ndim

    def _indices(self, rows: slice | np.ndarray) -> np.ndarray:
        """Sample rows as indices (a slice against :attr:`num_samples`)."""
        if isinstance(rows, slice):
            return np.arange(self.num_samples)[rows]
        return np.asarray(rows).reshape(-1)

    def run_of(self, rows: slice | np.ndarray) -> int:
        """The one run sample ``rows`` fall in (a run's rows, or a fixed batch padded with its own rows)."""
        runs = np.unique(self._indices(rows) // self.per)
        if len(runs) != 1:
            raise ValueError(f"samples of {len(runs)} runs asked for at once; these arrays are kept per run")
        return int(runs[0])

    def __getitem__(self, rows: slice | np.ndarray) -> np.ndarray:
        """What the run holding ``rows`` reads or returned, as one array."""
        return self.parts[self.run_of(rows)]

    def subset(self, rows: slice | np.ndarray) -> Runs:
        """The runs that hold the sample ``rows``, in order (whole runs)."""
        runs = list(dict.fromkeys((self._indices(rows) // self.per).tolist()))
        return Runs([self.parts[i] for i in runs], self.per)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Runs:
        return Runs([fn(p) for p in self.parts], self.per)

    def stacked(self) -> np.ndarray:
        """Every run's array concatenated along the first axis (for statistics over all of them)."""
        try:
            return np.concatenate(self.parts)
        except ValueError:
            shapes = sorted({tuple(p.shape) for p in self.parts})[:3]
            raise DataError(f"outputs of different runs differ beyond their first axis (shapes {shapes}); the loss "
                            f"needs them to agree there") from None

    def shape_template(self) -> tuple[int | None, ...]:
        """The parts' common shape, None where they differ (their rank must agree)."""
        first = self.parts[0].shape
        return tuple(d if all(p.shape[i] == d for p in self.parts) else None for i, d in enumerate(first))


def sample_axis(outputs: Sequence[np.ndarray], sizes: Sequence[int]) -> int | None:
    """The axis of an output that holds a run's samples: the first where its length is every run's sample count,
    else the one other axis that is (a state ``[layers, batch, hidden]`` fed back to the next call); only from
    runs of more than one sample, where a length of 1 says nothing. None: no such axis, or several."""
    if all(o.ndim and len(o) == n for o, n in zip(outputs, sizes)):
        return 0
    if max(sizes, default=0) <= 1 or len({o.ndim for o in outputs}) != 1:
        return None
    found = [a for a in range(1, outputs[0].ndim) if all(o.shape[a] == n for o, n in zip(outputs, sizes))]
    return found[0] if len(found) == 1 else None


def samples_first(outputs: Sequence[np.ndarray], sizes: Sequence[int]) -> tuple[np.ndarray | Runs, int]:
    """Outputs of consecutive runs of ``sizes`` samples each, and the axis their samples were on: stacked along
    the first axis when one axis of every run holds its samples (moved first) and the other axes agree, else kept
    per run (each run then covers ``sizes[0]`` samples; axis 0)."""
    axis = sample_axis(outputs, sizes)
    if axis is not None:
        moved = [np.moveaxis(o, axis, 0) for o in outputs] if axis else list(outputs)
        if len({o.shape[1:] for o in moved}) == 1:
            return np.concatenate(moved), axis
    return per_run(outputs, sizes), 0


def per_run(outputs: Sequence[np.ndarray], sizes: Sequence[int]) -> np.ndarray | Runs:
    """Outputs of consecutive runs of ``sizes`` samples each: stacked when every run's first axis is its samples
    (and the other axes agree), else kept per run (each run then covers ``sizes[0]`` samples)."""
    if all(o.ndim and len(o) == n for o, n in zip(outputs, sizes)) and len({o.shape[1:] for o in outputs}) == 1:
        return np.concatenate(outputs)
    if len(set(sizes)) > 1:
        raise DataError(f"outputs whose first axis is not the samples, from runs of {sorted(set(sizes))} samples; "
                        f"they can be read back per run only from runs of one size")
    return Runs(list(outputs), sizes[0])
