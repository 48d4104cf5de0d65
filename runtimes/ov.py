"""OpenVINO (CPU). Model-local functions are inlined first: OpenVINO's ONNX reader rejects them."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner

from bq_onnx.errors import LimitError, ModelError
from bq_onnx.limits import limited
from bq_onnx.runtimes.base import Runtime, Session
from bq_onnx.runtimes.profiles import PROFILES

#: f32 compute and no dynamic activation quantization: OpenVINO's CPU defaults are bf16 and int8 activations.
EXACT_CONFIG = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


class OvSession(Session):
    """Inputs and outputs are matched by position with the ONNX graph's (OpenVINO keeps the order but may merge
    tensor names through ops it eliminates, so its own names are not reliable)."""

    def __init__(self, compiled, input_names: list[str], output_names: list[str]) -> None:
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self.input_names = input_names
        self.output_names = output_names

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        # np.asarray keeps 0-d feeds 0-d (ascontiguousarray would make them 1-d, which OpenVINO rejects)
        by_position = {i: np.asarray(feeds[name], order="C") for i, name in enumerate(self.input_names)}
        # the run limits (bq_onnx/limits.py): OpenVINO cannot cancel a running request, so a run past the deadline
        # ends in the hard stop
        with limited("a run of the model in OpenVINO"):
            self._request.start_async(by_position)
            self._request.wait()
        return [np.array(self._request.get_output_tensor(i).data) for i in range(len(self._compiled.outputs))]


class OpenVinoRuntime(Runtime):
    name = "openvino"
    capabilities = PROFILES["openvino"]  # one source of truth: runtimes/profiles.py

    def available(self) -> tuple[bool, str]:
        try:
            import openvino  # noqa: F401
        except ImportError as exc:
            return False, f"openvino is not installed ({exc}); pip install 'bq-onnx[openvino]'"
        return True, ""

    def session(self, path: str | os.PathLike, *, exact: bool = True, threads: int | None = None,
                lean: bool = False, spin: bool = True) -> Session:
        import openvino as ov

        ok, why = self.available()
        if not ok:
            raise ModelError(why)
        core = ov.Core()
        config = dict(EXACT_CONFIG) if exact else {}
        if threads:
            config["INFERENCE_NUM_THREADS"] = str(threads)
        path = Path(path)
        proto = onnx.load(os.fspath(path), load_external_data=False)
        initializers = {t.name for t in proto.graph.initializer}
        input_names = [v.name for v in proto.graph.input if v.name not in initializers]
        output_names = [v.name for v in proto.graph.output]
        try:
            with limited("creating an OpenVINO session"):
                compiled = self._compile(core, path, proto, config)
        except LimitError:
            raise
        except Exception as exc:  # noqa: BLE001  OpenVINO raises RuntimeError with long C++ traces
            first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{path}: OpenVINO cannot load the model: {first}") from None
        return OvSession(compiled, input_names, output_names)

    @staticmethod
    def _compile(core, path: Path, proto, config: dict):
        """Read and compile ``path`` (local functions inlined first: OpenVINO's reader rejects them)."""
        if not proto.functions:
            return core.compile_model(core.read_model(os.fspath(path)), "CPU", config)
        with tempfile.TemporaryDirectory() as tmp:
            full = onnx.load(os.fspath(path))
            inlined = onnx.inliner.inline_local_functions(full)
            del inlined.functions[:]
            kept = [op for op in inlined.opset_import if op.domain in ("", "ai.onnx")]
            del inlined.opset_import[:]
            inlined.opset_import.extend(kept)
            tmp_path = Path(tmp) / path.name
            onnx.save(inlined, os.fspath(tmp_path))
            return core.compile_model(core.read_model(os.fspath(tmp_path)), "CPU", config)
