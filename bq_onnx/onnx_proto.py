"""onnx's protobuf classes without the onnx package, for commands that only read a model's structure.

``import onnx`` (and so ``import onnx.onnx_ml_pb2``: the package's ``__init__`` runs first) imports numpy,
ml_dtypes and the C++ checker, about a second, most of what ``bq-onnx inspect`` used to spend before reading a
byte. The generated module itself needs only protobuf: :func:`pb` loads the installed onnx's ``onnx_ml_pb2.py``
under its own name, so a later ``import onnx`` finds it in ``sys.modules`` and uses the same classes
(``onnx.ModelProto is pb().ModelProto``; one registration in protobuf's descriptor pool).

Standard library and protobuf only: no numpy, no onnx package, no onnx-ir.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from bq_onnx.errors import ModelError

_MODULE = "onnx.onnx_ml_pb2"

METADATA_KEY = "bq_onnx"
"""The model metadata entry bq-onnx writes its per-layer record under (:mod:`bq_onnx.decode.rewrite`)."""

# Stored bits per element of each TensorProto.DataType, by name: sub-byte types packed (int4 two per byte, int2
# four), every other type at its numpy item size (what onnx.helper.tensor_dtype_to_np_dtype gives; a test checks
# the two agree). STRING has no fixed width, UNDEFINED none at all.
_BITS_BY_NAME = {
    "FLOAT": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
    "FLOAT16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128, "BFLOAT16": 16,
    "FLOAT8E4M3FN": 8, "FLOAT8E4M3FNUZ": 8, "FLOAT8E5M2": 8, "FLOAT8E5M2FNUZ": 8, "FLOAT8E8M0": 8,
    "UINT4": 4, "INT4": 4, "FLOAT4E2M1": 4, "UINT2": 2, "INT2": 2, "FLOAT6E2M3": 8, "FLOAT6E3M2": 8,
}


def pb() -> ModuleType:
    """The generated protobuf module of the installed onnx (``onnx.onnx_ml_pb2``), imported without ``onnx``."""
    module = sys.modules.get(_MODULE)
    if module is not None:
        return module
    if "onnx" in sys.modules:  # the package is here anyway: import the module the ordinary way
        return importlib.import_module(_MODULE)
    spec = importlib.util.find_spec("onnx")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("onnx is not installed")
    source = os.path.join(next(iter(spec.submodule_search_locations)), "onnx_ml_pb2.py")
    spec = importlib.util.spec_from_file_location(_MODULE, source)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"cannot load {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_MODULE]
        raise
    return module


def data_type_bits() -> dict[int, int]:
    """TensorProto data type -> stored bits per element (types this protobuf version knows)."""
    known = dict(pb().TensorProto.DataType.items())
    return {known[name]: bits for name, bits in _BITS_BY_NAME.items() if name in known}


def read_model(path: str | os.PathLike) -> Any:
    """The ``ModelProto`` of a file (external data not read), or a one-line :class:`ModelError`."""
    return read_with_bytes(path)[0]


def read_with_bytes(path: str | os.PathLike) -> tuple[Any, bytes]:
    """:func:`read_model` and the file's bytes."""
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: no such file")
    if not path.is_file():
        raise ModelError(f"{path}: not a regular file")
    proto = pb().ModelProto()
    data = path.read_bytes()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError, OSError, UnicodeDecodeError) as exc:
        text = str(exc).strip() or type(exc).__name__
        raise ModelError(f"{path}: not a valid ONNX model (protobuf parse failed: {text.splitlines()[0][:300]})"
                         ) from None
    if not proto.HasField("graph"):
        raise ModelError(f"{path}: not a valid ONNX model (no graph; empty or truncated file?)")
    return proto, data


def iter_graphs(graph: Any) -> Iterator[Any]:
    """``graph`` (a ``GraphProto``) and every subgraph of its nodes' attributes, at any depth."""
    attr = pb().AttributeProto
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == attr.GRAPH:
                yield from iter_graphs(a.g)
            elif a.type == attr.GRAPHS:
                for g in a.graphs:
                    yield from iter_graphs(g)


def graph_tensors(graph: Any) -> Iterator[Any]:
    """Every ``TensorProto`` a graph and its subgraphs hold: initializers, sparse values and indices, tensor
    attributes (``Constant`` values included)."""
    attribute = pb().AttributeProto
    for g in iter_graphs(graph):
        yield from g.initializer
        for sparse in g.sparse_initializer:
            yield sparse.values
            yield sparse.indices
        for node in g.node:
            for attr in node.attribute:
                if attr.type == attribute.TENSOR:
                    yield attr.t
                elif attr.type == attribute.TENSORS:
                    yield from attr.tensors


def tensor_bytes(t: Any, bits: dict[int, int] | None = None) -> int:
    """Stored bytes of a ``TensorProto`` from its type and shape (sub-byte types packed; strings: their bytes)."""
    if t.data_type == pb().TensorProto.STRING:
        return sum(len(s) for s in t.string_data)
    width = (bits or data_type_bits()).get(t.data_type)
    if width is None:
        raise ValueError(f"tensor '{t.name}': no stored width for data type {t.data_type}")
    return -(-math.prod(t.dims) * width // 8)


def has_external_data(model: Any) -> bool:
    """Whether any tensor of the model (any graph, any node attribute) keeps its data in another file."""
    external = pb().TensorProto.EXTERNAL
    attr = pb().AttributeProto
    for g in iter_graphs(model.graph):
        if any(t.data_location == external for t in g.initializer):
            return True
        for node in g.node:
            for a in node.attribute:
                if (a.type == attr.TENSOR and a.t.data_location == external) or \
                        (a.type == attr.TENSORS and any(t.data_location == external for t in a.tensors)):
                    return True
    return False


def _checker() -> ModuleType:
    """onnx's C++ checker (``onnx.onnx_cpp2py_export``), loaded like :func:`pb` without the onnx package."""
    name = "onnx.onnx_cpp2py_export"
    module = sys.modules.get(name)
    if module is not None:
        return module
    if "onnx" in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec("onnx")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("onnx is not installed")
    folder = next(iter(spec.submodule_search_locations))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        source = os.path.join(folder, "onnx_cpp2py_export" + suffix)
        if os.path.exists(source):
            break
    else:
        raise ModuleNotFoundError(f"no onnx_cpp2py_export extension in {folder}")
    loader = importlib.machinery.ExtensionFileLoader(name, source)
    ext_spec = importlib.util.spec_from_file_location(name, source, loader=loader)
    assert ext_spec is not None
    module = importlib.util.module_from_spec(ext_spec)
    sys.modules[name] = module
    try:
        loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
