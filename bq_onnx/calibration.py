"""Calibration data: where it comes from, checked against the model before anything runs.

Accepted sources: an ``.npz`` keyed by input name (first axis = samples); a folder of ``.npz`` files (each keyed
by input name, concatenated in file-name order) or of ``<input name>.npy`` files; a Python iterable of
``{name: array}`` dicts (each a batch, first axis = samples); an onnxruntime ``CalibrationDataReader``
(anything with ``get_next()``). Names, dtypes, ranks and static dimensions are validated against the model's
inputs, and NaN/Inf or empty data is refused, each with a one-line error naming the input. Samples are served
one batch at a time so estimators stream over them.
"""

from __future__ import annotations

import dataclasses
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bq_onnx.errors import DataError

CalibrationSource = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # ints are static, str/None symbolic


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (initializers that are also inputs are overridable weights, not data)."""
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        dtype = np.dtype(value.dtype.numpy()) if value.dtype is not None else np.dtype(np.float32)
        dims: tuple[int | str | None, ...] = ()
        if value.shape is not None:
            dims = tuple(d if isinstance(d, int) else (str(d) if d is not None else None) for d in value.shape)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


@dataclasses.dataclass
class Calibration:
    """Validated calibration samples: ``{input name: array}`` with a shared first (sample) axis."""

    arrays: dict[str, np.ndarray]
    source: str

    @property
    def num_samples(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples
        for start in range(0, n, batch_size):
            yield self.select(slice(start, start + batch_size))

    def select(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """Feeds of the samples ``rows`` (a slice or an index array): the one way consumers take samples, so
        where each input keeps its samples stays this object's business."""
        return {k: v[rows] for k, v in self.arrays.items()}

    def sample_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of one sample of input ``name`` (None: this data has no such input)."""
        return tuple(self.arrays[name].shape[1:]) if name in self.arrays else None

    def take(self, count: int) -> Calibration:
        return Calibration({k: v[:count] for k, v in self.arrays.items()}, self.source)


def load_calibration(
    source: CalibrationSource | Calibration, model: ir.Model, max_samples: int | None = None
) -> Calibration:
    """Read and validate calibration data for ``model``; ``max_samples`` keeps the first N samples."""
    if isinstance(source, Calibration):
        arrays, where = dict(source.arrays), source.source
    elif isinstance(source, (str, os.PathLike)):
        arrays, where = _read_path(Path(source)), os.fspath(source)
    elif isinstance(source, Mapping):
        arrays, where = {k: np.asarray(v) for k, v in source.items()}, "<dict>"
    elif hasattr(source, "get_next"):
        arrays, where = _concat(_reader_batches(source), "<CalibrationDataReader>"), "<CalibrationDataReader>"
    elif isinstance(source, Iterable):
        arrays, where = _concat(iter(source), "<iterable>"), "<iterable>"
    else:
        raise DataError(f"unsupported calibration source of type {type(source).__name__}")
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"--calib-samples must be >= 1, got {max_samples}")
        arrays = {k: v[:max_samples] for k, v in arrays.items()}
    _validate(arrays, input_specs(model), where)
    return Calibration(arrays, where)


def _reader_batches(reader) -> Iterator[Mapping[str, np.ndarray]]:
    while (batch := reader.get_next()) is not None:
        yield batch


def _concat(batches: Iterator[Mapping[str, np.ndarray]], where: str) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise DataError(f"{where}: batch {i} is a {type(batch).__name__}, expected a dict of arrays")
        if parts and set(batch) != set(parts):
            raise DataError(f"{where}: batch {i} has inputs {sorted(batch)}, earlier batches {sorted(parts)}")
        for name, value in batch.items():
            parts.setdefault(name, []).append(np.asarray(value))
    if not parts:
        raise DataError(f"{where}: no calibration samples")
    out = {}
    for name, chunks in parts.items():
        try:
            out[name] = np.concatenate(chunks, axis=0)
        except ValueError as exc:
            raise DataError(f"{where}: input '{name}': batches do not stack ({exc})") from None
    return out


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise DataError(f"{path}: expected an .npz archive keyed by input name")
            return {k: data[k] for k in data.files}
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read calibration data ({str(exc).splitlines()[0][:200]})") from None


def _read_path(path: Path) -> dict[str, np.ndarray]:
    if not path.exists():
        raise DataError(f"{path}: calibration data not found")
    if path.is_file():
        if path.suffix == ".npy":
            raise DataError(f"{path}: a single .npy has no input name; use .npz keyed by input name or a folder")
        return _read_npz(path)
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
    if not files:
        raise DataError(f"{path}: folder has no .npz or .npy files")
    if all(p.suffix == ".npy" for p in files):
        arrays = {}
        for p in files:
            try:
                arrays[p.stem] = np.load(p, allow_pickle=False)
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"{p}: cannot read ({str(exc).splitlines()[0][:200]})") from None
        return arrays
    if any(p.suffix == ".npy" for p in files):
        raise DataError(f"{path}: mixes .npy and .npz files; use one kind")
    return _concat((_read_npz(p) for p in files), os.fspath(path))


def _validate(arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> None:
    names = {s.name for s in specs}
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(f"{where}: missing input '{spec.name}' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    for name in arrays:
        if name not in names:
            raise DataError(f"{where}: unknown input '{name}' (model inputs: {', '.join(sorted(names))})")
    counts = set()
    for spec in specs:
        arr = arrays[spec.name]
        if arr.dtype != spec.dtype:
            raise DataError(f"{where}: input '{spec.name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
        if spec.shape and arr.ndim != len(spec.shape):
            raise DataError(
                f"{where}: input '{spec.name}' has rank {arr.ndim} (shape {list(arr.shape)}), "
                f"the model expects rank {len(spec.shape)} {list(spec.shape)}"
            )
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise DataError(f"{where}: input '{spec.name}' is empty (no samples along the first axis)")
        for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and axis > 0 and have != want:
                raise DataError(
                    f"{where}: input '{spec.name}' has shape {list(arr.shape)}, the model expects "
                    f"{list(spec.shape)} (axis {axis})"
                )
        if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] != 1:
            raise DataError(
                f"{where}: input '{spec.name}' has a fixed batch of {spec.shape[0]}; calibration needs batch 1 "
                "or a symbolic batch dimension"
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise DataError(f"{where}: input '{spec.name}' contains {bad} NaN/Inf value(s)")
        counts.add(arr.shape[0])
    if len(counts) > 1:
        detail = ", ".join(f"'{s.name}': {arrays[s.name].shape[0]}" for s in specs)
        raise DataError(f"{where}: inputs have different sample counts ({detail})")


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Labels from an ``.npy`` or an ``.npz`` (key ``labels``, or its only array)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: labels file not found")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as data:
            keys = data.files
            if "labels" in keys:
                return data["labels"]
            if len(keys) == 1:
                return data[keys[0]]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: cannot read labels ({str(exc).splitlines()[0][:200]})") from None
    raise DataError(f"{path}: no 'labels' array (found: {', '.join(keys)})")
