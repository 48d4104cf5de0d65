"""onnxruntime sessions for the estimators and the measured passes: opened from temporary model files (sessions
load from paths; models over 2 GB need one), and for big models without a copy of the weights. Every session
is created and run under the run limits (:mod:`bq_onnx.limits`: ``--run-timeout``, ``--max-memory``)."""

from __future__ import annotations

import hashlib
import os
import tempfile
import weakref
from pathlib import Path

import onnx_ir as ir

from bq_onnx.errors import LimitError
from bq_onnx.limits import limited
from bq_onnx.model_io import external_tensors, model_nbytes, save_model
from bq_onnx.pages import page_out
from bq_onnx.progress import memtrace
from bq_onnx.runtimes.base import Session
from bq_onnx.runtimes.folding import folds_too_much
from bq_onnx.runtimes.registry import get_runtime

#: Models with more bytes of initializers than this get :func:`unpacked_session` sessions.
UNPACKED_SESSION_BYTES = 512 * 2**20


#: Models with at most this many bytes of initializers get shared sessions (:class:`TempSessions`).
SHARED_SESSION_BYTES = 128 * 2**20
#: Bytes of initializers of the models whose sessions one :class:`TempSessions` keeps at most (oldest dropped first).
KEPT_SESSION_BYTES = 2 * SHARED_SESSION_BYTES

#: Open sessions by (the saved model file's SHA-256, threads): any :class:`TempSessions` asked for a model whose
#: file is byte for byte one that a still-open :class:`TempSessions` has a session of gets that session.
_shared: weakref.WeakValueDictionary[tuple[bytes, int | None], Session] = weakref.WeakValueDictionary()

#: Initializers of at least this many bytes are written once per :class:`TempSessions`, as files named by their
#: content (:meth:`TempSessions._save`); smaller ones stay inside the model file.
STORED_TENSOR_BYTES = 4096

_open: weakref.WeakSet[TempSessions] = weakref.WeakSet()  # every TempSessions not yet closed


class TempSessions:
    """Sessions over temporary files, removed by :meth:`close`.

    A session of a model of at most :data:`SHARED_SESSION_BYTES` is kept until :meth:`close` (the latest ones,
    up to :data:`KEPT_SESSION_BYTES` of their models' weights) and shared, unless the model's packed codes would
    fold into many times their float size (:mod:`bq_onnx.runtimes.folding`: such a model gets an unfolded
    :func:`unpacked_session`, dropped with its runs' buffers when the caller lets it go). The guard
    measures the FP32 model and its best candidates on the held-out samples and again on the fit samples, each
    set with its own ``TempSessions``, and creating a session cost 0.6-1.1 s each on MiniLM-L3 (3 of its 12). The
    key is the saved file's bytes, so a shared session runs exactly the graph a new one would, with the same
    options: the same outputs."""

    def __init__(self, threads: int | None = None) -> None:
        # a session may keep its weights' files mapped: on a system that cannot remove them, they are left
        self._tmp = tempfile.TemporaryDirectory(prefix="bq-post-", ignore_cleanup_errors=True)
        self._count = 0
        self.threads = threads
        self._kept: list[tuple[Session, int]] = []
        _open.add(self)

    def open(self, model: ir.Model) -> Session:
        self._count += 1
        path = Path(self._tmp.name) / f"m{self._count}.onnx"
        nbytes = model_nbytes(model)
        shared = nbytes <= min(SHARED_SESSION_BYTES, UNPACKED_SESSION_BYTES)
        if shared and not folds_too_much(model) and not any(True for _ in external_tensors(model)):
            self._save(model, path)
            return self._shared_session(path, nbytes)
        save_model(model, path)
        if nbytes > UNPACKED_SESSION_BYTES:
            return unpacked_session(path, self.threads)
        if folds_too_much(model):  # run unfolded, neither kept nor shared: its runs' buffers go with it
            return unpacked_session(path, self.threads, arena=False)
        # over SHARED_SESSION_BYTES, or its tensors in external data: not shared
        return get_runtime("onnxruntime").session(path, exact=True, threads=self.threads, spin=False)

    def _shared_session(self, path: Path, nbytes: int) -> Session:
        key = (_file_digest(path), self.threads)
        session = _shared.get(key)
        if session is None:
            session = get_runtime("onnxruntime").session(path, exact=True, threads=self.threads, spin=False)
            _shared[key] = session
        self._kept.append((session, nbytes))
        while sum(n for _, n in self._kept) > KEPT_SESSION_BYTES:
            del self._kept[0]
        return session

    def _save(self, model: ir.Model, path: Path) -> None:
        """``model`` at ``path`` with each initializer of at least :data:`STORED_TENSOR_BYTES` in a file beside it
        named by the SHA-256 of its bytes, written the first time those bytes are seen (the model file refers to
        it as external data). Why: the sessions of one run read the same weights again and again (the cuts' tails,
        the fed models, the probes): writing them all into every model file cost 0.37 s per session on
        all-MiniLM-L6-v2, and the file's digest (the sharing key) hashed them all again. The model file names its
        tensors by content, so its digest still says what the session computes: the same weights, the same
        graph, the same options (onnxruntime reads external data as the bytes it would have read inline)."""
        swapped = []
        try:
            for value in model.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or tensor.nbytes < STORED_TENSOR_BYTES or tensor.dtype == ir.DataType.STRING:
                    continue
                data = tensor.tobytes()
                name = hashlib.sha256(data).hexdigest() + ".bin"
                stored = path.parent / name
                if not stored.exists():
                    partial = path.parent / (name + ".tmp")
                    partial.write_bytes(data)
                    os.replace(partial, stored)  # a file of that name is complete
                swapped.append((value, tensor))
                value.const_value = ir.ExternalTensor(name, 0, len(data), tensor.dtype, shape=tensor.shape,
                                                      name=tensor.name, base_dir=path.parent)
                del data
            ir.save(model, path)
        finally:
            for value, tensor in swapped:
                value.const_value = tensor
        memtrace(f"saved {path.name}")

    def close(self) -> None:
        self._kept.clear()
        _open.discard(self)
        self._tmp.cleanup()


