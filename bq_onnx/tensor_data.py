"""What a tensor of an untrusted model declares, checked against the data really present, and external data
read without memory maps.

Every size is an exact integer (:mod:`bq_onnx.budgets`): numpy's int64 product of ``[4, 2^62 + 1]`` is 4, so a
check made with it passes a tensor that asks for 2^64 elements. Inline data must hold exactly the declared
elements, external data keys are parsed strictly (ASCII decimal offsets and lengths; ``' 0 '`` and Arabic-Indic
digits are refused, though Python's ``int`` takes them), and external data is read with ``pread``-style reads into
a fresh array: a file truncated or replaced while the tool runs is a one-line error (exit 3), never the SIGBUS a
memory map gives when its pages vanish.

The checks are standard library and protobuf only (numpy is imported by :func:`read_external` alone): the one
validation of a model (:mod:`bq_onnx.model_checks`) uses them on inspect's fast path too.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bq_onnx.budgets import nbytes, require
from bq_onnx.errors import ModelError
from bq_onnx.onnx_proto import data_type_bits, pb

if TYPE_CHECKING:
    import numpy as np

_bits = functools.cache(data_type_bits)  # one table for every tensor of a model

_DECIMAL = re.compile(r"[0-9]{1,19}", re.ASCII)
#: bytes read per ``readinto`` call (bounded, so a tensor's read never needs a second buffer)
CHUNK = 64 << 20


@functools.cache
def _typed_fields() -> dict[int, tuple[str, int]]:
    """TensorProto data type -> (the repeated field that holds it inline, entries per element)."""
    t = pb().TensorProto
    by_name = {
        "FLOAT": ("float_data", 1), "COMPLEX64": ("float_data", 2), "DOUBLE": ("double_data", 1),
        "COMPLEX128": ("double_data", 2), "INT64": ("int64_data", 1), "UINT32": ("uint64_data", 1),
        "UINT64": ("uint64_data", 1), "STRING": ("string_data", 1),
    }
    known = dict(t.DataType.items())
    out = {known[n]: v for n, v in by_name.items() if n in known}
    for name, code in known.items():
        if name not in by_name and name != "UNDEFINED":
            out.setdefault(code, ("int32_data", 1))  # every narrower type is stored one per int32 entry
    return out


def declared_nbytes(tensor: Any, where: str) -> int | None:
    """Bytes the declared dims need (sub-byte types packed), an exact integer; None for strings. A negative
    dimension, or a size beyond what a C size can count, is a :class:`ModelError`."""
    name = tensor.name or "<unnamed>"
    if any(d < 0 for d in tensor.dims):
        raise ModelError(f"{where}: tensor '{name}' has a negative dimension {list(tensor.dims)}")
    if tensor.data_type == pb().TensorProto.STRING:
        return None
    bits = _bits().get(tensor.data_type)
    if bits is None:
        raise ModelError(f"{where}: tensor '{name}' has an unknown data type {tensor.data_type}")
    size = nbytes(tensor.dims, bits)
    if size is None:
        raise ModelError(f"{where}: tensor '{name}' declares shape {list(tensor.dims)}: more elements than a C size "
                         f"can count")
    return size


def check_inline(tensor: Any, expected: int | None, where: str) -> None:
    """Inline data holds exactly what the dims declare: ``raw_data`` bytes, or the elements of the typed field."""
    name = tensor.name or "<unnamed>"
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise ModelError(f"{where}: tensor '{name}' declares shape {list(tensor.dims)} ({expected} bytes) but "
                             f"holds {len(tensor.raw_data)} bytes")
        return
    field, per = _typed_fields().get(tensor.data_type, ("int32_data", 1))
    held = len(getattr(tensor, field))
    bits = _bits().get(tensor.data_type, 8)
    packed = {-(-numel * bits // 8), -(-numel * bits // 32)} if bits < 8 else set()  # sub-byte types: packed
    if held != numel * per and held not in packed:
        raise ModelError(f"{where}: tensor '{name}' declares shape {list(tensor.dims)} ({numel * per} values) but "
                         f"holds {held}")


def external_keys(tensor: Any, where: str) -> tuple[str, int, int | None]:
    """``(location, offset, length)`` of an external tensor, parsed strictly: a location without NUL or other
    control characters, offset and length ASCII decimal digits only."""
    name = tensor.name or "<unnamed>"
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in info:
            raise ModelError(f"{where}: tensor '{name}' gives external data key '{_printable(entry.key)}' twice")
        info[entry.key] = entry.value
    location = info.get("location", "")
    if any(ord(c) < 32 or ord(c) == 127 for c in location):
        raise ModelError(f"{where}: tensor '{name}' external data location '{_printable(location)}' holds a "
                         f"control character (NUL?)")
    values = []
    for key in ("offset", "length"):
        text = info.get(key)
        if text is None:
            values.append(None)
        elif not _DECIMAL.fullmatch(text):
            raise ModelError(f"{where}: tensor '{name}' has a malformed external data {key} '{_printable(text)}' "
                             f"(ASCII decimal digits only)")
        else:
            values.append(int(text))
    return location, values[0] or 0, values[1]


def check_data_file(path: Path, name: str, location: str, where: str) -> os.stat_result:
    """The data file is a regular file with one link (a hard link may bring in a file from outside the model's
    folder that no path check can see)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):
        raise ModelError(f"{where}: tensor '{name}' external data file '{_printable(location)}' is missing") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(f"{where}: tensor '{name}' external data '{_printable(location)}' is not a regular file")
    if st.st_nlink > 1:
        raise ModelError(f"{where}: tensor '{name}' external data '{_printable(location)}' has {st.st_nlink} hard "
                         f"links (it may be a file from outside the model's folder); copy it instead of linking")
    return st


def read_external(path: str | os.PathLike, offset: int, count: int, name: str) -> np.ndarray:
    """``count`` bytes of ``path`` from ``offset`` in a fresh uint8 array (read, never mapped); a file shorter
    than that now (truncated or replaced since it was checked) is a one-line :class:`ModelError`."""
    import numpy as np  # here: the checks above serve inspect's fast start, which has no numpy

    require(count, f"tensor '{name}'", ModelError)
    out = np.empty(count, dtype=np.uint8)
    view = memoryview(out)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the external data of tensor '{name}' ({exc.strerror})") from None
    try:
        done = 0
        while done < count:
            got = os.preadv(fd, [view[done:done + CHUNK]], offset + done)
            if got <= 0:
                raise ModelError(f"{path}: external data of tensor '{name}' ends after {offset + done} bytes, "
                                 f"{offset + count} needed (the file changed while in use?)")
            done += got
    except OSError as exc:
        raise ModelError(f"{path}: cannot read the external data of tensor '{name}' ({exc.strerror})") from None
    finally:
        os.close(fd)
    return out


def _printable(text: str) -> str:
    """``text`` with control characters shown as escapes (a name is data, never terminal control)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)[:200]
