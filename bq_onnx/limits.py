"""Limits on running untrusted graphs: every session the tool creates and every run it makes, in onnxruntime and
OpenVINO (posterior, tables, guard, distillation, verification, ``verify``, ``bench``), has a wall-time limit and
a memory limit.

* **Time** (``--run-timeout``, default :data:`DEFAULT_RUN_TIMEOUT` seconds per session creation or run): one
  watchdog thread holds the deadlines. At a deadline an onnxruntime run is cancelled through its ``RunOptions``
  terminate flag (it stops between kernels, inside ``Loop`` bodies too) and raises :class:`LimitError`. What
  cannot be cancelled (an OpenVINO request, a session being created, a single kernel that never returns) gets
  :data:`GRACE` seconds more, then the hard stop: the one-line error, the exit handlers (temporary and staging
  folders removed), and ``os._exit(10)``.
* **Memory** (``--max-memory``, the one budget declared in :class:`bq_onnx.config.LimitsConfig`; default 75 % of
  the memory available): while a session is created or runs, the process's address space may grow by at most
  the budget (``RLIMIT_AS`` set to the current size plus the budget, restored afterwards). An allocation past it
  fails at once inside the runtime (no page is touched, the kernel's OOM killer is never reached) and the run
  raises :class:`LimitError`. Linux and macOS; elsewhere only the time limit holds.

Hitting a limit is exit 10; nothing is written (the write protocol commits only verified outputs).
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import itertools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from bq_onnx import budgets
from bq_onnx.errors import EXIT_LIMIT, LimitError

try:
    import resource as _resource
except ImportError:  # Windows: the time limit only
    _resource = None  # type: ignore[assignment]

DEFAULT_RUN_TIMEOUT = 600.0
"""Seconds one session creation or one run may take when ``--run-timeout`` is not given (the API)."""
GRACE = 5.0
"""Seconds a run that was cancelled at its deadline gets to stop before the hard stop."""

_timeout: float | None = None


def run_timeout() -> float:
    return DEFAULT_RUN_TIMEOUT if _timeout is None else _timeout


def set_run_timeout(seconds: float | None) -> None:
    """Set ``--run-timeout`` (None: the default)."""
    global _timeout
    _timeout = None if seconds is None else float(seconds)


@contextlib.contextmanager
def run_limits(timeout: float | None = None, max_memory: int | str | None = None) -> Iterator[None]:
    """Both limits set inside the block (the API's ``run_timeout`` and ``max_memory``), restored after."""
    global _timeout
    saved = _timeout
    if timeout is not None:
        set_run_timeout(timeout)
    try:
        if max_memory is not None:
            from bq_onnx.budgets import memory_limit

            with memory_limit(max_memory):
                yield
        else:
            yield
    finally:
        _timeout = saved


# --- the watchdog ------------------------------------------------------------------------------------------------


class _Watchdog:
    """One daemon thread; ``arm`` registers a deadline with what to do there, ``disarm`` removes it."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._actions: dict[int, Callable[[], Any]] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._wake_at = float("inf")  # the deadline the thread sleeps until: a later one needs no wake-up

    def arm(self, seconds: float, action: Callable[[], Any]) -> int:
        with self._cond:
            token = next(self._ids)
            self._actions[token] = action
            at = time.monotonic() + seconds
            heapq.heappush(self._heap, (at, token))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="bq-onnx-watchdog", daemon=True)
                self._thread.start()
            elif at < self._wake_at:
                self._cond.notify()
        return token

    def disarm(self, token: int) -> None:
        with self._cond:
            self._actions.pop(token, None)
            if len(self._heap) > 2 * len(self._actions) + 64:  # drop disarmed deadlines far in the future
                self._heap = [e for e in self._heap if e[1] in self._actions]
                heapq.heapify(self._heap)

    def _loop(self) -> None:
        while True:  # never returns: a failing action is the hard stop's own problem, not the loop's
            with self._cond:
                while self._heap and self._heap[0][1] not in self._actions:
                    heapq.heappop(self._heap)  # disarmed
                self._wake_at = self._heap[0][0] if self._heap else float("inf")
                wait = self._wake_at - time.monotonic() if self._heap else None
                if wait is None or wait > 0:
                    self._cond.wait(wait)
                    continue
                _, token = heapq.heappop(self._heap)
                action = self._actions.pop(token, None)
            if action is not None:
                with contextlib.suppress(Exception):
                    action()


_WATCHDOG = _Watchdog()


def hard_stop(message: str) -> None:
    """Print ``message`` as the one error line, run the exit handlers (temporary folders), exit 10."""
    from bq_onnx.writing import remove_staging

    with contextlib.suppress(Exception):
        sys.stderr.write(f"error: {message}\n")
        sys.stderr.flush()
    with contextlib.suppress(BaseException):
        remove_staging()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()  # TemporaryDirectory finalizers: scratch folders go too
    os._exit(EXIT_LIMIT)


def _timeout_text(what: str, seconds: float) -> str:
    return (f"{what} did not finish within {seconds:g} s (--run-timeout); the graph may not terminate (nothing "
            f"was written)")


class _Deadline:
    """The time limit of one block: at the deadline ``cancel()`` (the block should then raise), :data:`GRACE`
    seconds later the hard stop. A class, not a generator: it wraps every run (overhead measured in README)."""

    __slots__ = ("what", "cancel", "seconds", "expired", "soft", "hard")

    def __init__(self, what: str, cancel: Callable[[], Any] | None) -> None:
        self.what, self.cancel = what, cancel
        self.seconds = run_timeout()
        self.expired = False
        self.hard: int | None = None

    def _at_deadline(self) -> None:
        self.expired = True
        if self.cancel is not None:
            with contextlib.suppress(Exception):
                self.cancel()
        self.hard = _WATCHDOG.arm(GRACE, lambda: hard_stop(_timeout_text(self.what, self.seconds)))

    def __enter__(self) -> _Deadline:
        self.soft = _WATCHDOG.arm(self.seconds, self._at_deadline)
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        _WATCHDOG.disarm(self.soft)
        if self.hard is not None:
            _WATCHDOG.disarm(self.hard)
        if self.expired and (kind is None or issubclass(kind, Exception)) and not isinstance(exc, LimitError):
            raise LimitError(_timeout_text(self.what, self.seconds)) from None
        return False


def deadline(what: str, cancel: Callable[[], Any] | None = None) -> _Deadline:
    """The time limit around a block (see :class:`_Deadline`); a block that ends after its deadline raises
    :class:`LimitError`."""
    return _Deadline(what, cancel)


# --- memory ------------------------------------------------------------------------------------------------------

_depth = 0
_statm: tuple[int, int] | None = None  # (pid, fd of /proc/self/statm): read with one pread per run
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _address_space() -> int | None:
    """The process's address space in bytes (``/proc/self/statm``), None where there is no such file."""
    global _statm
    try:
        if _statm is None or _statm[0] != os.getpid():
            _statm = (os.getpid(), os.open("/proc/self/statm", os.O_RDONLY))
        return int(os.pread(_statm[1], 64, 0).split()[0]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


class _MemoryCap:
    """Inside the block the address space may grow by at most the memory budget (nested blocks share the
    outermost cap)."""

    __slots__ = ("budget", "saved", "applied", "outer")

    def __enter__(self) -> _MemoryCap:
        global _depth
        self.budget: int | None = budgets.memory_budget()
        self.applied = False
        _depth += 1
        if _depth > 1 or _resource is None:
            return self
        size = _address_space()
        if size is None:
            return self
        self.saved = _resource.getrlimit(_resource.RLIMIT_AS)
        soft, hard = self.saved
        cap = size + self.budget
        if hard != _resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == _resource.RLIM_INFINITY or cap < soft:
            with contextlib.suppress(ValueError, OSError):
                _resource.setrlimit(_resource.RLIMIT_AS, (cap, hard))
                self.applied = True
        return self

    def __exit__(self, *exc) -> bool:
        global _depth
        _depth -= 1
        if self.applied:
            with contextlib.suppress(ValueError, OSError):
                _resource.setrlimit(_resource.RLIMIT_AS, self.saved)
        return False


def memory_cap() -> _MemoryCap:
    """The memory limit around a block; ``.budget`` is the budget in bytes."""
    return _MemoryCap()


#: What runtimes say when an allocation failed.
_ALLOCATION_WORDS = ("failed to allocate", "bad_alloc", "bad allocation", "out of memory", "cannot allocate",
                     "memoryerror", "std::length_error", "mmap", "resource temporarily unavailable")


def is_allocation_failure(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = f"{type(exc).__name__}: {exc}".lower()
    return any(word in text for word in _ALLOCATION_WORDS)


def memory_error(what: str, budget: int | None) -> LimitError:
    from bq_onnx.budgets import human

    limit = human(budget) if budget is not None else "the memory budget"
    return LimitError(f"{what} needed more memory than the limit of {limit} (--max-memory); nothing was written")


class limited:  # noqa: N801  used as ``with limited(...)``, like a function
    """Both limits around one session creation or run; an allocation failure inside is a :class:`LimitError`."""

    __slots__ = ("what", "deadline", "cap")

    def __init__(self, what: str, cancel: Callable[[], Any] | None = None) -> None:
        self.what = what
        self.deadline = _Deadline(what, cancel)
        self.cap = _MemoryCap()

    def __enter__(self) -> limited:
        self.deadline.__enter__()
        try:
            self.cap.__enter__()
        except BaseException:
            self.deadline.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        self.cap.__exit__()
        if kind is not None and issubclass(kind, Exception) and not issubclass(kind, LimitError) \
                and not self.deadline.expired and is_allocation_failure(exc):
            self.deadline.__exit__(None, None, None)
            raise memory_error(self.what, self.cap.budget) from None
        return self.deadline.__exit__(kind, exc, tb)
