"""bq-onnx: Bayesian mixed-precision weight quantization for ONNX models.

The public names load on first use (module ``__getattr__``), so ``import bq_onnx`` and the CLI's ``--help`` do
not pay for numpy, onnx and onnxruntime.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# onnx-ir logs what it recovers from (a failed shape inference, with its traceback) as warnings; with no handler
# configured, Python would print them on stderr. bq-onnx reports its own errors in one line: a null handler keeps
# them off the terminal, and an application that configures logging still receives them.
logging.getLogger("onnx_ir").addHandler(logging.NullHandler())

_PUBLIC = {
    "OptimizeConfig": "bq_onnx.config",
    "FolderResult": "bq_onnx.folders",
    "OptimizeResult": "bq_onnx.api",
    "Posterior": "bq_onnx.posterior",
    "estimate_posterior": "bq_onnx.distributed",  # the estimators' own, plus workers= and ray=
    "gradients": "bq_onnx.estimators",
    "inspect": "bq_onnx.inspect",
    "optimize": "bq_onnx.api",
    "optimize_folder": "bq_onnx.folders",
}

if TYPE_CHECKING:
    from bq_onnx.api import OptimizeResult, optimize
    from bq_onnx.config import OptimizeConfig
    from bq_onnx.distributed import estimate_posterior
    from bq_onnx.estimators import gradients
    from bq_onnx.folders import FolderResult, optimize_folder
    from bq_onnx.inspect import inspect
    from bq_onnx.posterior import Posterior

__all__ = ["FolderResult", "OptimizeConfig", "OptimizeResult", "Posterior", "__version__", "estimate_posterior",
           "gradients", "inspect", "optimize", "optimize_folder"]


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'bq_onnx' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """``bq_onnx.inspect`` is the function, as when this file imported it eagerly: importing the submodule of the
    same name must not replace it (the import system sets the submodule on its package)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
