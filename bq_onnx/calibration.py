"""Calibration data: where it comes from, checked against the model before anything runs.

Accepted sources: an ``.npz`` keyed by input name; a folder of ``.npz`` files (each keyed by input name,
concatenated in file-name order) or of ``<input name>.npy`` files; a Python iterable of ``{name: array}`` dicts
(each a batch); an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``). Names, dtypes, ranks and
static dimensions are validated against the model's inputs, and NaN/Inf or empty data is refused, each with a
one-line error naming the input.

Each input has a *sample axis* (:func:`sample_axes`): where its samples are stacked, the model's batch axis. It is
the first symbolic dimension of the input (axis 0 for most models, axis 1 for a recurrent state ``[2, batch,
128]``); a scalar input has none and is given once, shared by every sample. The loaded :class:`Calibration` is the
one object every consumer (posterior, measured tables, distillation, verification) receives; they take samples only
through :meth:`Calibration.select` and :meth:`Calibration.batches`, so the axis stays its business.
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
    shape: tuple[int | str | None, ...]  # ints are static, str/None symbolic; () also when the rank is unknown
    rank_known: bool = True


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
        specs.append(InputSpec(value.name, dtype, dims, value.shape is not None))
    return specs


def sample_axes(specs: list[InputSpec], overrides: Mapping[str, int | None] | None = None) -> dict[str, int | None]:
    """The sample axis of each input: an override, else its first symbolic dimension, else 0 (None for a scalar,
    which is given once and shared by every sample)."""
    overrides = dict(overrides or {})
    names = {s.name for s in specs}
    for name in overrides:
        if name not in names:
            raise DataError(f"sample axis given for unknown input '{name}' (model inputs: {', '.join(sorted(names))})")
    axes: dict[str, int | None] = {}
    for spec in specs:
        if spec.name in overrides:
            axis = overrides[spec.name]
            if axis is not None and spec.rank_known and not 0 <= axis < len(spec.shape):
                raise DataError(f"input '{spec.name}': sample axis {axis} is outside its rank {len(spec.shape)}")
            axes[spec.name] = axis
        elif spec.rank_known and not spec.shape:
            axes[spec.name] = None
        else:
            symbolic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int)]
            axes[spec.name] = symbolic[0] if symbolic else 0
    return axes


@dataclasses.dataclass
class Calibration:
    """Validated calibration samples: ``{input name: array}``, each stacked along its sample axis (``axes``;
    missing = 0, None = one value shared by every sample)."""

    arrays: dict[str, np.ndarray]
    source: str
    axes: dict[str, int | None] = dataclasses.field(default_factory=dict)

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    @property
    def num_samples(self) -> int:
        for name, value in self.arrays.items():
            axis = self.axis(name)
            if axis is not None:
                return value.shape[axis]
        return 1  # every input is shared: one sample

    def sample_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of one sample of input ``name``, its sample axis removed (None: no such input here)."""
        if name not in self.arrays:
            return None
        shape = self.arrays[name].shape
        axis = self.axis(name)
        return shape if axis is None else shape[:axis] + shape[axis + 1 :]

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        n = self.num_samples
        for start in range(0, n, batch_size):
            yield self.select(slice(start, start + batch_size))

    def select(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """Feeds of the samples ``rows`` (a slice or an index array): the one way consumers take samples, so
        where each input keeps its samples stays this object's business."""
        return {k: _along(v, self.axis(k), rows) for k, v in self.arrays.items()}

    def take(self, count: int) -> Calibration:
        return Calibration(self.select(slice(0, count)), self.source, dict(self.axes))


def _along(value: np.ndarray, axis: int | None, rows: slice | np.ndarray) -> np.ndarray:
    if axis is None:
        return value
    return value[(slice(None),) * axis + (rows,)]


def load_calibration(
    source: CalibrationSource | Calibration,
    model: ir.Model,
    max_samples: int | None = None,
    axes: Mapping[str, int | None] | None = None,
) -> Calibration:
    """Read and validate calibration data for ``model``; ``max_samples`` keeps the first N samples; ``axes``
    overrides the sample axis of named inputs (None: given once, shared). A loaded :class:`Calibration` is checked
    against ``model`` and kept (a one-shot reader is read once, then reused through the object)."""
    specs = input_specs(model)
    if isinstance(source, Calibration):
        arrays, where = dict(source.arrays), source.source
        known = {s.name for s in specs}
        sample_axis = sample_axes(specs, {k: source.axis(k) for k in arrays if k in known} | dict(axes or {}))
    else:
        sample_axis = sample_axes(specs, axes)
        if isinstance(source, (str, os.PathLike)):
            arrays, where = _read_path(Path(source), sample_axis), os.fspath(source)
        elif isinstance(source, Mapping):
            arrays, where = {k: np.asarray(v) for k, v in source.items()}, "<dict>"
        elif hasattr(source, "get_next"):
            where = "<CalibrationDataReader>"
            arrays = _concat(_reader_batches(source), where, sample_axis)
        elif isinstance(source, Iterable):
            arrays, where = _concat(iter(source), "<iterable>", sample_axis), "<iterable>"
        else:
            raise DataError(f"unsupported calibration source of type {type(source).__name__}")
    calib = Calibration(arrays, where, {k: v for k, v in sample_axis.items() if v != 0})
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"--calib-samples must be >= 1, got {max_samples}")
        calib = Calibration(calib.select(slice(0, max_samples)), where, calib.axes)
    _validate(calib.arrays, specs, where, sample_axis)
    return calib


