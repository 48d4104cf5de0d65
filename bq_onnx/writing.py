"""How outputs reach the disk: files the user already has are never touched except the output they named.

The write protocol (README, "Writing outputs"):

1. Before any work, the destination is resolved (``-o DIR/`` or an existing folder gets the default file name
   inside it) and checked: it must not be, resolve to, or share an inode with any input file (the model, its
   external data, ``--calib``, ``--posterior``, ``--verify-inputs``, ``--labels``), and an existing file there
   needs ``force``.
2. Everything is written under temporary names in a private staging folder beside the destination
   (``.bq-tmp-<pid>-<random>``, mode 0700, same file system, so renames are atomic) and verified there.
3. Only after verification passed, signals are held back and the files are renamed into place: the external
   data file first, then the model. The data file's name carries a hash of its bytes
   (``OUT.<16 hex>.data``), so renaming it never replaces the data a previous output at ``OUT`` still reads:
   until the model's rename (one atomic step, the commit) ``OUT`` is the old model with its old data, after it
   the new model with its new data. Without ``force`` each rename is exclusive (a hard link that fails when the
   name exists, then the staged name is removed), so a file created at ``OUT`` while bq-onnx worked is never
   replaced; with ``force`` ``rename`` replaces it, and a symbolic link at ``OUT`` is replaced as a file,
   never written through.
4. The previous output's own data file (``OUT.data`` or ``OUT.<hex>.data``, read from the previous model) is
   removed after the commit; the staging folder is removed in every case (``finally``, SIGINT and SIGTERM
   included).

A ``kill -9`` can still leave a staging folder or, between the two renames, an unreferenced ``OUT.<hex>.data``:
the next write into that folder removes staging folders whose process is gone and the data files of ``OUT``
that ``OUT`` does not reference. Outputs get mode ``0666 & ~umask`` like any file the user writes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from bq_onnx.errors import OutputError

STAGING_PREFIX = ".bq-tmp-"
_STAGING = re.compile(r"^\.bq-tmp-(\d+)-[0-9a-f]{8}$")
_DATA_SUFFIX = re.compile(r"^\.[0-9a-f]{16}\.data$")

#: Staging folders of this process, removed by :func:`remove_staging` (the hard stop of the run limits).
_LIVE: set[Path] = set()
#: Outputs this process has committed (renamed into place), in order: an interrupt that arrives during or after
#: a commit must not be reported as "nothing was written".
COMMITTED: list[Path] = []


def fault(stage: str) -> None:
    """Fault injection for the write tests: ``BQ_ONNX_FAULT=<stage>`` kills this process with SIGKILL there;
    ``<stage>:SIGTERM`` or ``<stage>:SIGINT`` sends that signal instead (held back inside a commit)."""
    wanted, _, name = os.environ.get("BQ_ONNX_FAULT", "").partition(":")
    if wanted == stage:
        os.kill(os.getpid(), getattr(signal, name) if name in ("SIGTERM", "SIGINT") else signal.SIGKILL)


# --- what must never be written ---------------------------------------------------------------------------------


class Protected:
    """Files the tool only reads, by resolved path and by (device, inode)."""

    def __init__(self, paths: Iterable[str | os.PathLike] = ()) -> None:
        self.paths: dict[Path, str] = {}
        self.inodes: dict[tuple[int, int], str] = {}
        for p in paths:
            self.add(p)

    def add(self, path: str | os.PathLike | None, label: str = "input file") -> None:
        if path is None:
            return
        p = Path(path)
        with contextlib.suppress(OSError, RuntimeError, ValueError):
            what = f"{label} '{os.fspath(p)}'"
            self.paths.setdefault(_lexical(p), what)
            self.paths.setdefault(p.resolve(), what)
            st = p.stat()
            self.inodes.setdefault((st.st_dev, st.st_ino), what)
            if p.is_dir():  # a calibration folder: every file in it
                for child in p.iterdir():
                    if child.is_file():
                        self.add(child, label)

    def add_model(self, path: str | os.PathLike | None) -> None:
        """A model file and every external data file it names."""
        if path is None:
            return
        self.add(path, "input model")
        for location in external_locations(path):
            self.add(Path(path).parent / location, "input model's external data")

    def clash(self, target: str | os.PathLike) -> str | None:
        """What ``target`` would touch (``input model 'm.onnx'``), or None."""
        t = Path(target)
        for candidate in (_lexical(t), _resolved(t)):
            if candidate in self.paths:
                return self.paths[candidate]
        for stat_of in (t.stat, t.lstat):  # the file a link names, and the link itself
            with contextlib.suppress(OSError):
                st = stat_of()
                if (st.st_dev, st.st_ino) in self.inodes:
                    return self.inodes[(st.st_dev, st.st_ino)]
        return None


def _lexical(p: Path) -> Path:
    """The absolute path with ``..`` and links resolved in the folder part only: the name a rename replaces."""
    return Path(os.path.realpath(p.parent)) / p.name if p.name else Path(os.path.realpath(p))


def _resolved(p: Path) -> Path:
    try:
        return p.resolve()
    except (OSError, RuntimeError):
        return _lexical(p)


def external_locations(path: str | os.PathLike) -> list[str]:
    """The external data locations a model file names (nothing when it cannot be read: loading refuses it)."""
    try:
        import onnx

        from bq_onnx.onnx_proto import graph_tensors

        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001  unreadable models are refused by the loader with their own message
        return []
    out = []
    for tensor in graph_tensors(proto.graph):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in out:
                out.append(entry.value)
    return out


# --- where the output goes --------------------------------------------------------------------------------------


def resolve_output(output: str | os.PathLike | None, default_name: str, default_folder: Path) -> Path:
    """``-o`` as given; a trailing ``/`` or an existing folder means ``<folder>/<default_name>``; no ``-o``:
    ``default_folder/default_name``."""
    if output is None:
        return default_folder / default_name
    text = os.fspath(output)
    out = Path(text)
    if text.endswith(("/", os.sep)) or (_is_folder(out) and not out.is_symlink()):
        if not _is_folder(out):
            raise OutputError(f"{text}: output folder does not exist")
        return out / default_name
    return out


def _is_folder(path: Path) -> bool:
    """``path.is_dir()``, false for a name the file system cannot hold (ENAMETOOLONG: Python 3.11 raises it)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def check_output(out: Path, protected: Protected, force: bool) -> Path:
    """Refuse a destination that is an input, an existing file without ``force``, or not a place for a file."""
    if len(os.fsencode(out.name)) > 200:  # room for the data file's suffix under NAME_MAX (255); checked first:
        # a name over NAME_MAX fails every stat below with ENAMETOOLONG
        raise OutputError(f"{out}: file name too long (at most 200 bytes)")
    who = protected.clash(out)
    if who is not None:
        raise OutputError(f"{out}: output path is the {who}; choose another path")
    if out.is_dir() and not out.is_symlink():
        raise OutputError(f"{out}: is a folder")
    if os.path.lexists(out):
        if not force:
            raise OutputError(f"{out}: exists; pass --force to overwrite")
        if not (out.is_symlink() or out.is_file()):
            raise OutputError(f"{out}: exists and is not a regular file")
    if not out.parent.is_dir():
        raise OutputError(f"{out.parent}: output folder does not exist")
    return out


