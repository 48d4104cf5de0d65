"""Posterior maths as plain numpy: accumulators over calibration batches and the posterior they produce.

Each estimator is an accumulator: ``update`` adds one batch's statistics, ``merge`` adds another accumulator's
(so calibration can be sharded over processes with identical results), ``finalize`` gives the posterior. The
posterior over every weight is a diagonal Gaussian: mean = the trained weight, precision = ``N * curvature +
prior_precision`` (diagonal Laplace, BayesQ eq. 5), so variance = 1 / precision. Curvature is the Fisher
(``laplace``, ``fisher-mc``), the Hessian diagonal (``hutchinson``), the Kronecker-factored Fisher diagonal
(``kfac``) or the input second moment (``activations``); ``external`` posteriors are read from an ``.npz``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from bq_onnx.errors import DataError

#: Prior precision lambda of the Gaussian prior N(0, 1/lambda) on each weight (the Laplace damping). Small
#: against N * curvature for any weight the data informs; it bounds the variance of weights it does not.
DEFAULT_PRIOR_PRECISION = 1e-4

METHODS = ("laplace", "fisher-mc", "hutchinson", "kfac", "activations", "external")


@dataclasses.dataclass
class WeightPosterior:
    """Diagonal Gaussian over one weight tensor (arrays in the tensor's own shape)."""

    mean: np.ndarray
    precision: np.ndarray
    curvature: np.ndarray  # per-sample curvature (precision = samples * curvature + prior)
    source: str  # estimator that produced it (a fallback says so)
    kfac: tuple[np.ndarray, np.ndarray] | None = None  # (A, G) factors of the (K, N) view, when estimated

    @property
    def variance(self) -> np.ndarray:
        return 1.0 / self.precision

    @property
    def std(self) -> np.ndarray:
        return 1.0 / np.sqrt(self.precision)


@dataclasses.dataclass
class Posterior:
    method: str
    samples: int
    prior_precision: float
    weights: dict[str, WeightPosterior]
    notes: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> list[dict]:
        """Per layer: size, mean curvature, mean informativeness |mu|/sigma (paper 001 eq. 1), source."""
        rows = []
        for name, wp in self.weights.items():
            info = np.abs(wp.mean) / wp.std
            rows.append(
                {
                    "name": name,
                    "numel": int(wp.mean.size),
                    "source": wp.source,
                    "mean_curvature": float(np.mean(wp.curvature)),
                    "trace_curvature": float(np.sum(wp.curvature, dtype=np.float64)),
                    "mean_std": float(np.mean(wp.std)),
                    "mean_informativeness": float(np.mean(info)),
                }
            )
        return rows

    def save(self, path: str | os.PathLike) -> None:
        """One ``.npz``: ``mean/<w>``, ``precision/<w>``, ``curvature/<w>`` (+ K-FAC factors) and a JSON header."""
        arrays: dict[str, np.ndarray] = {}
        sources = {}
        for name, wp in self.weights.items():
            arrays[f"mean/{name}"] = wp.mean
            arrays[f"precision/{name}"] = wp.precision
            arrays[f"curvature/{name}"] = wp.curvature
            sources[name] = wp.source
            if wp.kfac is not None:
                arrays[f"kfac_a/{name}"], arrays[f"kfac_g/{name}"] = wp.kfac
        header = {
            "method": self.method,
            "samples": self.samples,
            "prior_precision": self.prior_precision,
            "sources": sources,
            "notes": self.notes,
        }
        arrays["__header__"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        np.savez(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike, prior_precision: float | None = None) -> Posterior:
        """Read a posterior saved by :meth:`save`, or an external one with ``mean/<w>`` and ``std/<w>``.

        External files (models trained as Bayesian networks, paper 001) give ``mean/<name>`` and either
        ``std/<name>`` or ``precision/<name>`` per weight; ``curvature`` is then derived from the precision.
        """
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{path}: cannot read posterior ({str(exc).splitlines()[0][:200]})") from None
        header = {}
        if "__header__" in arrays:
            header = json.loads(arrays.pop("__header__").tobytes().decode())
        prior = header.get("prior_precision", DEFAULT_PRIOR_PRECISION if prior_precision is None else prior_precision)
        samples = int(header.get("samples", 1))
        weights = {}
        names = sorted({k.split("/", 1)[1] for k in arrays if k.startswith("mean/")})
        if not names:
            raise DataError(f"{path}: no 'mean/<weight>' arrays in the posterior file")
        for name in names:
            mean = arrays[f"mean/{name}"]
            if f"precision/{name}" in arrays:
                precision = arrays[f"precision/{name}"]
            elif f"std/{name}" in arrays:
                std = arrays[f"std/{name}"].astype(np.float64)
                if np.any(std <= 0) or not np.isfinite(std).all():
                    raise DataError(f"{path}: std of '{name}' must be finite and positive")
                precision = 1.0 / std**2
            else:
                raise DataError(f"{path}: weight '{name}' has a mean but neither 'std/' nor 'precision/'")
            if precision.shape != mean.shape:
                raise DataError(f"{path}: '{name}': mean {mean.shape} and precision {precision.shape} differ")
            if not np.isfinite(mean).all() or not np.isfinite(precision).all() or np.any(precision <= 0):
                raise DataError(f"{path}: '{name}' has NaN/Inf or non-positive precision")
            curvature = arrays.get(f"curvature/{name}")
            if curvature is None:
                curvature = np.maximum(precision - prior, 0.0) / max(samples, 1)
            kfac = None
            if f"kfac_a/{name}" in arrays:
                kfac = (arrays[f"kfac_a/{name}"], arrays[f"kfac_g/{name}"])
            source = header.get("sources", {}).get(name, "external")
            weights[name] = WeightPosterior(mean.astype(np.float32), precision.astype(np.float64),
                                            curvature.astype(np.float64), source, kfac)
        method = header.get("method", "external")
        return cls(method, samples, float(prior), weights, list(header.get("notes", [])))


# --- accumulators --------------------------------------------------------------------------------------------


class SumAccumulator:
    """Sums of per-sample statistics keyed by weight, and the number of samples they came from.

    ``laplace``/``fisher-mc`` add squared per-sample gradients (the empirical / sampled Fisher diagonal);
    ``hutchinson`` adds ``v * Hv`` products; ``activations`` adds squared inputs. Sums are float64 so the order
    of shards does not change the result beyond float64 rounding.
    """

    def __init__(self) -> None:
        self.sums: dict[str, np.ndarray] = {}
        self.count = 0

    def update(self, stats: Mapping[str, np.ndarray], samples: int = 1) -> None:
        for name, value in stats.items():
            value = np.asarray(value, dtype=np.float64)
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value.copy()
        self.count += samples

    def merge(self, other: SumAccumulator) -> SumAccumulator:
        for name, value in other.sums.items():
            if name in self.sums:
                self.sums[name] += value
            else:
                self.sums[name] = value.copy()
        self.count += other.count
        return self

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise DataError("no calibration samples were accumulated")
        return {name: total / self.count for name, total in self.sums.items()}


class KfacAccumulator:
    """K-FAC factors per layer: ``A = E[a a^T]`` over layer inputs, ``G = E[g g^T]`` over output gradients."""

    def __init__(self) -> None:
        self.a: dict[str, np.ndarray] = {}
        self.g: dict[str, np.ndarray] = {}
        self.count = 0

    def update(self, inputs: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray], samples: int = 1) -> None:
        """``inputs[w]``: rows of layer inputs ``(R, K)``; ``grads[w]``: rows of output gradients ``(R, N)``."""
        for name, rows in inputs.items():
            rows = np.asarray(rows, dtype=np.float64)
            self.a[name] = self.a.get(name, 0) + rows.T @ rows
        for name, rows in grads.items():
            rows = np.asarray(rows, dtype=np.float64)
            self.g[name] = self.g.get(name, 0) + rows.T @ rows
        self.count += samples

    def merge(self, other: KfacAccumulator) -> KfacAccumulator:
        for name, value in other.a.items():
            self.a[name] = self.a.get(name, 0) + value
        for name, value in other.g.items():
            self.g[name] = self.g.get(name, 0) + value
        self.count += other.count
        return self

    def factors(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        if self.count == 0:
            raise DataError("no calibration samples were accumulated")
        return {name: (self.a[name] / self.count, self.g[name] / self.count) for name in self.a if name in self.g}


def kfac_diagonal(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Diagonal of ``A (x) G`` laid out as the ``(K, N)`` view: ``F[k, n] = A[k, k] * G[n, n]``."""
    return np.outer(np.diag(a), np.diag(g))


def posterior_from_curvature(
    mean: np.ndarray, curvature: np.ndarray, samples: int, prior_precision: float, source: str
) -> WeightPosterior:
    """Diagonal Laplace: precision = N * curvature + lambda (curvature clipped at 0: a negative Hessian
    diagonal from Hutchinson noise carries no information, it must not make the variance negative)."""
    curvature = np.maximum(np.asarray(curvature, dtype=np.float64), 0.0)
    precision = samples * curvature + prior_precision
    return WeightPosterior(np.asarray(mean, dtype=np.float32), precision, curvature, source)
