"""Big arrays of an idle candidate moved to disk: written to an unlinked temporary file and mapped back read-only.

Why (issue 21): the guard keeps every candidate it measured (the allocation, uniform, the repairs) until it knows
which one to write, and each held its codes (a byte per weight) and its rewritten model (the codes again, unpacked
in the IR, and their scales) while the next one was quantized and its weight decoded whole for the measuring
session: at 2 GiB of weights the guard's peak, over the streaming bound. A mapped file's pages are read back only
where an array is used again (the candidate chosen is written and verified), and are the kernel's to drop while it
is idle; the values are the same, so the output is byte for byte the same. The file is unlinked at once: it lives
as long as its mapping, and nothing is left behind, however the process ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

import numpy as np
import onnx_ir as ir

from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor

#: Arrays of at least this many bytes are moved to disk (smaller ones cost more in files than they free).
IDLE_BYTES = 16 << 20

_FIELDS = ("codes", "scale", "zero_point", "offset", "scale_code", "outlier_index", "outlier_value")


def on_disk(array: np.ndarray) -> np.ndarray:
    """``array`` (at least :data:`IDLE_BYTES`) as a read-only mapping of an unlinked temporary file with its
    values; ``array`` itself where it is smaller, already mapped, or the file cannot be written (a full disk
    costs memory, not the run)."""
    if not isinstance(array, np.ndarray) or isinstance(array, np.memmap) or array.nbytes < IDLE_BYTES \
            or array.dtype.hasobject:
        return array
    try:
        fd, path = tempfile.mkstemp(prefix="bq-idle-")
    except OSError:
        return array
    try:
        with os.fdopen(fd, "wb") as f:
            np.ascontiguousarray(array).tofile(f)
        mapped = np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)
    except (OSError, ValueError):
        return array
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
    return mapped


def quantized_on_disk(qt: QuantizedTensor | QuantizedPieces) -> QuantizedTensor | QuantizedPieces:
    """The same quantized tensor with its big arrays on disk (:func:`on_disk`)."""
    if isinstance(qt, QuantizedPieces):
        return dataclasses.replace(qt, pieces=tuple((a, b, quantized_on_disk(p)) for a, b, p in qt.pieces))
    moved = {f: on_disk(getattr(qt, f)) for f in _FIELDS if getattr(qt, f) is not None}
    changed = {f: v for f, v in moved.items() if v is not getattr(qt, f)}
    return dataclasses.replace(qt, **changed) if changed else qt


def model_on_disk(model: ir.Model) -> None:
    """Every in-memory initializer of ``model`` (all graphs) of at least :data:`IDLE_BYTES` moved to disk, in
    place: the same tensor (type, shape, name, values) over a mapped file."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if type(tensor) is not ir.Tensor or not isinstance(tensor.raw, np.ndarray):
                continue
            mapped = on_disk(tensor.raw)
            if mapped is not tensor.raw:
                value.const_value = ir.Tensor(mapped, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name,
                                              doc_string=tensor.doc_string,
                                              metadata_props=dict(tensor.metadata_props) or None)