# --- staging and commit -----------------------------------------------------------------------------------------


def output_mode() -> int:
    """``0666 & ~umask``: what ``open`` gives any file the user writes."""
    umask = None
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def clean_stale(folder: Path, out_name: str | None = None) -> None:
    """Remove staging folders in ``folder`` whose process is gone, and (``out_name``) data files of that output
    that its model does not reference: what a ``kill -9`` left."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            m = _STAGING.match(entry.name)
            if m and entry.is_dir() and not entry.is_symlink() and not _alive(int(m.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
    if out_name is None:
        return
    out = folder / out_name
    hashed = [name for name in _data_names(out) if name != f"{out_name}.data"]
    if not hashed:  # nothing to remove: the previous output (maybe a graph of millions of nodes) is not parsed
        return
    referenced = set(external_locations(out)) if out.is_file() else set()
    for name in hashed:
        entry = folder / name
        if name not in referenced and entry.is_file() and not entry.is_symlink():
            entry.unlink(missing_ok=True)


def _data_names(out: Path) -> list[str]:
    """Files beside ``out`` named as bq-onnx names an output's data (``OUT.data``, ``OUT.<16 hex>.data``)."""
    names = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(out.parent):
            rest = entry.name[len(out.name):] if entry.name.startswith(out.name) else None
            if rest is not None and (rest == ".data" or _DATA_SUFFIX.match(rest)):
                names.append(entry.name)
    return names


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


