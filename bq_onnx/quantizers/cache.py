"""Quantizer designs computed once per optimize run.

The expected-loss tables design every weight at every width and block size they consider, then the quantize stage
designs the chosen ones again, and the guard and the stored-budget loop re-run the quantize stage for each trial
allocation: the same ``quantize_spec`` call (same values, importance, width, design, block and seed) comes back
several times (about a quarter of the quantizer calls on all-MiniLM-L6-v2). Every design is a deterministic
function of those arguments, so a result is kept, keyed by a digest of the arrays' bytes and the rest, and handed
back instead of being recomputed: the same objects, so the same output bytes. Results are shared, never copied:
callers treat a :class:`~bq_onnx.qtensor.QuantizedTensor` as immutable (they build new ones to change one).

The cache holds at most :data:`MAX_BYTES` of arrays (least recently used first out) and lives only inside
:func:`scope` (one optimize run: ``pipeline.optimize_model``), so nothing stays in memory after it.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Hashable, Iterator

import numpy as np

from bq_onnx.qtensor import QuantizedTensor
from bq_onnx.quantizers.parallel import run_chunks

#: Bytes of designs kept (codes, scales, zero points, codebooks, offsets, outliers) before the oldest go.
MAX_BYTES = 256 * 2**20

_lock = threading.Lock()
#: What moves a design of :data:`SPILL_BYTES` or more to disk (the same values, mapped; given to :func:`scope`).
_spill: list[Callable[[QuantizedTensor], QuantizedTensor] | None] = [None]
_entries: collections.OrderedDict[tuple, tuple[QuantizedTensor, int]] = collections.OrderedDict()
_tagged: dict[str, set[tuple]] = {}  # keys by the tag they were kept under (:func:`forget`)
_state = {"depth": 0, "bytes": 0, "hits": 0, "misses": 0}


#: The digest of the arrays hashed last, by identity: the tables pass one weight's view and importance to every
#: width and block size, so each is hashed once (3.3 s of 382 hashes on MiniLM-L3 otherwise). Callers never change
#: an array in place after handing it to a quantizer.
_recent: dict[int, tuple[weakref.ref, tuple]] = {}


def digest(array: np.ndarray | None) -> tuple | None:
    """A key for an array's content: dtype, shape and a 128-bit hash of its bytes."""
    if array is None:
        return None
    known = _kept_keys.get(id(array))  # an array :func:`kept` holds (read-only, alive until the scope ends)
    if known is not None:
        return known
    seen = _recent.get(id(array))
    if seen is not None and seen[0]() is array:
        return seen[1]
    a = np.ascontiguousarray(array)
    key = a.dtype.str, a.shape, _content_hash(a.view(np.uint8).reshape(-1))
    with _lock:
        if id(array) in _kept_ids:
            _kept_keys[id(array)] = key
    try:
        ref = weakref.ref(array)
    except TypeError:
        return key
    with _lock:
        if len(_recent) >= 8:
            _recent.clear()
        _recent[id(array)] = (ref, key)
    return key


HASH_PIECE = 8 << 20
"""Bytes per piece of a large array's content hash: pieces are hashed on the quantizers' thread pool (hashlib
releases the GIL), then the pieces' digests are hashed together."""


def _content_hash(data: np.ndarray) -> bytes:
    """A 128-bit SHA-256 digest of ``data`` (uint8, 1-D); an array over :data:`HASH_PIECE` bytes is hashed by
    pieces in parallel, then their digests together. Why SHA-256 and pieces: blake2b ran at 0.5 GB/s here against
    0.9 GB/s for SHA-256 (CPU instructions), and 228 hashes of MiniLM-L3's views and importances took 2.0 s."""
    if data.size <= HASH_PIECE:
        return hashlib.sha256(data).digest()[:16]
    starts = range(0, data.size, HASH_PIECE)
    parts: list[bytes] = [b""] * len(starts)

    def piece(i: int) -> None:
        parts[i] = hashlib.sha256(data[starts[i]:starts[i] + HASH_PIECE]).digest()

    run_chunks(piece, range(len(starts)))
    whole = hashlib.sha256(data.size.to_bytes(8, "little"))
    for part in parts:
        whole.update(part)
    return whole.digest()[:16]


def _nbytes(qt: QuantizedTensor) -> int:
    return sum(int(getattr(qt, f).nbytes) for f in ("codes", "scale", "zero_point", "codebook", "offset",
                                                       "outlier_index", "outlier_value", "scale_code", "super_scale")
               if getattr(qt, f) is not None)


def cached(key: Hashable, compute: Callable[[], QuantizedTensor], tag: str | None = None) -> QuantizedTensor:
    """``compute()``, or the result of an earlier call with the same ``key`` inside the current :func:`scope`;
    ``tag``: what :func:`forget` drops the entry by."""
    if not _state["depth"]:
        return compute()
    with _lock:
        hit = _entries.get(key)
        if hit is not None:
            _entries.move_to_end(key)
            _state["hits"] += 1
            return hit[0]
    qt = compute()
    size = _nbytes(qt)
    if _spill[0] is not None and SPILL_BYTES <= size <= MAX_BYTES:
        qt = _spill[0](qt)
    with _lock:
        _state["misses"] += 1
        if size <= MAX_BYTES and key not in _entries:
            _entries[key] = (qt, size)
            _state["bytes"] += size
            if tag is not None:
                _tagged.setdefault(tag, set()).add(key)
            while _state["bytes"] > MAX_BYTES:
                _, (_, freed) = _entries.popitem(last=False)
                _state["bytes"] -= freed
    return qt


