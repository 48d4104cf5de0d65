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
import tempfile
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from bq_onnx.config import PosteriorConfig
from bq_onnx.errors import DataError

#: Prior precision lambda of the Gaussian prior N(0, 1/lambda) on each weight (the Laplace damping). Small
#: against N * curvature for any weight the data informs; it bounds the variance of weights it does not.
DEFAULT_PRIOR_PRECISION = PosteriorConfig.prior_precision

#: An array, or a function that reads it (a posterior too big to hold is read back one weight at a time).
ArraySource = np.ndarray | Callable[[], np.ndarray]


class WeightPosterior:
    """Diagonal Gaussian over one weight tensor (arrays in the tensor's own shape).

    Each of ``mean``, ``precision`` and ``curvature`` is held as an array or as a function that reads it on every
    access (from the model's own data, or from a spill folder on disk), so a big model's posterior is never in
    memory at once: a pass that uses one weight's arrays and drops them holds one weight. A ``precision`` of
    ``None`` is derived from the curvature on access, ``samples * curvature + prior_precision``.
    """

    def __init__(self, mean: ArraySource, precision: ArraySource | None, curvature: ArraySource, source: str,
                 kfac: tuple[np.ndarray, np.ndarray] | None = None, *, samples: int = 1,
                 prior_precision: float = DEFAULT_PRIOR_PRECISION) -> None:
        self._mean = mean
        self._precision = precision
        self._curvature = curvature
        self.source = source  # estimator that produced it (a fallback says so)
        self.kfac = kfac  # (A, G) factors of the (K, N) view, when estimated
        self._samples = samples
        self._prior = prior_precision

    @staticmethod
    def _get(source: ArraySource) -> np.ndarray:
        return source() if callable(source) else source

    @property
    def mean(self) -> np.ndarray:
        return self._get(self._mean)

    @mean.setter
    def mean(self, value: ArraySource) -> None:
        self._mean = value

    @property
    def curvature(self) -> np.ndarray:
        """Per-sample curvature (precision = samples * curvature + prior)."""
        return self._get(self._curvature)

    @curvature.setter
    def curvature(self, value: ArraySource) -> None:
        self._curvature = value

    @property
    def precision(self) -> np.ndarray:
        if self._precision is not None:
            return self._get(self._precision)
        fresh = callable(self._curvature)  # read for this call: scaled in place, no second copy
        out = np.asarray(self.curvature, dtype=np.float64) if fresh else np.array(self.curvature, dtype=np.float64)
        out *= self._samples
        out += self._prior
        return out

    @precision.setter
    def precision(self, value: ArraySource) -> None:
        self._precision = value

    @property
    def lazy(self) -> bool:
        """Whether the arrays are read on access rather than held."""
        return any(callable(s) for s in (self._mean, self._precision, self._curvature))

    @property
    def variance(self) -> np.ndarray:
        return 1.0 / self.precision

    @property
    def std(self) -> np.ndarray:
        return 1.0 / np.sqrt(self.precision)


SUMMARY_BAND = 1 << 20
"""Values per band in :meth:`Posterior.summary`."""


class Spill:
    """A temporary folder of ``.npy`` arrays written once and read back whole on every access (never kept
    mapped: a mapping would keep every page read resident). Removed when the object is garbage-collected."""

    def __init__(self, prefix: str = "bq-posterior-") -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=prefix)
        self.folder = Path(self._tmp.name)
        self._count = 0

    def put(self, array: np.ndarray, path: Path | None = None) -> Path:
        """Write ``array`` (a new file, or over ``path``); returns its path."""
        if path is None:
            self._count += 1
            path = self.folder / f"a{self._count}.npy"
        with open(path, "wb") as f:
            np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)
        return path

    def reader(self, path: Path) -> Callable[[], np.ndarray]:
        spill = self  # the reader keeps the folder alive

        def read() -> np.ndarray:
            assert spill.folder  # the reader's reference keeps the folder until the posterior is gone
            return np.load(path, allow_pickle=False)

        return read

    def cleanup(self) -> None:
        self._tmp.cleanup()


