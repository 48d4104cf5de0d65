"""An idle candidate's arrays moved to disk: written to one unlinked temporary file and mapped back read-only.

Why (issue 21): the guard keeps every candidate it measured (the allocation, uniform, the repairs) until it knows
which one to write, and each held its codes (a byte per weight, in one array per piece of columns) and its
rewritten model (the codes again, unpacked in the IR, and their scales) while the next one was quantized and its
weight decoded whole for the measuring session: at 2 GiB of weights the guard's peak, over the streaming bound. A
mapped file's pages are read back only where an array is used again (the candidate chosen is written and
verified), and are the kernel's to drop while it is idle; the values are the same, so the output is byte for byte
the same. The file has no name: it lives as long as its mapping, and nothing is left behind, however the process
ends. Where it cannot be written (a full disk), the arrays stay in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import mmap
import tempfile
import weakref

import numpy as np
import onnx_ir as ir

from bq_onnx.pages import is_mapped
from bq_onnx.progress import release_freed_memory
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor

#: A candidate whose arrays (those of at least :data:`MIN_ARRAY_BYTES`) come to less than this stays in memory.
IDLE_BYTES = 16 << 20
#: Arrays smaller than this stay in memory. Why so small: a big weight's codes are cut into pieces of columns (a
#: few KiB to a few tens of KiB each, thousands per candidate), which at 64 KiB stayed in memory with every
#: candidate the guard keeps (issue 21; the 0.25 GiB scale model's peak did not measurably change: 1.08 GiB).
MIN_ARRAY_BYTES = 4 << 10

_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()  # every live mapping :func:`to_disk` made

_FIELDS = ("codes", "scale", "zero_point", "offset", "scale_code", "outlier_index", "outlier_value")
_ALIGN = 64  # each array's offset in the file: a multiple of every item size, and small arrays share pages


def to_disk(quantized: dict[str, QuantizedTensor | QuantizedPieces], model: ir.Model) -> None:
    """The big arrays of ``quantized`` (its values replaced, in place) and of ``model``'s in-memory initializers
    (all graphs; the same tensors over the mapped file, in place) moved to disk together, and the heap they held
    handed back once nothing refers to them: the pieces' codes are small arrays of the heap, freed there, not to
    the system. Why after :func:`_move` returns: its loops' variables held the last weight's arrays (a single big
    weight's every piece) until then, so a release inside it handed back nothing, and the candidate's decode for
    its measuring session stacked on top of that freed heap (issue 21: 0.6x the weight at 1 GiB)."""
    _move(quantized, model)
    release_freed_memory()


def arrays_to_disk(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with the big ones (:data:`MIN_ARRAY_BYTES` each, :data:`IDLE_BYTES` together) replaced by read-only
    views of one mapped temporary file, the same values; the caller drops the originals. Why: GPTQ's input moments
    (a ``(K, K)`` float64 array per weight, 512 MiB at K = 8192) are read when a weight's metric is built and kept
    all run for the next spend; in memory they were 1.1 GiB of the 0.25 GiB scale model's 4.2 GiB with ``--calib``.
    Where the file cannot be written they stay in memory."""
    found: dict[int, np.ndarray] = {}
    for array in arrays.values():
        _take(found, array)
    mapped = _mapped_if_big(found)
    return {name: mapped.get(id(array), array) for name, array in arrays.items()} if mapped else arrays


def kept_on_disk(array: np.ndarray) -> np.ndarray:
    """``array`` as a read-only view of a mapped temporary file (the same values), unless it is one already, is
    under :data:`IDLE_BYTES` or the file cannot be written. Why: a GPTQ metric kept for the next spends holds the
    importance it was built with, a float64 ``(K, N)`` array computed in memory and read-only (so
    :func:`arrays_to_disk` leaves it); kept, the 1 GiB scale model's metrics held about 1 GiB through the guard."""
    if is_mapped(array) or array.nbytes < IDLE_BYTES or array.dtype.hasobject:
        return array
    return _mapped([array]).get(id(array), array)


def design_to_disk(qt: QuantizedTensor) -> QuantizedTensor:
    """``qt`` with its big arrays as read-only views of a mapped temporary file (the same values), or ``qt`` where
    they are small or the file cannot be written. Why: the design cache (:mod:`bq_onnx.quantizers.cache`) keeps up
    to 256 MiB of designs for the next spend of the budget; in memory they were resident all run (issue 21)."""
    found: dict[int, np.ndarray] = {}
    for f in _FIELDS:
        _take(found, getattr(qt, f))
    mapped = _mapped_if_big(found)
    return _moved(qt, mapped) if mapped else qt


def _move(quantized: dict[str, QuantizedTensor | QuantizedPieces], model: ir.Model) -> None:
    found: dict[int, np.ndarray] = {}
    for qt in quantized.values():
        for part in (p for _, _, p in qt.pieces) if isinstance(qt, QuantizedPieces) else (qt,):
            for f in _FIELDS:
                _take(found, getattr(part, f))
    tensors = [v for g in model.graphs() for v in g.initializers.values()
               if type(v.const_value) is ir.Tensor and isinstance(v.const_value.raw, np.ndarray)]
    for value in tensors:
        _take(found, value.const_value.raw)
    mapped = _mapped_if_big(found)
    if not mapped:
        return
    for name, qt in quantized.items():
        quantized[name] = _moved(qt, mapped)
    for value in tensors:
        tensor = value.const_value
        view = mapped.get(id(tensor.raw))
        if view is not None:
            value.const_value = ir.Tensor(view, dtype=tensor.dtype, shape=tensor.shape, name=tensor.name,
                                          doc_string=tensor.doc_string,
                                          metadata_props=dict(tensor.metadata_props) or None)


def _take(found: dict[int, np.ndarray], array) -> None:
    if isinstance(array, np.ndarray) and array.nbytes >= MIN_ARRAY_BYTES and not array.dtype.hasobject \
            and array.flags.writeable:  # a read-only array may be mapped already, or shared
        found[id(array)] = array


def _mapped_if_big(found: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """:func:`_mapped` of ``found`` where they come to :data:`IDLE_BYTES` or more; else empty (they stay)."""
    if sum(a.nbytes for a in found.values()) < IDLE_BYTES:
        return {}
    return _mapped(list(found.values()))


def _mapped(arrays: list[np.ndarray]) -> dict[int, np.ndarray]:
    """Read-only views of one mapped file holding ``arrays`` (by the arrays' ids); empty where it cannot be
    written."""
    places = []
    try:
        with tempfile.TemporaryFile(prefix="bq-idle-") as f:
            for array in arrays:
                f.write(b"\0" * (-f.tell() % _ALIGN))
                places.append(f.tell())
                np.ascontiguousarray(array).tofile(f)
            f.flush()
            whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return {}
    _MAPPINGS.add(whole)
    return {id(a): np.frombuffer(whole, dtype=a.dtype, count=a.size, offset=at).reshape(a.shape)
            for a, at in zip(arrays, places)}


def _moved(qt: QuantizedTensor | QuantizedPieces, mapped: dict[int, np.ndarray]):
    if isinstance(qt, QuantizedPieces):
        return dataclasses.replace(qt, pieces=tuple((a, b, _moved(p, mapped)) for a, b, p in qt.pieces))
    changed = {f: mapped[id(getattr(qt, f))] for f in _FIELDS if id(getattr(qt, f)) in mapped}
    return dataclasses.replace(qt, **changed) if changed else qt


def drop_pages() -> None:
    """Unmap the pages read so far of every idle candidate's file from this process (``MADV_DONTNEED``; they
    stay in the page cache, and a later read maps them again): a mapped page a step read (a candidate decoded,
    the output written) is resident memory of this process until then, as much as the arrays it replaced."""
    for whole in list(_MAPPINGS):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            whole.madvise(mmap.MADV_DONTNEED)
