"""Calibration data: where it comes from, checked against the model before anything runs.

Accepted sources: an ``.npz`` keyed by input name; a folder of ``.npz`` files (each keyed by input name,
concatenated in file-name order) or of ``<input name>.npy`` files; a Python iterable of ``{name: array}`` dicts
(each a batch); an onnxruntime ``CalibrationDataReader`` (anything with ``get_next()``). Names, dtypes, ranks and
static dimensions are validated against the model's inputs, and NaN/Inf or empty data is refused, each with a
one-line error naming the input.

Each input has a *sample axis* (:func:`sample_axes`): where its samples are stacked, the model's batch axis (axis 0
for most models, axis 1 for a recurrent state ``[2, batch, 128]``); a scalar input has none and is given once,
shared by every sample (``--batch-axis INPUT=none`` makes any input shared). A model whose sample axis has a fixed
size B (``[1, 1, 64, W]``) runs B samples per run (:attr:`Calibration.fixed_batch`); its samples are given
*concatenated along that axis*: N samples of a ``[1, 1, 64, W]`` input are one ``[N, 1, 64, W]`` array (N*B rows
for a fixed batch B, N*B a multiple of B), never an extra leading axis.

A source made of parts (a folder of ``.npz`` files, an iterable of dicts, a reader) may give each part with its
sample axis (a batch) or without it (one sample: the part's array has one dimension fewer than the input, and a
new sample axis is added); the parts are then concatenated along the sample axis. Parts that do not stack (images
of different widths, sequences of different lengths, inputs whose counts along their sample axes disagree, such as
a sequence ``[T, 576]`` beside a state ``[1, 1, 128]``) are kept one per run (:class:`bq_onnx.runs.Runs`): each part
is then one sample, run on its own as given. A part set larger than
:data:`SPILL_BYTES` is kept in a temporary memory-mapped ``.npy`` per input instead of in memory.

The loaded :class:`Calibration` is the one object every consumer (posterior, measured tables, distillation,
verification) receives; they take samples only through :meth:`Calibration.select`, :meth:`Calibration.batches`
and :meth:`Calibration.runs` (and :meth:`Calibration.feeds` for what one run reads), so the axis, the fixed
batch and parts kept per run stay its business.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from bq_onnx.data_files import Tally, check_regular, read_npy, read_npz
from bq_onnx.errors import DataError, OutputError
from bq_onnx.runs import Runs

CalibrationSource = str | os.PathLike | Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]]

#: Sources made of parts (folders, iterables, readers) whose arrays together exceed this many bytes are kept on
#: disk, one memory-mapped temporary ``.npy`` per input; ``BQ_ONNX_CALIB_SPILL_MB`` (MiB) overrides it.
SPILL_BYTES = 256 << 20
#: The largest calibration value magnitude: squares of it summed over many samples stay finite in float32
#: (values near 3e38 overflowed the posterior's squared sums to Inf)
MAX_MAGNITUDE = 1e15


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
            # a negative size (paddle2onnx writes an unknown batch as -1) is symbolic, not a size
            dims = tuple(d if isinstance(d, int) and d >= 0 else (str(d) if d is not None else None)
                         for d in value.shape)
        specs.append(InputSpec(value.name, dtype, dims, value.shape is not None))
    return specs


def sample_axes(specs: list[InputSpec], overrides: Mapping[str, int | None] | None = None) -> dict[str, int | None]:
    """The sample axis of each input: an override; None for a scalar (given once, shared by every sample); else
    the first axis named by a symbol that is another input's leading symbolic dimension (the batch symbol); else
    axis 0 when it is symbolic or a fixed 1 (a fixed batch of one: later symbolic dimensions are lengths, such as
    an image width); else the first symbolic dimension (a state ``[2, batch, 128]``); else axis 0 (a fixed batch)."""
    overrides = dict(overrides or {})
    names = {s.name for s in specs}
    for name in overrides:
        if name not in names:
            raise DataError(f"sample axis given for unknown input '{name}' (model inputs: {', '.join(sorted(names))})")
    batch_symbols = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)}
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
            named = [i for i, d in enumerate(spec.shape) if isinstance(d, str) and d in batch_symbols]
            symbolic = [i for i, d in enumerate(spec.shape) if not isinstance(d, int)]
            if named:
                axes[spec.name] = named[0]
            elif not spec.shape or not isinstance(spec.shape[0], int) or spec.shape[0] == 1 or not symbolic:
                axes[spec.name] = 0
            else:
                axes[spec.name] = symbolic[0]
    return axes


def fixed_batch(specs: list[InputSpec], axes: Mapping[str, int | None]) -> int | None:
    """The number of samples every run must take: the fixed size of the inputs' sample axes (None: any)."""
    sizes = {}
    for spec in specs:
        axis = axes.get(spec.name, 0)
        if axis is not None and spec.rank_known and axis < len(spec.shape) and isinstance(spec.shape[axis], int):
            sizes[spec.name] = spec.shape[axis]
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"'{name}': {size}" for name, size in sizes.items())
        raise DataError(f"inputs have different fixed batch sizes on their sample axes ({detail}); set the sample "
                        f"axes with --batch-axis INPUT=AXIS")
    return next(iter(sizes.values()), None)


