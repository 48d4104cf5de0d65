"""An Olive pass that runs ``bq-onnx optimize`` inside an Olive workflow (the ``olive`` extra: ``olive-ai``).

Olive finds a pass class through its package configuration (``olive_config.json``: pass type -> ``module_path``),
which has no plug-in entry point; :func:`package_config` is Olive's own configuration with this pass added, and
:func:`run` hands it to ``olive.workflows.run``. In a workflow the pass is ``{"type": "BqOnnxQuantization",
"recipe": "recipe.toml", "options": {"bits": 4}, "calib": "calib.npz"}``: a recipe path and/or inline options with
the flags' names (the options override the recipe, as flags do), calibration data, and whether to verify the
written model. The output is written by bq-onnx's write protocol and carries its provenance (README, "Olive").
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from olive.common.config_utils import ParamCategory
from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

#: The pass type a workflow names, and where Olive imports it from.
PASS_TYPE = "BqOnnxQuantization"
MODULE_PATH = "bq_onnx.olive_pass.BqOnnxQuantization"


class BqOnnxQuantization(Pass):
    """Quantize an ONNX model's weights with bq-onnx (Bayesian mixed precision under a global bit budget)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "recipe": PassConfigParam(
                type_=str | None, category=ParamCategory.PATH,
                description="A bq-onnx recipe (TOML; `bq-onnx optimize --print-config` writes one): every option of "
                            "optimize by its flag's name without --."),
            "options": PassConfigParam(
                type_=dict, default_value={},
                description="Options of bq-onnx optimize by name ({\"bits\": 4, \"group_size\": \"auto\"}); they "
                            "override the recipe, as flags do."),
            "calib": PassConfigParam(
                type_=str | None, category=ParamCategory.DATA,
                description="Calibration data (.npz keyed by input name, or a folder of them) for the posterior; "
                            "without it the allocation uses the weights alone."),
            "verify": PassConfigParam(
                type_=bool, default_value=True,
                description="Check the written model in onnxruntime against the numpy-dequantized reference and the "
                            "float model before it is handed on."),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        from bq_onnx.api import optimize

        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"{PASS_TYPE} takes an ONNX model, got {type(model).__name__}")
        source = Path(model.model_path)
        out = Path(resolve_onnx_path(output_model_path, source.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        result = optimize(source, config.recipe, calib=config.calib, **dict(config.options or {}))
        result.save(out, force=True, verify=config.verify)
        return ONNXModelHandler(model_path=os.fspath(out.parent), onnx_file_name=out.name)


def package_config() -> dict[str, Any]:
    """Olive's package configuration with :class:`BqOnnxQuantization` added (give it to ``olive.workflows.run``)."""
    from olive.package_config import OlivePackageConfig

    with open(OlivePackageConfig.get_default_config_path()) as f:
        data = json.load(f)
    data["passes"][PASS_TYPE] = {"module_path": MODULE_PATH, "supported_providers": ["*"],
                                 "supported_accelerators": ["*"], "supported_precisions": ["*"],
                                 "supported_algorithms": [], "supported_quantization_encodings": []}
    return data


def run(workflow: str | os.PathLike | dict[str, Any], **kwargs: Any) -> Any:
    """``olive.workflows.run`` with this pass known: a workflow (a JSON/YAML path or a dict) may name
    ``"type": "BqOnnxQuantization"`` among its passes."""
    from olive.workflows import run as olive_run

    return olive_run(workflow, package_config=package_config(), **kwargs)