def _reader_batches(reader) -> Iterator[Mapping[str, np.ndarray]]:
    while (batch := reader.get_next()) is not None:
        yield batch


def _concat(
    batches: Iterator[Mapping[str, np.ndarray]], where: str, axes: Mapping[str, int | None]
) -> dict[str, np.ndarray]:
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
        axis = axes.get(name, 0)
        if axis is None:  # shared by every sample: each batch must carry the same value
            if any(c.shape != chunks[0].shape or not np.array_equal(c, chunks[0]) for c in chunks[1:]):
                raise DataError(f"{where}: input '{name}' has no sample axis, yet batches give different values")
            out[name] = chunks[0]
            continue
        try:
            out[name] = np.concatenate(chunks, axis=axis)
        except (ValueError, np.exceptions.AxisError) as exc:
            raise DataError(f"{where}: input '{name}': batches do not stack along its sample axis {axis} "
                            f"({str(exc).splitlines()[0]})") from None
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


def _read_path(path: Path, axes: Mapping[str, int | None]) -> dict[str, np.ndarray]:
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
    return _concat((_read_npz(p) for p in files), os.fspath(path), axes)


def _validate(
    arrays: dict[str, np.ndarray], specs: list[InputSpec], where: str, axes: Mapping[str, int | None]
) -> None:
    names = {s.name for s in specs}
    for spec in specs:
        if spec.name not in arrays:
            raise DataError(f"{where}: missing input '{spec.name}' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    for name in arrays:
        if name not in names:
            raise DataError(f"{where}: unknown input '{name}' (model inputs: {', '.join(sorted(names))})")
    counts = {}
    for spec in specs:
        arr = arrays[spec.name]
        sample_axis = axes.get(spec.name, 0)
        if arr.dtype != spec.dtype:
            raise DataError(f"{where}: input '{spec.name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
        if spec.shape and arr.ndim != len(spec.shape):
            raise DataError(
                f"{where}: input '{spec.name}' has rank {arr.ndim} (shape {list(arr.shape)}), "
                f"the model expects rank {len(spec.shape)} {list(spec.shape)}"
            )
        if sample_axis is not None and (arr.ndim <= sample_axis or arr.shape[sample_axis] == 0):
            side = "first axis" if sample_axis == 0 else f"its sample axis {sample_axis}"
            raise DataError(f"{where}: input '{spec.name}' is empty (no samples along the {side})")
        for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
            if isinstance(want, int) and axis != sample_axis and have != want:
                raise DataError(
                    f"{where}: input '{spec.name}' has shape {list(arr.shape)}, the model expects "
                    f"{list(spec.shape)} (axis {axis})"
                )
        if sample_axis is not None and spec.shape and isinstance(spec.shape[sample_axis], int) \
                and spec.shape[sample_axis] != 1:
            raise DataError(
                f"{where}: input '{spec.name}' has a fixed batch of {spec.shape[sample_axis]}; calibration needs "
                "batch 1 or a symbolic batch dimension"
            )
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise DataError(f"{where}: input '{spec.name}' contains {bad} NaN/Inf value(s)")
        if sample_axis is not None:
            counts[spec.name] = arr.shape[sample_axis]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{name}': {count}" for name, count in counts.items())
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
