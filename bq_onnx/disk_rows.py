"""An array kept in an unlinked temporary file and read or written a band of rows at a time.

Why (issue 21): GPTQ's input moment ``A`` and the factor ``U`` of its metric are ``K x K`` float64 (512 MiB each at
K = 8192) whatever the weight's size, so on a small model with wide layers they alone passed the streaming bound
(1.5x the model + 1 GiB). Read with ``pread`` into a buffer of the band, nothing of the file is mapped into the
process: only the band in use is resident (a mapped file's pages count as resident memory once read, until
dropped). The file has no name, so nothing is left behind however the process ends. Where the file cannot be made
(no space in TMPDIR), the array is held in memory instead: slower to run out of memory, never a failed run.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

BAND_BYTES = 16 << 20
"""Bytes of rows read or written at once by :meth:`DiskRows.bands`."""


class DiskRows:
    """A ``shape`` array of ``dtype`` (zeros at first) addressed by rows of its ``(rows, cols)`` view, where ``rows``
    is the product of every axis but the last."""

    def __init__(self, shape: tuple[int, ...], dtype=np.float64) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.cols = self.shape[-1]
        self.rows = int(np.prod(self.shape[:-1], dtype=np.int64))
        self.nbytes = self.rows * self.cols * self.dtype.itemsize
        self._row_bytes = self.cols * self.dtype.itemsize
        self._file = None
        self._memory: np.ndarray | None = None
        try:
            f = tempfile.TemporaryFile(prefix="bq-rows-")  # noqa: SIM115 (kept open as long as the array lives)
            try:
                if self.nbytes:
                    os.posix_fallocate(f.fileno(), 0, self.nbytes)  # no space: fails here, not mid-write
            except BaseException:
                f.close()
                raise
            self._file = f
        except OSError:
            self._memory = np.zeros((self.rows, self.cols), dtype=self.dtype)

    @classmethod
    def of(cls, array: np.ndarray) -> DiskRows:
        """``array`` copied to a new file."""
        out = cls(array.shape, array.dtype)
        flat = np.asarray(array).reshape(out.rows, out.cols)
        for r0, r1 in out.bands():
            out.write(r0, flat[r0:r1])
        return out

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def bands(self, start: int = 0, stop: int | None = None, nbytes: int | None = None):
        """``(r0, r1)`` row ranges of about ``nbytes`` (:data:`BAND_BYTES`) covering ``[start, stop)``."""
        stop = self.rows if stop is None else stop
        nbytes = BAND_BYTES if nbytes is None else nbytes
        step = max(1, nbytes // max(1, self._row_bytes))
        for r0 in range(start, stop, step):
            yield r0, min(stop, r0 + step)

    def read(self, r0: int, r1: int) -> np.ndarray:
        """Rows ``[r0, r1)`` as a new writable ``(r1 - r0, cols)`` array."""
        if not 0 <= r0 <= r1 <= self.rows:
            raise IndexError(f"rows [{r0}, {r1}) of {self.rows}")
        if self._memory is not None:
            return self._memory[r0:r1].copy()
        out = np.empty((r1 - r0, self.cols), dtype=self.dtype)
        self._transfer(os.preadv, out, r0)
        return out

    def write(self, r0: int, rows: np.ndarray) -> None:
        """Rows ``[r0, r0 + len(rows))`` set to ``rows``."""
        rows = np.ascontiguousarray(rows, dtype=self.dtype).reshape(-1, self.cols)
        if not 0 <= r0 <= r0 + len(rows) <= self.rows:
            raise IndexError(f"rows [{r0}, {r0 + len(rows)}) of {self.rows}")
        if self._memory is not None:
            self._memory[r0 : r0 + len(rows)] = rows
            return
        self._transfer(os.pwritev, rows, r0)

    def _transfer(self, call, rows: np.ndarray, r0: int) -> None:
        """``call`` (``os.preadv`` or ``os.pwritev``) over all of ``rows``' bytes at row ``r0`` (they may move a
        part at a time)."""
        view = memoryview(rows).cast("B")
        at, done = r0 * self._row_bytes, 0
        while done < len(view):
            moved = call(self._file.fileno(), [view[done:]], at + done)
            if moved <= 0:
                raise OSError(f"{call.__name__} on a temporary file stopped at {done} of {len(view)} bytes")
            done += moved

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        """The whole array in memory (for small ones and for saving it; the point of the class is not to)."""
        out = self.read(0, self.rows).reshape(self.shape)
        return out if dtype is None else out.astype(dtype, copy=False)
