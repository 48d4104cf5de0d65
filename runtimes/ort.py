"""onnxruntime (CPU here; CUDA/TensorRT/ROCm/MIGraphX providers when onnxruntime-gpu is installed)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import numpy as np

from bq_onnx.errors import BqError, DataError, LimitError, ModelError, UnsupportedError, UsageError
from bq_onnx.limits import limited
from bq_onnx.runtimes.base import Runtime, Session
from bq_onnx.runtimes.profiles import PROFILES

#: ``--ep`` short names -> onnxruntime execution provider names (full provider names are accepted as well).
EP_NAMES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


def provider_names(eps: str | list[str] | None) -> list[str]:
    """``"cuda,cpu"`` or ``["cuda"]`` -> onnxruntime provider names, in order; unknown short names are refused."""
    if eps is None:
        return ["CPUExecutionProvider"]
    items = [e.strip() for e in (eps.split(",") if isinstance(eps, str) else eps) if e.strip()]
    out = []
    for item in items:
        if item.endswith("ExecutionProvider"):
            out.append(item)
        elif item.lower() in EP_NAMES:
            out.append(EP_NAMES[item.lower()])
        else:
            raise UsageError(f"unknown execution provider '{item}' (known: {', '.join(EP_NAMES)})")
    return out or ["CPUExecutionProvider"]


def load_error(path: str | os.PathLike, first: str) -> BqError:
    """The error for a session onnxruntime cannot create: an op it does not know (a custom op whose library is
    not loaded) is not supported (exit 4, as the README says), anything else a model error (exit 3)."""
    unknown = re.search(r"([\w.]*:?\w+)\(-?\d+\) is not a registered function/op", first) or \
        re.search(r"Could not find an implementation for (\S+)", first)
    if unknown:
        return UnsupportedError(f"{path}: onnxruntime has no implementation of op {unknown.group(1)} (a custom op "
                                f"needs its runtime library); not supported")
    return ModelError(f"{path}: onnxruntime cannot load the model: {first}")


def no_spinning(options) -> None:
    """Idle intra-op threads of a session with ``options`` sleep instead of spinning between operators. Why: the
    measuring and checking sessions run while other work shares the cores; spinning threads burned 30 % more CPU
    and ran 20 % slower on MiniLM-L3 at load 7 on 2 cores (``benchmarks/speed.md``). The thread count and so the
    kernels' partitioning are unchanged: the same outputs, bit for bit (``tests/test_speed_reuse.py``)."""
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def _folds_too_much(path: str | os.PathLike) -> bool:
    """:func:`bq_onnx.runtimes.folding.folds_too_much` of the model at ``path`` (its graph only: external data
    is not read); False where it cannot be read (creating the session says why)."""
    import onnx_ir as ir

    from bq_onnx.runtimes.folding import folds_too_much

    try:
        return folds_too_much(ir.load(os.fspath(path)))
    except Exception:  # noqa: BLE001 - the session's own load reports an unreadable model
        return False


class OrtSession(Session):
    def __init__(self, session) -> None:
        self._session = session
        self.providers = list(session.get_providers())  # what onnxruntime really uses (it may fall back to CPU)
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        import onnxruntime as ort

        options = ort.RunOptions()
        try:  # the run limits (bq_onnx/limits.py): cancelled through the terminate flag at the deadline
            with limited("a run of the model in onnxruntime", cancel=lambda: setattr(options, "terminate", True)):
                return self._session.run(None, dict(feeds), options)
        except LimitError:
            raise
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise DataError(f"onnxruntime could not run the model on these inputs: {first}") from None


class OnnxRuntime(Runtime):
    name = "onnxruntime"
    capabilities = PROFILES["onnxruntime"]  # one source of truth: runtimes/profiles.py

    def __init__(self, providers: str | list[str] | None = None) -> None:
        self.providers = provider_names(providers)

    def available(self) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError as exc:
            return False, f"onnxruntime is not installed ({exc})"
        have = onnxruntime.get_available_providers()
        missing = [p for p in self.providers if p not in have]
        if missing:
            return False, (f"onnxruntime {', '.join(missing)} not available (this onnxruntime has: "
                           f"{', '.join(have)}; GPU providers need onnxruntime-gpu)")
        return True, ""

    def session(self, path: str | os.PathLike, *, exact: bool = True, threads: int | None = None,
                lean: bool = False, spin: bool = True) -> Session:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 4  # errors come back as exceptions, never as log lines
        if not spin:
            no_spinning(options)
        if exact:
            # Fused MatMulNBits otherwise quantizes activations to int8 (about 5e-3 relative error).
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        if threads:
            options.intra_op_num_threads = threads
        disabled = []
        if lean:
            # no prepacked copy of every MatMul weight: session creation held about twice a big fp32 weight
            # (issue 21); external data then stays a file mapping. For checks, not for timings.
            options.add_session_config_entry("session.disable_prepacking", "1")
            if _folds_too_much(path):  # packed codes decoded at each run instead of folded (runtimes/folding.py)
                disabled.append("ConstantFolding")
                options.enable_cpu_mem_arena = False
        try:
            with limited("creating an onnxruntime session"):
                return OrtSession(ort.InferenceSession(os.fspath(path), options, providers=self.providers,
                                                       disabled_optimizers=disabled))
        except LimitError:
            raise
        except Exception as exc:  # noqa: BLE001  onnxruntime raises its own exception types
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise load_error(path, first) from None
