"""Curvatures on disk while a posterior is built: a big model's per-weight arrays are written to a
:class:`~bq_onnx.posterior.Spill` as soon as each is known and read back one at a time, so the estimate never
holds every weight's curvature at once."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bq_onnx.posterior import Spill, WeightPosterior


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
        self._paths: dict[str, Path] = {}

    def path(self, name: str) -> Path:
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


def spilled_posterior(tensor: ir.TensorProtocol, curvature: np.ndarray, samples: int, prior_precision: float,
                      source: str, spill: Spill, path: Path | None = None) -> WeightPosterior:
    """:func:`bq_onnx.posterior.posterior_from_curvature` with nothing held: the clipped curvature is written to
    ``spill`` (over ``path`` when given), the precision is derived from it when read, and the mean is read from
    the model's own tensor (``tensor``: external data is read from its file, never copied)."""
    clipped = np.maximum(np.asarray(curvature, dtype=np.float64), 0.0)
    path = spill.put(clipped, path)
    del clipped

    def mean() -> np.ndarray:
        return np.asarray(tensor.numpy(), dtype=np.float32)

    return WeightPosterior(mean, None, spill.reader(path), source, samples=samples, prior_precision=prior_precision)
