"""Reading ``.npy`` and ``.npz`` files from strangers: every array's size is known, checked and budgeted before
a byte of it is allocated.

An ``.npy`` header is a claim (``[2^40, 64]`` over 256 bytes); a zip member's declared size is another (a 28 MB
``.npz`` of zeros inflates to 6 GiB). Here each header is read first, its size computed exactly
(:func:`bq_onnx.budgets.nbytes`), compared with the bytes the file (or the zip member's declared size) really
holds, and the total of a source compared with the memory budget: only then are arrays read. Anything but a
regular file (a FIFO, ``/dev/zero``), an ``.npy`` named ``.npz``, a pickled array or a truncated file is a
one-line :class:`DataError` (exit 5).
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import IO

import numpy as np

from bq_onnx.budgets import human, nbytes, require
from bq_onnx.errors import DataError

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGIC = b"PK"


class Tally:
    """The bytes a source's arrays will take, added up as headers are read and held against the budget."""

    def __init__(self, where: str) -> None:
        self.where, self.total = where, 0

    def add(self, size: int) -> None:
        self.total += size
        require(self.total, f"{self.where}: the arrays", DataError)


def check_regular(path: Path, what: str = "data") -> None:
    """``path`` is a regular file: never open a FIFO (blocks), a device (``/dev/zero`` never ends) or a socket."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read {what} ({getattr(exc, 'strerror', None) or exc})") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: {what} must be a regular file (this is a {_kind(mode)})")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder")):
        if test(mode):
            return name
    return "special file"


def _header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes of data) from an ``.npy`` header at ``f``'s position; checked."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f, max_header_size=10000)
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f, max_header_size=10000)
        else:
            raise ValueError(f"unknown .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError, TypeError, zipfile.BadZipFile) as exc:
        raise DataError(f"{where}: not a valid .npy array ({_line(exc)})") from None
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (a pickle); give numeric arrays")
    size = nbytes(shape, dtype.itemsize * 8)
    if size is None:
        raise DataError(f"{where}: declares shape {list(shape)}: more elements than a C size can count")
    return tuple(shape), dtype, size


def read_npy(path: Path, tally: Tally | None = None) -> np.ndarray:
    """One ``.npy`` file, its header checked against the file's size and the budget before the data is read."""
    check_regular(path)
    with open(path, "rb") as f:
        shape, dtype, size = _header(f, str(path))
        held = os.fstat(f.fileno()).st_size - f.tell()
        if held != size:
            raise DataError(f"{path}: declares shape {list(shape)} {dtype} ({human(size)}) but holds {held} bytes")
        (tally or Tally(str(path))).add(size)
        f.seek(0)  # read_array reads the header again
        try:
            return np.lib.format.read_array(f, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # changed under us
            raise DataError(f"{path}: cannot read ({_line(exc)})") from None


def read_npz(path: Path, tally: Tally | None = None) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` by key; each member's header checked against the size the zip declares for it
    and the total against the budget before anything is inflated."""
    check_regular(path)
    tally = tally or Tally(str(path))
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == NPY_MAGIC:
        raise DataError(f"{path}: an .npy array named .npz; give an .npz keyed by input name (np.savez) or a "
                        f"folder of <input name>.npy files")
    if not magic.startswith(ZIP_MAGIC):
        raise DataError(f"{path}: cannot read calibration data (not an .npz archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            members = {}
            for info in zf.infolist():
                if info.is_dir():
                    continue
                key = info.filename.removesuffix(".npy")
                if key in members:
                    raise DataError(f"{path}: array '{key}' appears twice")
                where = f"{path}: array '{key}'"
                with zf.open(info) as member:
                    shape, dtype, size = _header(member, where)
                    header = member.tell()
                if header + size != info.file_size:
                    raise DataError(f"{where} declares shape {list(shape)} {dtype} ({human(size)}) but its zip member "
                                    f"holds {max(info.file_size - header, 0)} bytes")
                tally.add(size)
                members[key] = info
            out = {}
            for key, info in members.items():
                with zf.open(info) as member:
                    out[key] = np.lib.format.read_array(member, allow_pickle=False)
            return out
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as exc:
        raise DataError(f"{path}: cannot read calibration data ({_line(exc)})") from None


def _line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]