@contextlib.contextmanager
def staging(folder: Path) -> Iterator[Path]:
    """A private temporary folder beside the output, removed whatever happens."""
    path = folder / f"{STAGING_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    os.mkdir(path, 0o700)
    _LIVE.add(path)
    try:
        yield path
    finally:
        try:
            shutil.rmtree(path, ignore_errors=True)
        finally:  # a signal held back during the commit may land inside the first removal and cut it short
            shutil.rmtree(path, ignore_errors=True)
            _LIVE.discard(path)


def remove_staging() -> None:
    """Remove this process's staging folders now (before a hard exit)."""
    for path in list(_LIVE):
        shutil.rmtree(path, ignore_errors=True)
        _LIVE.discard(path)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends (the renames that commit an output are not cut in two).

    Held at Python level, not by the thread's signal mask: the kernel gives a process-directed signal to any
    thread that does not block it (onnxruntime's and the quantizer's worker threads), and Python then runs the
    handler in the main thread at once. Here the handlers only note the signal; it is raised again when the block
    ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    previous = {s: h for s, h in previous.items() if h is not None}  # None: set outside Python, not restorable
    for s in previous:
        signal.signal(s, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def _place(src: Path, dst: Path, force: bool) -> None:
    """Rename ``src`` to ``dst``; without ``force`` never over an existing name (hard link, then unlink; where
    the file system has no hard links, a last check before the rename)."""
    if force:
        os.replace(src, dst)
        return
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise OutputError(f"{dst}: was created while bq-onnx worked; pass --force to overwrite") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(dst):
            raise OutputError(f"{dst}: was created while bq-onnx worked; pass --force to overwrite") from None
        os.rename(src, dst)
        return
    os.unlink(src)


def hashed_data_name(out_name: str, data: Path) -> str:
    """``OUT.<first 16 hex of sha256>.data``: deterministic, and never the name of other data."""
    h = hashlib.sha256()
    with open(data, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return f"{out_name}.{h.hexdigest()[:16]}.data"


def commit(staged: Path, out: Path, protected: Protected, force: bool, data: Path | None = None) -> None:
    """Rename the staged files into place (data, then the model), signals held; see the module docstring."""
    targets = [out] + ([out.parent / data.name] if data is not None else [])
    for target in targets:
        who = protected.clash(target)
        if who is not None:
            raise OutputError(f"{target}: would replace the {who}; choose another output path")
    old_data = _own_data(out) if force and out.is_file() and not out.is_symlink() and _data_names(out) else []
    mode = output_mode()
    for f in (staged, data):
        if f is not None:
            os.chmod(f, mode)
    with signals_held():
        placed_data = None
        if data is not None:
            target = out.parent / data.name
            if os.path.lexists(target) and _same_bytes(target, data):
                pass  # the previous output already holds exactly these bytes under this name
            else:
                _place(data, target, force)
                placed_data = target
            fault("data-renamed")
        try:
            _place(staged, out, force)
        except BaseException:
            if placed_data is not None:
                placed_data.unlink(missing_ok=True)
            raise
        COMMITTED.append(out)
        fault("model-renamed")
        keep = {data.name} if data is not None else set()
        for name in old_data:
            victim = out.parent / name
            if name not in keep and protected.clash(victim) is None:
                victim.unlink(missing_ok=True)


def _same_bytes(a: Path, b: Path) -> bool:
    try:
        sa, sb = a.lstat(), b.stat()
    except OSError:
        return False
    if not stat.S_ISREG(sa.st_mode) or sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 24), fb.read(1 << 24)
            if x != y:
                return False
            if not x:
                return True


def _own_data(out: Path) -> list[str]:
    """The data files of the output at ``out`` that bq-onnx named (``OUT.data``, ``OUT.<hex>.data``)."""
    names = []
    for location in external_locations(out):
        rest = location[len(out.name):] if location.startswith(out.name) else None
        if rest is not None and "/" not in location and (rest == ".data" or _DATA_SUFFIX.match(rest)):
            names.append(location)
    return names


def write_file(out: Path, write: Callable[[Path], None], protected: Protected, force: bool,
               suffix: str = "") -> None:
    """One output file by the protocol: ``write(tmp)`` in a staging folder, then the exclusive rename."""
    clean_stale(out.parent)
    try:
        with staging(out.parent) as folder:
            tmp = folder / f"out{suffix}"
            write(tmp)
            fault("staged")
            commit(tmp, out, protected, force)
    except OSError as exc:
        raise OutputError(f"{out}: cannot write the output ({exc.strerror or exc})") from None