#: Bytes of arrays :func:`kept` holds at most in memory; what comes after is computed each time (nothing is
#: dropped: the callers ask for the same weights in the same order every round, so an evicting cache would miss
#: every time).
MAX_KEPT_BYTES = 256 * 2**20
#: A result of at least this many bytes is kept on disk where the caller can put it there (``spill``).
SPILL_BYTES = 16 << 20
#: Free bytes :func:`kept` leaves in the temporary folder: a result that would leave less is computed each time.
#: Why no fixed cap: a result beyond one was computed again in every round and held by whoever read it (GPTQ's kept
#: metrics: 0.6 GiB of the 1 GiB scale model's with ``--calib`` under a 2 GiB cap).
DISK_RESERVE_BYTES = 4 << 30

_kept: dict[tuple, tuple[tuple, tuple]] = {}
_kept_bytes = [0, 0]  # in memory, on disk
_kept_ids: set[int] = set()  # the arrays' ids (they are held, so no other array has one)
_kept_keys: dict[int, tuple] = {}  # their digests, once computed: hashed once per run, not once per round


def kept(owners: tuple, key: Hashable, compute: Callable[[], tuple],
         spill: Callable[[tuple], tuple | None] | None = None) -> tuple:
    """``compute()`` (a tuple of arrays or None), or what an earlier call with the same ``owners`` (objects, by
    identity: held until the scope ends, so an identity is never reused) and ``key`` returned inside the current
    :func:`scope`; outside one, always ``compute()``. The arrays are made read-only: they are shared. ``spill``:
    the same arrays moved to a file and mapped back (None where it cannot), for a result of :data:`SPILL_BYTES` or
    more: kept there instead of in memory, its pages read back only where used.

    Why: the quantize stage runs once per spending of the budget (the budget loop, every guard candidate: nine
    times on MiniLM-L3) and each time made every weight's view and importance again (a transposed copy and the
    posterior's precision) and hashed them again for the design cache (:func:`digest` remembers arrays by
    identity, only the last few; it remembers the kept ones for the whole run): about 0.6 s a round on MiniLM-L3."""
    if not _state["depth"]:
        return compute()
    ident = (tuple(id(o) for o in owners), key)
    with _lock:
        hit = _kept.get(ident)
    if hit is not None:
        return hit[1]
    arrays = compute()
    size = sum(int(a.nbytes) for a in arrays if a is not None)
    where = 0  # in memory
    if spill is not None and size >= SPILL_BYTES:
        with _lock:
            room = ident not in _kept
        moved = spill(arrays) if room and _disk_free() - size >= DISK_RESERVE_BYTES else None
        if moved is not None:
            arrays, where = moved, 1
    for a in arrays:
        if a is not None:
            a.setflags(write=False)
    with _lock:
        if (where or _kept_bytes[0] + size <= MAX_KEPT_BYTES) and ident not in _kept:
            _kept[ident] = (owners, arrays)
            _kept_bytes[where] += size
            _kept_ids.update(id(a) for a in arrays if a is not None)
    return arrays


def _disk_free() -> int:
    """Free bytes in the temporary folder (0 where it cannot be read)."""
    try:
        return shutil.disk_usage(tempfile.gettempdir()).free
    except OSError:
        return 0


def forget(tag: str) -> None:
    """Drop the entries kept under ``tag``: results no later call asks for (the slices of a big weight the tables
    designed: the quantize stage encodes it on the tables' grid instead), held until the scope ends otherwise."""
    with _lock:
        for key in _tagged.pop(tag, ()):
            hit = _entries.pop(key, None)
            if hit is not None:
                _state["bytes"] -= hit[1]


def active() -> bool:
    """Whether a :func:`scope` is open (outside one, nothing is hashed or kept)."""
    return bool(_state["depth"])


def stats() -> dict[str, int]:
    """Hits, misses, entries and bytes held (for profiles and tests)."""
    with _lock:
        return {"hits": _state["hits"], "misses": _state["misses"], "entries": len(_entries),
                "bytes": _state["bytes"]}


@contextlib.contextmanager
def scope(spill: Callable[[QuantizedTensor], QuantizedTensor] | None = None) -> Iterator[None]:
    """Designs are cached inside; the cache is emptied when the outermost scope ends. ``spill`` (the outermost
    scope's): a design of :data:`SPILL_BYTES` or more is kept as what it returns, the same values in a mapped
    file, so that the designs kept for the next spend of the budget are resident only while a step reads them."""
    with _lock:
        if not _state["depth"]:
            _state.update(hits=0, misses=0)
            _spill[0] = spill
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if not _state["depth"]:
                _entries.clear()
                _tagged.clear()
                _recent.clear()
                _kept.clear()
                _kept_ids.clear()
                _kept_keys.clear()
                _state["bytes"] = _kept_bytes[0] = _kept_bytes[1] = 0
                _spill[0] = None