@dataclasses.dataclass
class Posterior:
    method: str
    samples: int
    prior_precision: float
    weights: dict[str, WeightPosterior]
    notes: list[str] = dataclasses.field(default_factory=list)
    loss: list[dict] | None = None
    """The loss the estimator fitted, per term (:meth:`bq_onnx.autodiff.loss.LossPlan.describe`; None: none was
    read, as for the activations estimator or a loaded file). Reported, not saved."""

    def summary(self) -> list[dict]:
        """Per layer: size, mean curvature, mean informativeness |mu|/sigma (paper 001 eq. 1), source.

        The standard deviations are taken a band of :data:`SUMMARY_BAND` values at a time: whole, ``1 / sqrt(p)``
        held three float64 copies of the weight beside its precision (issue 21: the report of a 0.125 GiB model
        with ``--calib`` passed the streaming bound there)."""
        rows = []
        for name, wp in self.weights.items():
            curvature = wp.curvature
            mean_curvature = float(np.mean(curvature))
            trace_curvature = float(np.sum(curvature, dtype=np.float64))
            del curvature
            precision = np.asarray(wp.precision).reshape(-1)
            mu = np.asarray(wp.mean).reshape(-1)
            std_sum = informativeness = 0.0
            for at in range(0, precision.size, SUMMARY_BAND):
                std = 1.0 / np.sqrt(precision[at : at + SUMMARY_BAND])
                std_sum += float(np.sum(std))
                informativeness += float(np.sum(np.abs(mu[at : at + SUMMARY_BAND]) / std))
            size = max(precision.size, 1)
            rows.append(
                {
                    "name": name,
                    "numel": int(precision.size),
                    "source": wp.source,
                    "mean_curvature": mean_curvature,
                    "trace_curvature": trace_curvature,
                    "mean_std": std_sum / size,
                    "mean_informativeness": informativeness / size,
                }
            )
            del precision, mu
        return rows

    def save(self, path: str | os.PathLike) -> None:
        """One ``.npz``: ``mean/<w>``, ``precision/<w>``, ``curvature/<w>`` (+ K-FAC factors) and a JSON header.

        Written one array at a time (the archive ``np.savez`` writes, member by member), so saving holds one
        weight's arrays, not the whole posterior.
        """
        sources = {name: wp.source for name, wp in self.weights.items()}
        header = {
            "method": self.method,
            "samples": self.samples,
            "prior_precision": self.prior_precision,
            "sources": sources,
            "notes": self.notes,
        }
        with zipfile.ZipFile(path, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:

            def put(key: str, array: np.ndarray) -> None:
                with archive.open(f"{key}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(array), allow_pickle=False)

            for name, wp in self.weights.items():
                put(f"mean/{name}", wp.mean)
                put(f"precision/{name}", wp.precision)
                put(f"curvature/{name}", wp.curvature)
                if wp.kfac is not None:
                    put(f"kfac_a/{name}", wp.kfac[0])
                    put(f"kfac_g/{name}", wp.kfac[1])
            put("__header__", np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8))

    @classmethod
    def load(cls, path: str | os.PathLike, prior_precision: float | None = None) -> Posterior:
        """Read a posterior saved by :meth:`save`, or an external one with ``mean/<w>`` and ``std/<w>``.

        External files (models trained as Bayesian networks, paper 001) give ``mean/<name>`` and either
        ``std/<name>`` or ``precision/<name>`` per weight; ``curvature`` is then derived from the precision.
        Every array is checked here, one weight at a time; a file over :data:`LAZY_LOAD_BYTES` is then read
        again weight by weight when the passes ask for it (the file must stay in place), a smaller one is held.
        """
        path = Path(path)
        try:
            data = np.load(path, allow_pickle=False)
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: cannot read posterior (not an .npz archive)")
            with data:
                files = set(data.files)
                header = {}
                if "__header__" in files:
                    header = json.loads(data["__header__"].tobytes().decode())
                prior = header.get("prior_precision",
                                   DEFAULT_PRIOR_PRECISION if prior_precision is None else prior_precision)
                samples = int(header.get("samples", 1))
                names = sorted({k.split("/", 1)[1] for k in files if k.startswith("mean/")})
                if not names:
                    raise DataError(f"{path}: no 'mean/<weight>' arrays in the posterior file")
                lazy = path.stat().st_size > LAZY_LOAD_BYTES
                weights = {name: _load_weight(data, files, path, name, header, prior, samples, lazy)
                           for name in names}
        except DataError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
            raise DataError(f"{path}: cannot read posterior ({str(exc).splitlines()[0][:200]})") from None
        method = header.get("method", "external")
        return cls(method, samples, float(prior), weights, list(header.get("notes", [])))


#: Posterior files bigger than this are read weight by weight on demand rather than held in memory.
LAZY_LOAD_BYTES = 256 * 2**20


def _member(path: Path, key: str, convert: Callable[[np.ndarray], np.ndarray]) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        with np.load(path, allow_pickle=False) as data:
            return convert(data[key])

    return read


def _load_weight(data, files: set[str], path: Path, name: str, header: dict, prior: float, samples: int,
                 lazy: bool) -> WeightPosterior:
    """Check one weight's arrays in an open ``.npz``; the posterior holds them, or (``lazy``) readers of them."""
    mean = data[f"mean/{name}"]
    if f"precision/{name}" in files:
        key = f"precision/{name}"

        def to_precision(raw: np.ndarray) -> np.ndarray:
            return raw
    elif f"std/{name}" in files:
        key = f"std/{name}"

        def to_precision(raw: np.ndarray) -> np.ndarray:
            return 1.0 / raw.astype(np.float64) ** 2

        std = data[key].astype(np.float64)
        if np.any(std <= 0) or not np.isfinite(std).all():
            raise DataError(f"{path}: std of '{name}' must be finite and positive")
        del std
    else:
        raise DataError(f"{path}: weight '{name}' has a mean but neither 'std/' nor 'precision/'")
    precision = to_precision(data[key])
    if precision.shape != mean.shape:
        raise DataError(f"{path}: '{name}': mean {mean.shape} and precision {precision.shape} differ")
    if not np.isfinite(mean).all() or not np.isfinite(precision).all() or np.any(precision <= 0):
        raise DataError(f"{path}: '{name}' has NaN/Inf or non-positive precision")
    has_curvature = f"curvature/{name}" in files

    def to_curvature(raw: np.ndarray) -> np.ndarray:
        if has_curvature:
            return raw.astype(np.float64)
        return (np.maximum(to_precision(raw) - prior, 0.0) / max(samples, 1)).astype(np.float64)

    curvature_key = f"curvature/{name}" if has_curvature else key
    kfac = None
    if f"kfac_a/{name}" in files:
        kfac = (data[f"kfac_a/{name}"], data[f"kfac_g/{name}"])
    source = header.get("sources", {}).get(name, "external")
    if lazy:
        return WeightPosterior(_member(path, f"mean/{name}", lambda m: m.astype(np.float32)),
                               _member(path, key, lambda p: to_precision(p).astype(np.float64)),
                               _member(path, curvature_key, to_curvature), source, kfac,
                               samples=samples, prior_precision=prior)
    curvature = to_curvature(data[curvature_key] if has_curvature else data[key])
    return WeightPosterior(mean.astype(np.float32), precision.astype(np.float64), curvature, source, kfac,
                           samples=samples, prior_precision=prior)


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

    def state(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The sums and count as arrays (a shard file's or a worker's reply), exact: :meth:`restore` reads them
        back to an equal accumulator."""
        return {f"{prefix}count": np.array(self.count, dtype=np.int64),
                **{f"{prefix}sum/{name}": total for name, total in self.sums.items()}}

    @classmethod
    def restore(cls, state: Mapping[str, np.ndarray], prefix: str = "") -> SumAccumulator:
        acc = cls()
        acc.count = int(state[f"{prefix}count"])
        head = f"{prefix}sum/"
        acc.sums = {key[len(head):]: np.array(value, dtype=np.float64) for key, value in state.items()
                    if key.startswith(head)}  # a copy: a reply from Ray's object store is read-only
        return acc

    def mean(self) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise DataError("no calibration samples were accumulated")
        return {name: total / self.count for name, total in self.sums.items()}


def posterior_from_curvature(
    mean: np.ndarray, curvature: np.ndarray, samples: int, prior_precision: float, source: str
) -> WeightPosterior:
    """Diagonal Laplace: precision = N * curvature + lambda (curvature clipped at 0: a negative Hessian
    diagonal from Hutchinson noise carries no information, it must not make the variance negative)."""
    curvature = np.maximum(np.asarray(curvature, dtype=np.float64), 0.0)
    precision = samples * curvature + prior_precision
    return WeightPosterior(np.asarray(mean, dtype=np.float32), precision, curvature, source)
