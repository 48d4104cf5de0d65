"""Reading untrusted model files and writing outputs atomically.

Models are files from strangers: before anything is built from one, its protobuf must parse and it must pass
the checks of :mod:`bq_onnx.model_checks` (the one validation, shared with inspect's fast path): tensor sizes
against their data and the memory budget, external data inside the model's folder, the onnx checker. Outputs
are written by the protocol of :mod:`bq_onnx.writing` (:func:`write_output`): staged, verified, then renamed into
place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from bq_onnx.errors import ModelError, OutputError
from bq_onnx.idle import drop_pages
from bq_onnx.model_checks import check_model
from bq_onnx.onnx_proto import graph_tensors, read_model
from bq_onnx.progress import memtrace
from bq_onnx.tensor_data import read_external

#: Protobuf cannot serialize more than this in one message; bigger outputs use external data.
PROTO_LIMIT = 2**31 - 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000
#: Bytes of external data held at a time while a tensor is copied to another file.
COPY_CHUNK = 64 << 20


def load_model(source: str | os.PathLike | onnx.ModelProto | ir.Model, check_graph: bool = True) -> ir.Model:
    """Load and validate a model from a path, a ModelProto or an IR model (external data stays lazy).

    An IR model or a ModelProto is copied: passes change models in place, and a caller's object is never modified.
    ``check_graph=False`` skips the onnx checker (``bq-onnx validate`` reports what a target cannot read, such as
    an opset, itself); every tensor is still checked against its data and the memory budget.
    """
    if isinstance(source, ir.Model):
        return copy_model(source)
    if isinstance(source, onnx.ModelProto):
        check_model(source, "<ModelProto>", None, check_graph=check_graph)
        private = onnx.ModelProto()
        private.CopyFrom(source)  # the IR wraps the proto's tensors: a pass renaming one would rename the caller's
        return _deserialize(private, "<ModelProto>")
    path = Path(source)
    proto = read_model(path)
    base_dir = path.resolve().parent
    check_model(proto, str(path), base_dir, check_graph=check_graph)
    model = _deserialize(proto, str(path))
    ir.external_data.set_base_dir(model.graph, base_dir)
    stream_external_tensors(model)
    return model


class StreamedExternalTensor(ir.ExternalTensor):
    """An external tensor read from its file on every access and never kept mapped.

    onnx-ir maps the data file and keeps the mapping: every page a pass reads stays resident until the model is
    gone, so reading each weight once costs the whole model in resident memory. Here each read returns a fresh
    array and unmaps the file at once; a pass that drops a weight's array after using it holds one weight.
    """

    __slots__ = ()

    def _load(self) -> None:
        self._check_validity()
        self._array = self._read()

    def _read(self) -> np.ndarray:
        """The tensor from its file by plain reads (:func:`bq_onnx.tensor_data.read_external`, never mapped:
        a file truncated meanwhile is a one-line error, not SIGBUS), unpacked like onnx-ir does."""
        shape = self.shape.numpy()
        if self.size == 0:
            return np.empty(shape, dtype=self.dtype.numpy())
        raw = self._raw()
        bits = self.dtype.bitwidth
        if bits in (2, 4, 6):
            from onnx_ir import _type_casting

            unpack = {4: _type_casting.unpack_4bitx2, 2: _type_casting.unpack_2bitx4, 6: _type_casting.unpack_6bit}
            return unpack[bits](raw, shape).view(self.dtype.numpy())
        return raw.view(np.dtype(self.dtype.numpy()).newbyteorder("<")).reshape(shape)

    def _raw(self) -> np.ndarray:
        """The stored bytes (sub-byte types packed), read now."""
        try:
            self._check_path_containment()
        except ValueError as exc:  # escapes, links: the file changed since the model was checked
            raise ModelError(f"{self.path}: external data of tensor '{self.name}' {_first_line(exc)}") from None
        return read_external(self.path, self.offset or 0, self.nbytes, self.name or "<unnamed>")

    def read_bytes(self, start: int, count: int) -> np.ndarray:
        """``count`` stored bytes from byte ``start`` of the tensor, read now into a fresh array (never mapped):
        a part of a big weight without the rest (:func:`bq_onnx.weights.streamed_design`)."""
        self._check_validity()
        if start < 0 or count < 0 or start + count > self.nbytes:
            raise ValueError(f"bytes {start}..{start + count} of a tensor of {self.nbytes}")
        try:
            self._check_path_containment()
        except ValueError as exc:
            raise ModelError(f"{self.path}: external data of tensor '{self.name}' {_first_line(exc)}") from None
        return read_external(self.path, (self.offset or 0) + start, count, self.name or "<unnamed>")

    def numpy(self) -> np.ndarray:
        self._check_validity()
        array, self._array = (self._array if self._array is not None else self._read()), None
        return array

    def tobytes(self) -> bytes:
        self._check_validity()
        return self._raw().tobytes() if self.nbytes else b""

    def tofile(self, file) -> None:
        """Copy the stored bytes to ``file`` by :data:`COPY_CHUNK` at a time (never the whole tensor in memory:
        ``tobytes`` held it twice, which for one 1 GiB weight broke the streaming bound); a data file truncated
        meanwhile is a one-line :class:`ModelError` as for a read."""
        self._check_validity()
        try:
            self._check_path_containment()
        except ValueError as exc:
            raise ModelError(f"{self.path}: external data of tensor '{self.name}' {_first_line(exc)}") from None
        start, name = self.offset or 0, self.name or "<unnamed>"
        for done in range(0, self.nbytes, COPY_CHUNK):
            file.write(read_external(self.path, start + done, min(COPY_CHUNK, self.nbytes - done), name).data)

    def release(self) -> None:
        self._array = None
        if self.raw is not None:
            with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with it
                self.raw.close()
            self.raw = None


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value
        for node in graph:
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR and isinstance(attr.value, ir.ExternalTensor):
                    yield attr.value
                elif attr.type == ir.AttributeType.TENSORS:
                    yield from (t for t in attr.value if isinstance(t, ir.ExternalTensor))


def stream_external_tensors(model: ir.Model, base_dirs: dict[str, str | os.PathLike] | None = None) -> None:
    """Make every external tensor a :class:`StreamedExternalTensor` (same object, so every reference to it
    follows); ``base_dirs`` (by tensor name) restores the folders a serialized copy lost."""
    for tensor in external_tensors(model):
        if base_dirs is not None and tensor.name in base_dirs and not tensor.base_dir:
            tensor.base_dir = base_dirs[tensor.name]
        if type(tensor) is ir.ExternalTensor:
            tensor.__class__ = StreamedExternalTensor


def _deserialize(proto: onnx.ModelProto, where: str) -> ir.Model:
    """The IR of a checked proto; what the checker lets through but the IR cannot represent is a model error."""
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as exc:  # noqa: BLE001  onnx-ir wraps the cause in SerdeError chains
        root = exc
        while root.__cause__ is not None:
            root = root.__cause__
        raise ModelError(f"{where}: invalid model ({_first_line(root)})") from None


def copy_model(model: ir.Model) -> ir.Model:
    """An independent copy (external tensors stay references to their files, streamed like the original's)."""
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    stream_external_tensors(copy, {t.name: t.base_dir for t in external_tensors(model) if t.base_dir})
    return copy


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def model_nbytes(model: ir.Model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def external_data_threshold() -> int:
    """Bytes of tensor data above which outputs get external data (``BQ_ONNX_EXTERNAL_DATA_THRESHOLD``
    overrides it, so tests can exercise the large-model path on small models)."""
    value = os.environ.get("BQ_ONNX_EXTERNAL_DATA_THRESHOLD")
    try:
        return int(value) if value else EXTERNAL_DATA_THRESHOLD
    except ValueError:
        return EXTERNAL_DATA_THRESHOLD


def external_data_name(path: str | os.PathLike) -> str:
    """The external data file of an output: ``<output name>.data`` beside it (a plain relative name)."""
    return f"{Path(path).name}.data"


def save_model(model: ir.Model, path: str | os.PathLike, external_threshold: int | None = None) -> None:
    """Write a working copy (sessions, references, tests): temp file in the destination folder, then rename;
    large models get external data. Outputs the user named go through :func:`write_output` instead.

    A model over ``external_threshold`` bytes (default :func:`external_data_threshold`), or one that still
    references external data, is written with its tensors in ``<name>.data`` beside it. Both files are first
    written complete inside a temporary folder in the destination folder, then renamed into place, data first:
    a model file never points at partial data, and a failure while writing leaves neither file (nor a previous
    output's data) changed.
    """
    out = Path(path)
    try:
        _save(model, out, external_data_threshold() if external_threshold is None else external_threshold)
    except OSError as exc:  # disk full, no permission, ...: a documented output error, not a bug
        raise OutputError(f"{out}: cannot write the output ({exc.strerror or _first_line(exc)})") from None


def _save(model: ir.Model, out: Path, threshold: int) -> None:
    # a tensor still in the input's data file is copied into the output's own: a relative reference would
    # point at nothing (another folder) or at the input's file (the same folder)
    if model_nbytes(model) > threshold or any(True for _ in external_tensors(model)):
        _save_external(model, out)
        memtrace(f"saved {out.name} (external data)")
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        ir.save(model, tmp)
        os.replace(tmp, out)
        memtrace(f"saved {out.name}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _save_external(model: ir.Model, out: Path) -> None:
    data_name = external_data_name(out)
    data = out.parent / data_name
    if data.is_symlink() or (data.exists() and not data.is_file()):
        raise OutputError(f"{data}: exists and is not a regular file; remove it or choose another output")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        # page-aligned offsets: runtimes can memory-map the tensors
        ir.save(model, staging / out.name, external_data=data_name, alignment=65536)
        os.replace(staging / data_name, data)
        os.replace(staging / out.name, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_output(model: ir.Model, out: Path, protected, force: bool, verify=None,
                 external_threshold: int | None = None):
    """Write ``model`` to ``out`` by the write protocol (:mod:`bq_onnx.writing`): staged beside ``out``,
    ``verify(staged_path)`` (when given) on the staged files, then renamed into place; returns what ``verify``
    returned. Nothing at ``out`` (or its data file) changes unless every step passed."""
    from bq_onnx import writing

    threshold = external_data_threshold() if external_threshold is None else external_threshold
    try:
        writing.clean_stale(out.parent, out.name)
        with writing.staging(out.parent) as folder:
            staged = folder / out.name
            data = _stage(model, staged, threshold)
            drop_pages()  # what writing read of a candidate waiting on disk (bq_onnx.idle)
            writing.fault("staged")
            result = None
            if verify is not None:
                writing.fault("verifying")
                result = verify(staged)
            writing.commit(staged, out, protected, force, data)
            memtrace(f"saved {out.name}")
            return result
    except OSError as exc:  # disk full, no permission, ...: a documented output error, not a bug
        raise OutputError(f"{out}: cannot write the output ({exc.strerror or _first_line(exc)})") from None


def _stage(model: ir.Model, staged: Path, threshold: int) -> Path | None:
    """Write ``model`` at ``staged``; a big one (or one still referencing external data) with its tensors in
    ``<name>.<hash>.data`` beside it. Returns that data file, or None."""
    from bq_onnx import writing

    if not (model_nbytes(model) > threshold or any(True for _ in external_tensors(model))):
        ir.save(model, staged)
        return None
    placeholder = external_data_name(staged)
    # page-aligned offsets: runtimes can memory-map the tensors
    ir.save(model, staged, external_data=placeholder, alignment=65536)
    name = writing.hashed_data_name(staged.name, staged.parent / placeholder)
    os.rename(staged.parent / placeholder, staged.parent / name)
    proto = onnx.load(os.fspath(staged), load_external_data=False)
    for tensor in graph_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == placeholder:
                entry.value = name
    with open(staged, "wb") as f:
        f.write(proto.SerializeToString())
    return staged.parent / name
