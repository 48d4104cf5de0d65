"""The one validation of an untrusted model file, for every command that reads one.

``optimize``, ``validate`` and the IR path (:func:`bq_onnx.model_io.load_model`) and ``inspect``'s fast path
(:func:`read_checked_model`) all call :func:`check_model`, so a file is refused by each of them
with the same line and the same exit code: sparse tensors (exit 4), then every tensor's declared size (an exact
integer within the memory budget, :mod:`bq_onnx.budgets`) against its data, inline or external (inside the
model's folder, no symbolic or hard link, strictly parsed keys, a regular file long enough:
:mod:`bq_onnx.tensor_data`), then onnx's C++ checker on the structure with empty stand-ins for external tensors
(so their data is never read). Exit 3 for all but sparse tensors. ``inspect`` lets one checker complaint
through with a warning, an op domain used without its opset import (NNCF's MatMulNBits), so that another tool's
output is still counted (:func:`bq_onnx.inspect._read_for_counting`).

Standard library and protobuf only (the checker is onnx's C++ extension, loaded without the onnx package by
:mod:`bq_onnx.onnx_proto`): ``bq-onnx inspect`` starts without numpy, onnx or onnx-ir.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bq_onnx.budgets import require
from bq_onnx.errors import ModelError, UnsupportedError
from bq_onnx.onnx_proto import _checker, graph_tensors, pb, read_with_bytes
from bq_onnx.tensor_data import check_data_file, check_inline, declared_nbytes, external_keys


def check_model(proto: Any, where: str, base_dir: Path | None, *, check_graph: bool = True,
                data: bytes | None = None) -> None:
    """Every check a model must pass before anything is built from it (a one-line error on the first problem).

    ``where`` starts each message (the path, or ``<ModelProto>``); ``base_dir`` is the folder external data is
    read from (None for an in-memory model: external data is then refused); ``check_graph=False`` skips onnx's
    checker (``bq-onnx validate`` reports what a target cannot read itself); ``data``: the file's bytes, when
    read already (the checker then needs no re-serialization)."""
    refuse_sparse(proto, where)
    external = validate_tensors(proto, base_dir, where)
    if check_graph:
        check_structure(proto, where, None if external else data)


def read_checked_model(path: str | os.PathLike) -> Any:
    """The ``ModelProto`` of a file (external data not read) after :func:`check_model` (the checker reads the
    bytes already read: no re-serializing)."""
    model, data = read_with_bytes(path)
    check_model(model, str(Path(path)), Path(path).resolve().parent, data=data)
    return model


def refuse_sparse(proto: Any, where: str) -> None:
    """Sparse tensors (``sparse_initializer``, a Constant's ``sparse_value``) are not read by the IR: refuse them
    in one line (exit 4) instead of losing them."""
    attribute = pb().AttributeProto
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        if graph.sparse_initializer:
            name = graph.sparse_initializer[0].values.name or "<unnamed>"
            raise UnsupportedError(f"{where}: sparse initializer '{name}' is not supported; store it dense "
                                   f"(onnx.numpy_helper) and run again")
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == attribute.SPARSE_TENSOR or attr.sparse_tensors:
                    raise UnsupportedError(f"{where}: node '{node.name or node.op_type}' holds a sparse tensor "
                                           f"(attribute '{attr.name}'); not supported: store it dense")
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)


def validate_tensors(proto: Any, base_dir: Path | None, where: str) -> bool:
    """Every tensor's declared size is an exact integer within the memory budget (one tensor is materialized at
    a time) and matches the data present: inline, or in an external file checked by :func:`validate_external`.
    Returns whether any tensor is external."""
    location = pb().TensorProto.EXTERNAL
    external = False
    for tensor in graph_tensors(proto.graph):
        name = tensor.name or "<unnamed>"
        expected = declared_nbytes(tensor, where)
        if expected is not None:
            require(expected, f"{where}: tensor '{name}' (shape {list(tensor.dims)})", ModelError)
        if tensor.data_location == location:
            external = True
            validate_external(tensor, name, expected, base_dir, where)
        else:
            check_inline(tensor, expected, where)
    return external


def validate_external(tensor: Any, name: str, expected: int | None, base_dir: Path | None, where: str) -> None:
    """One external tensor's reference: inside the model's folder, no link, a regular file holding its bytes."""
    location, offset, length = external_keys(tensor, where)
    if base_dir is None:
        raise ModelError(f"{where}: tensor '{name}' uses external data; load the model from its file path")
    if not location:
        raise ModelError(f"{where}: tensor '{name}' has external data without a location")
    if expected is None:
        raise ModelError(f"{where}: tensor '{name}' is a string tensor with external data (not supported)")
    rel = Path(location)
    if rel.is_absolute() or ".." in rel.parts or location.startswith(("/", "\\")) or ":" in location:
        raise ModelError(f"{where}: tensor '{name}' external data path '{location}' escapes the model's folder")
    candidate = base_dir / rel
    if candidate.is_symlink() or any(p.is_symlink() for p in candidate.parents if base_dir in p.parents):
        raise ModelError(f"{where}: tensor '{name}' external data path '{location}' is a symbolic link")
    try:
        resolved = candidate.resolve(strict=True)
    except (OSError, RuntimeError):
        raise ModelError(f"{where}: tensor '{name}' external data file '{location}' is missing") from None
    if base_dir not in resolved.parents:
        raise ModelError(f"{where}: tensor '{name}' external data path '{location}' escapes the model's folder")
    size = check_data_file(resolved, name, location, where).st_size
    if length is not None and length != expected:
        raise ModelError(f"{where}: tensor '{name}' declares {expected} bytes but its external data length is "
                         f"{length}")
    need = length if length is not None else expected
    if offset + need > size:
        raise ModelError(f"{where}: tensor '{name}' external data '{location}' is shorter than declared "
                         f"(needs {offset + need} bytes, file has {size})")


def check_structure(proto: Any, where: str, data: bytes | None = None) -> None:
    """onnx's checker on the structure (not full: no shape inference). External tensors were validated by
    :func:`validate_tensors`; the checker gets empty stand-ins, so it never reads them and a model over 2 GB is
    checked in memory without its data. ``data``: the serialized ``proto``, when at hand."""
    if not proto.opset_import:
        raise ModelError(f"{where}: invalid model (no opset_import)")
    tensor_proto = pb().TensorProto
    if any(t.data_location == tensor_proto.EXTERNAL for t in graph_tensors(proto.graph)):
        stripped = pb().ModelProto()
        stripped.CopyFrom(proto)
        for tensor in graph_tensors(stripped.graph):
            if tensor.data_location == tensor_proto.EXTERNAL:
                del tensor.external_data[:]
                tensor.data_location = tensor_proto.DEFAULT
                del tensor.dims[:]
                tensor.dims.append(0)  # an empty stand-in: the structure check needs no data
        data = stripped.SerializeToString()
    elif data is None:
        data = proto.SerializeToString()
    checker = _checker().checker
    try:
        checker.check_model(data, False, False, False)  # onnx.checker.check_model(full_check=False)'s call
    except checker.ValidationError as exc:
        raise ModelError(f"{where}: invalid model ({' '.join(str(exc).split())[:300]})") from None
    except Exception as exc:  # noqa: BLE001  the checker raises assorted C++ errors
        raise ModelError(f"{where}: invalid model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]