@dataclasses.dataclass
class Calibration:
    """Validated calibration samples: ``{input name: array}``, each stacked along its sample axis (``axes``;
    missing = 0, None = one value shared by every sample), or every input kept per run (:class:`Runs`: one part,
    one sample, one run); ``fixed_batch``: the samples every run must take (a model with a fixed batch; 1 for parts
    kept per run), None: any number."""

    arrays: dict[str, np.ndarray | Runs]
    source: str
    axes: dict[str, int | None] = dataclasses.field(default_factory=dict)
    fixed_batch: int | None = None
    spilled: object = dataclasses.field(default=None, repr=False, compare=False)  # keeps spilled files alive

    def axis(self, name: str) -> int | None:
        return self.axes.get(name, 0)

    @property
    def per_run(self) -> bool:
        """Whether the samples are parts kept one per run (they do not stack)."""
        return any(isinstance(v, Runs) for v in self.arrays.values())

    @property
    def num_samples(self) -> int:
        for value in self.arrays.values():
            if isinstance(value, Runs):
                return len(value)
        for name, value in self.arrays.items():
            axis = self.axis(name)
            if axis is not None:
                return value.shape[axis]
        return 1  # every input is shared: one sample

    def sample_shape(self, name: str) -> tuple[int, ...] | None:
        """The shape of one sample of input ``name``, its sample axis removed (None: no such input here)."""
        if name not in self.arrays or isinstance(self.arrays[name], Runs):
            return None
        shape = self.arrays[name].shape
        axis = self.axis(name)
        return shape if axis is None else shape[:axis] + shape[axis + 1 :]

    def run_size(self, requested: int) -> int:
        """Samples per run: the model's fixed batch, else ``requested``."""
        return self.fixed_batch or requested

    def run_sizes(self, requested: int) -> list[int]:
        """The samples of each run :meth:`batches` makes (the last may be short)."""
        n, size = self.num_samples, self.run_size(requested)
        return [min(size, n - start) for start in range(0, n, size)]

    def batches(self, batch_size: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Feeds of consecutive runs of ``batch_size`` samples (of the fixed batch, for a fixed-batch model)."""
        n = self.num_samples
        size = self.run_size(batch_size)
        for start in range(0, n, size):
            yield self.feeds(slice(start, start + size))

    def feeds(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """What one run over the samples ``rows`` reads (rows of one run, for parts kept per run)."""
        return {k: v[rows] if isinstance(v, Runs) else _along(v, self.axis(k), rows) for k, v in self.arrays.items()}

    def run_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """The shape of each input in one run, None where runs differ (parts of different widths)."""
        first = self.feeds(slice(0, self.run_size(1)))
        return {k: v.shape_template() if isinstance(v, Runs) else first[k].shape for k, v in self.arrays.items()}

    def runs(self, rows: np.ndarray) -> list[np.ndarray]:
        """``rows`` (sample indices) cut into runs the model accepts: one run, or runs of the fixed batch (the last
        padded with its own first rows)."""
        rows = np.asarray(rows)
        if not self.fixed_batch:
            return [rows]
        size = self.fixed_batch
        return [np.resize(rows[i:i + size], size) for i in range(0, len(rows), size)]

    def select(self, rows: slice | np.ndarray) -> dict[str, np.ndarray]:
        """Feeds of the samples ``rows`` (a slice or an index array): the one way consumers take samples, so
        where each input keeps its samples stays this object's business."""
        return {k: _along(v, self.axis(k), rows) for k, v in self.arrays.items()}

    def take(self, count: int) -> Calibration:
        """The first ``count`` samples (rounded up to whole runs of a fixed batch)."""
        size = self.run_size(1)
        count = -(-count // size) * size
        return Calibration(self.select(slice(0, count)), self.source, dict(self.axes), self.fixed_batch, self.spilled)


def _along(value: np.ndarray | Runs, axis: int | None, rows: slice | np.ndarray) -> np.ndarray | Runs:
    if isinstance(value, Runs):
        return value.subset(rows)
    if axis is None:
        return value
    return np.ascontiguousarray(value[(slice(None),) * axis + (rows,)])  # runtimes read C order


def load_calibration(
    source: CalibrationSource | Calibration,
    model: ir.Model,
    max_samples: int | None = None,
    axes: Mapping[str, int | None] | None = None,
) -> Calibration:
    """Read and validate calibration data for ``model``; ``max_samples`` keeps the first N samples (whole runs of
    a fixed batch); ``axes`` overrides the sample axis of named inputs (None: given once, shared). A loaded
    :class:`Calibration` is checked against ``model`` and kept (a one-shot reader is read once, then reused
    through the object)."""
    specs = input_specs(model)
    spilled = None
    if isinstance(source, Calibration):
        arrays, where, spilled = dict(source.arrays), source.source, source.spilled
        known = {s.name for s in specs}
        sample_axis = sample_axes(specs, {k: source.axis(k) for k in arrays if k in known} | dict(axes or {}))
    else:
        sample_axis = sample_axes(specs, axes)
        ranks = {s.name: len(s.shape) for s in specs if s.rank_known}
        if isinstance(source, (str, os.PathLike)):
            (arrays, spilled), where = _read_path(Path(source), sample_axis, ranks), os.fspath(source)
        elif isinstance(source, Mapping):
            arrays, where = {k: np.asarray(v) for k, v in source.items()}, "<dict>"
        elif hasattr(source, "get_next"):
            where = "<CalibrationDataReader>"
            arrays, spilled = _concat(_reader_batches(source), where, sample_axis, ranks)
        elif isinstance(source, Iterable):
            arrays, spilled = _concat(iter(source), "<iterable>", sample_axis, ranks)
            where = "<iterable>"
        else:
            raise DataError(f"unsupported calibration source of type {type(source).__name__}")
    fixed = 1 if any(isinstance(v, Runs) for v in arrays.values()) else fixed_batch(specs, sample_axis)
    calib = Calibration(arrays, where, {k: v for k, v in sample_axis.items() if v != 0}, fixed, spilled)
    if max_samples is not None:
        if max_samples < 1:
            raise DataError(f"--calib-samples must be >= 1, got {max_samples}")
        calib = calib.take(max_samples)
    _validate(calib.arrays, specs, where, sample_axis, fixed)
    return calib


def _reader_batches(reader) -> Iterator[Mapping[str, np.ndarray]]:
    while (batch := reader.get_next()) is not None:
        yield batch


def _concat(
    batches: Iterator[Mapping[str, np.ndarray]], where: str, axes: Mapping[str, int | None],
    ranks: Mapping[str, int],
) -> tuple[dict[str, np.ndarray], object]:
    """The parts concatenated along each input's sample axis (a part without the axis is one sample); kept in
    memory-mapped temporary files once they exceed :func:`spill_bytes`. Returns the arrays and what keeps the
    files alive (None when in memory)."""
    parts: dict[str, list[np.ndarray]] = {}
    store = _PartStore(spill_bytes())
    for i, batch in enumerate(batches):
        if not isinstance(batch, Mapping):
            raise DataError(f"{where}: batch {i} is a {type(batch).__name__}, expected a dict of arrays")
        if parts and set(batch) != set(parts):
            raise DataError(f"{where}: batch {i} has inputs {sorted(batch)}, earlier batches {sorted(parts)}")
        for name, value in batch.items():
            value = np.asarray(value)
            axis = axes.get(name, 0)
            if axis is not None and name in ranks and value.ndim == ranks[name] - 1:
                value = np.expand_dims(value, axis)  # one sample given without its sample axis
            chunks = parts.setdefault(name, [])
            chunks.append(value if axis is None and chunks else store.keep(value))
    if not parts:
        raise DataError(f"{where}: no calibration samples")
    if not _stacks(parts, axes):  # each part is one run, as given
        return {name: Runs(chunks) for name, chunks in parts.items()}, store.folder
    out = {}
    for name, chunks in parts.items():
        axis = axes.get(name, 0)
        if axis is None:  # shared by every sample: each batch must carry the same value
            if any(c.shape != chunks[0].shape or not np.array_equal(c, chunks[0]) for c in chunks[1:]):
                raise DataError(f"{where}: input '{name}' has no sample axis, yet batches give different values "
                                f"(give it once, or set its axis with --batch-axis {name}=AXIS)")
            out[name] = np.asarray(chunks[0])
            continue
        out[name] = store.concatenate(name, chunks, axis)
    return out, store.folder


def _stacks(parts: Mapping[str, list[np.ndarray]], axes: Mapping[str, int | None]) -> bool:
    """Whether the parts concatenate along each input's sample axis into one sample count for every input (else
    they are kept per run: different widths, or a sequence whose first axis is its length beside a state)."""
    counts = set()
    for name, chunks in parts.items():
        axis = axes.get(name, 0)
        if axis is None:
            continue
        first = chunks[0]
        if any(c.ndim != first.ndim or c.ndim <= axis or
               c.shape[:axis] + c.shape[axis + 1:] != first.shape[:axis] + first.shape[axis + 1:] for c in chunks):
            return False
        counts.add(sum(c.shape[axis] for c in chunks))
    return len(counts) <= 1


def spill_bytes() -> int:
    """:data:`SPILL_BYTES`, or ``BQ_ONNX_CALIB_SPILL_MB`` MiB."""
    value = os.environ.get("BQ_ONNX_CALIB_SPILL_MB")
    try:
        return int(float(value) * 2**20) if value else SPILL_BYTES
    except ValueError:
        return SPILL_BYTES


class _PartStore:
    """Where the parts of a source wait to be concatenated: in memory until they exceed ``limit`` bytes, then each
    in its own temporary ``.npy`` (memory-mapped when read back), and the result in one ``.npy`` per input."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total, self.count = limit, 0, 0
        self.folder: tempfile.TemporaryDirectory | None = None

    def keep(self, value: np.ndarray) -> np.ndarray:
        self.total += value.nbytes
        if self.folder is None and self.total <= self.limit:
            return value
        if self.folder is None:
            with _temporary_files():
                self.folder = tempfile.TemporaryDirectory(prefix="bq-calib-")
        return self._save(value)

    def _save(self, value: np.ndarray) -> np.ndarray:
        self.count += 1
        path = Path(self.folder.name) / f"part{self.count}.npy"
        with _temporary_files():
            np.save(path, value, allow_pickle=False)
        return np.load(path, mmap_mode="r")

    def concatenate(self, name: str, chunks: list[np.ndarray], axis: int) -> np.ndarray:
        if self.folder is None:
            return np.concatenate(chunks, axis=axis)
        first = chunks[0]
        if any(c.ndim != first.ndim or c.dtype != first.dtype or
               c.shape[:axis] + c.shape[axis + 1:] != first.shape[:axis] + first.shape[axis + 1:] for c in chunks):
            np.concatenate([c[(slice(None),) * axis + (slice(0, 1),)] for c in chunks], axis=axis)  # its error
        shape = list(first.shape)
        shape[axis] = sum(c.shape[axis] for c in chunks)
        self.count += 1
        path = Path(self.folder.name) / f"input{self.count}.npy"
        with _temporary_files():
            out = np.lib.format.open_memmap(path, mode="w+", dtype=first.dtype, shape=tuple(shape))
            with open(path, "r+b") as f:  # blocks reserved now: a full disk fails here, not as SIGBUS in a write
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            start = 0
            for c in chunks:
                out[(slice(None),) * axis + (slice(start, start + c.shape[axis]),)] = c
                start += c.shape[axis]
            out.flush()
            del out
        return np.load(path, mmap_mode="r")


@contextlib.contextmanager
def _temporary_files() -> Iterator[None]:
    """Spilled parts live in TMPDIR: a full or unwritable one is a one-line output error (exit 7)."""
    try:
        yield
    except OSError as exc:
        raise OutputError(f"{tempfile.gettempdir()}: cannot write temporary calibration files "
                          f"({exc.strerror or exc}); free space or set TMPDIR") from None


def _read_npz(path: Path, tally: Tally | None = None) -> dict[str, np.ndarray]:
    return read_npz(path, tally)  # sizes checked before inflating: bq_onnx/data_files.py


def _read_path(
    path: Path, axes: Mapping[str, int | None], ranks: Mapping[str, int]
) -> tuple[dict[str, np.ndarray], object]:
    if not path.exists():
        raise DataError(f"{path}: calibration data not found")
    tally = Tally(f"{path}: calibration data")
    if not path.is_dir():
        check_regular(path, "calibration data")
        if path.suffix == ".npy":
            raise DataError(f"{path}: a single .npy has no input name; use .npz keyed by input name or a folder")
        return _read_npz(path, tally), None
    files = sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy") and p.is_file())
    if not files:
        raise DataError(f"{path}: folder has no .npz or .npy files")
    if all(p.suffix == ".npy" for p in files):
        return {p.stem: read_npy(p, tally) for p in files}, None
    if any(p.suffix == ".npy" for p in files):
        raise DataError(f"{path}: mixes .npy and .npz files; use one kind")
    return _concat((_read_npz(p, tally) for p in files), os.fspath(path), axes, ranks)


def _validate(
    arrays: dict[str, np.ndarray | Runs], specs: list[InputSpec], where: str, axes: Mapping[str, int | None],
    fixed: int | None = None,
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
        value, stacked_axis = arrays[spec.name], axes.get(spec.name, 0)
        for arr in value.parts if isinstance(value, Runs) else [value]:
            # a part kept per run is a whole run: every static dimension must match, its sample axis too
            sample_axis = None if isinstance(value, Runs) else stacked_axis
            _check_array(arr, spec, where, sample_axis, stacked_axis, fixed)
        if stacked_axis is not None and not isinstance(value, Runs):
            counts[spec.name] = value.shape[stacked_axis]
    if len(set(counts.values())) > 1:
        detail = ", ".join(f"'{name}': {count}" for name, count in counts.items())
        raise DataError(f"{where}: inputs have different sample counts ({detail}); an input given once for every "
                        f"sample needs --batch-axis INPUT=none")


def _check_array(arr: np.ndarray, spec: InputSpec, where: str, sample_axis: int | None, stacked_axis: int | None,
                 fixed: int | None) -> None:
    """One input's array (or one run's part) against the model's input: dtype, rank, static dimensions (all but
    ``sample_axis``), whole runs of a fixed batch, finite values."""
    if arr.dtype != spec.dtype:
        raise DataError(f"{where}: input '{spec.name}' has dtype {arr.dtype}, the model expects {spec.dtype}")
    if spec.shape and arr.ndim != len(spec.shape):
        raise DataError(
            f"{where}: input '{spec.name}' has rank {arr.ndim} (shape {list(arr.shape)}), "
            f"the model expects rank {len(spec.shape)} {list(spec.shape)}{_how_to_stack(spec, stacked_axis)}"
        )
    if sample_axis is not None and (arr.ndim <= sample_axis or arr.shape[sample_axis] == 0):
        side = "first axis" if sample_axis == 0 else f"its sample axis {sample_axis}"
        raise DataError(f"{where}: input '{spec.name}' is empty (no samples along the {side})")
    for axis, (have, want) in enumerate(zip(arr.shape, spec.shape)):
        if isinstance(want, int) and axis != sample_axis and have != want:
            raise DataError(
                f"{where}: input '{spec.name}' has shape {list(arr.shape)}, the model expects "
                f"{list(spec.shape)} (axis {axis}){_how_to_stack(spec, stacked_axis)}"
            )
    if fixed and sample_axis is not None and arr.shape[sample_axis] % fixed:
        raise DataError(
            f"{where}: input '{spec.name}' has {arr.shape[sample_axis]} rows along its sample axis "
            f"{sample_axis}, not a multiple of the model's fixed batch {fixed}{_how_to_stack(spec, sample_axis)}"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"{where}: input '{spec.name}' contains {bad} NaN/Inf value(s)")
    if np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.max(np.abs(arr))) > MAX_MAGNITUDE:
        raise DataError(f"{where}: input '{spec.name}' has values up to {float(np.max(np.abs(arr))):.3g}, beyond "
                        f"{MAX_MAGNITUDE:g} (their squares and sums overflow float32); scale the data")


def _how_to_stack(spec: InputSpec, axis: int | None) -> str:
    """The rule for this input's data, said in an error: the shape expected and the option that changes it."""
    if axis is None:
        return f"; '{spec.name}' is given once for every sample (give it a sample axis: --batch-axis {spec.name}=AXIS)"
    dims = [str(d) if d is not None else "?" for d in spec.shape]
    if dims:
        size = spec.shape[axis]
        dims[axis] = f"N*{size}" if isinstance(size, int) and size != 1 else "N"
    return (f"; give samples concatenated along its sample axis {axis} (shape [{', '.join(dims)}]) or one sample "
            f"per file of a folder, or set the axis with --batch-axis {spec.name}=AXIS|none")


def load_labels(path: str | os.PathLike) -> np.ndarray:
    """Labels from an ``.npy`` or an ``.npz`` (key ``labels``, or its only array)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: labels file not found")
    if path.suffix == ".npy":
        return read_npy(path)
    data = read_npz(path)
    if "labels" in data:
        return data["labels"]
    if len(data) == 1:
        return next(iter(data.values()))
    raise DataError(f"{path}: no 'labels' array (found: {', '.join(data)})")