def page_out_sessions() -> int:
    """The pages the open :class:`TempSessions`' sessions read of their weight files handed back
    (:func:`bq_onnx.pages.page_out`); the bytes of the mappings advised. Why: a run that feeds every weight
    reads none of them, and a session's earlier reads stayed resident beside what it is fed (issue 21)."""
    return page_out(t._tmp.name for t in list(_open))


def _file_digest(path: Path) -> bytes:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.digest()


def unpacked_session(path: str | os.PathLike, threads: int | None = None, arena: bool = True) -> Session:
    """An onnxruntime CPU session (as ``get_runtime("onnxruntime").session(path, exact=True)``) that holds no
    copy of the weights: onnxruntime memory-maps the external data file and reads the weights from there.

    Two optimizations would copy them. Pre-packing copies every MatMul/Gemm weight into a packed buffer while
    the mapping is still open (measured on the 128 MiB scale-benchmark model: gradient session peak +150 MiB
    unpacked, +290 MiB packed). Constant folding stores ``Transpose(W)`` of every weight a gradient graph reads
    transposed as a new initializer (measured on the 1 GiB model: +450 MiB resident with folding, +40 MiB
    without). Neither changes the speed of these graphs measurably (3 batches of 32: 1.54 s / 1.56 s).
    Unpacked kernels round differently from packed ones (float32 sums in another order: per-element curvatures
    differ by up to 0.5 % where a sample's output gradients nearly cancel), so models up to
    :data:`UNPACKED_SESSION_BYTES` keep the runtime's usual sessions and their results.

    The same session runs a model whose packed codes would fold into many times their float size
    (:mod:`bq_onnx.runtimes.folding`); ``arena=False`` then hands each run's decode buffers back as it ends."""
    import onnxruntime as ort

    from bq_onnx.runtimes.ort import OrtSession, load_error, no_spinning

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, never as log lines
    no_spinning(options)
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    options.enable_cpu_mem_arena = arena
    try:
        with limited("creating an onnxruntime session"):
            return OrtSession(ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                                   disabled_optimizers=["ConstantFolding"]))
    except LimitError:
        raise
    except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise load_error(path, first) from None
