"""Execution back-ends behind one small interface; see :mod:`bq_onnx.runtimes.base`."""

from __future__ import annotations

from bq_onnx.runtimes.base import Capabilities, Runtime, Session
from bq_onnx.runtimes.registry import get_runtime, runtime_names

__all__ = ["Capabilities", "Runtime", "Session", "get_runtime", "runtime_names"]
