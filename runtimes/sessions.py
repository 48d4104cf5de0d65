"""onnxruntime sessions for the estimators and the measured passes: opened from temporary model files (sessions
load from paths; models over 2 GB need one), and for big models without a copy of the weights. Every session
is created and run under the run limits (:mod:`bq_onnx.limits`: ``--run-timeout``, ``--max-memory``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from bq_onnx.errors import LimitError
from bq_onnx.limits import limited
from bq_onnx.model_io import model_nbytes, save_model
from bq_onnx.runtimes.base import Session
from bq_onnx.runtimes.registry import get_runtime

#: Models with more bytes of initializers than this get :func:`unpacked_session` sessions.
UNPACKED_SESSION_BYTES = 512 * 2**20


class TempSessions:
    """Sessions over temporary files, removed by :meth:`close`."""

    def __init__(self, threads: int | None = None) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="bq-post-")
        self._count = 0
        self.threads = threads

    def open(self, model: ir.Model) -> Session:
        self._count += 1
        path = Path(self._tmp.name) / f"m{self._count}.onnx"
        save_model(model, path)
        if model_nbytes(model) > UNPACKED_SESSION_BYTES:
            return unpacked_session(path, self.threads)
        return get_runtime("onnxruntime").session(path, exact=True, threads=self.threads)

    def close(self) -> None:
        self._tmp.cleanup()


def unpacked_session(path: str | os.PathLike, threads: int | None = None) -> Session:
    """An onnxruntime CPU session (as ``get_runtime("onnxruntime").session(path, exact=True)``) that holds no
    copy of the weights: onnxruntime memory-maps the external data file and reads the weights from there.

    Two optimizations would copy them. Pre-packing copies every MatMul/Gemm weight into a packed buffer while
    the mapping is still open (measured on the 128 MiB scale-benchmark model: gradient session peak +150 MiB
    unpacked, +290 MiB packed). Constant folding stores ``Transpose(W)`` of every weight a gradient graph reads
    transposed as a new initializer (measured on the 1 GiB model: +450 MiB resident with folding, +40 MiB
    without). Neither changes the speed of these graphs measurably (3 batches of 32: 1.54 s / 1.56 s).
    Unpacked kernels round differently from packed ones (float32 sums in another order: per-element curvatures
    differ by up to 0.5 % where a sample's output gradients nearly cancel), so models up to
    :data:`UNPACKED_SESSION_BYTES` keep the runtime's usual sessions and their results."""
    import onnxruntime as ort

    from bq_onnx.runtimes.ort import OrtSession, load_error

    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions, never as log lines
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.add_session_config_entry("session.disable_prepacking", "1")
    if threads:
        options.intra_op_num_threads = threads
    try:
        with limited("creating an onnxruntime session"):
            return OrtSession(ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"],
                                                   disabled_optimizers=["ConstantFolding"]))
    except LimitError:
        raise
    except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise load_error(path, first) from None
