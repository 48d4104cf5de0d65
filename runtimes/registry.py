"""Runtime adapters by name. Apart from the interface (:mod:`bq_onnx.runtimes.base`), which the adapters import,
so the interface never imports an adapter; each adapter (and its runtime library) loads only when asked for."""

from __future__ import annotations

from bq_onnx.errors import UnsupportedError, UsageError
from bq_onnx.runtimes.base import Runtime


def runtime_names() -> list[str]:
    return ["onnxruntime", "openvino"]


def get_runtime(name: str, provider: str | None = None) -> Runtime:
    """The adapter for ``name``; ``provider`` picks an onnxruntime execution provider (``--ep`` name)."""
    if name in ("onnxruntime", "ort"):
        from bq_onnx.runtimes.ort import OnnxRuntime

        return OnnxRuntime(providers=[provider] if provider else None)
    if provider and provider.lower() not in ("cpu", "cpuexecutionprovider"):
        raise UsageError(f"execution provider '{provider}' applies to onnxruntime only, not to {name}")
    if name in ("openvino", "ov"):
        from bq_onnx.runtimes.ov import OpenVinoRuntime

        return OpenVinoRuntime()
    raise UnsupportedError(f"unknown runtime '{name}' (known: {', '.join(runtime_names())})")
