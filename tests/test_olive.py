"""The Olive pass (issue 20 item 4): a two-pass Olive workflow, Olive's own peephole optimizer then bq-onnx.

Skipped (with the reason) only when olive-ai is not installed (``pip install -e ".[olive]"``; the test extra has
it). The workflow runs on ``models/lenet.onnx`` with a recipe file and inline options; the model Olive hands back
must be bq-onnx's output (its provenance names the recipe), within the budget, and close to the float model.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")  # no usage reports from a test run
pytest.importorskip("olive", reason="olive-ai not installed (pip install -e '.[olive]')")

from bq_onnx import recipe  # noqa: E402
from bq_onnx.config import OptimizeConfig  # noqa: E402
from bq_onnx.olive_pass import PASS_TYPE, package_config, run  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"


def _session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_package_config_adds_the_pass_to_olives_own():
    from olive.package_config import OlivePackageConfig

    config = OlivePackageConfig.parse_file_or_obj(package_config())
    assert "onnxpeepholeoptimizer" in config.passes  # Olive's own passes are kept
    assert config.import_pass_module(PASS_TYPE).__name__ == PASS_TYPE


def test_two_pass_olive_workflow_ends_in_a_bq_onnx_model(tmp_path):
    recipe_file = tmp_path / "recipe.toml"
    recipe_file.write_text('bits = 4.0\nformat = "compact"\n')
    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(MODELS / "lenet.onnx")},
        "systems": {"local": {"type": "LocalSystem",
                              "accelerators": [{"device": "cpu", "execution_providers": ["CPUExecutionProvider"]}]}},
        "passes": {
            "peephole": {"type": "OnnxPeepholeOptimizer"},
            "bq": {"type": PASS_TYPE, "recipe": str(recipe_file), "options": {"group_size": 64},
                   "calib": str(MODELS / "lenet_calib.npz")},
        },
        "host": "local",
        "target": "local",
        "cache_dir": str(tmp_path / "cache"),
        "output_dir": str(tmp_path / "out"),
        "log_severity_level": 3,
    }
    output = run(workflow)
    best = output.get_best_candidate()
    assert best is not None
    path = Path(best.model_path)
    path = path if path.suffix == ".onnx" else next(path.glob("*.onnx"))
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    # bq-onnx wrote it, from the recipe file with the inline option on top, after Olive's pass
    assert recipe.config_from_text(meta["bq_onnx.recipe"], "x") == OptimizeConfig().replace(
        bits=4.0, format="compact", group_size=64)
    assert meta["bq_onnx.calibration_sha256"] != "none"
    assert meta["bq_onnx.model_sha256"] != _sha256(MODELS / "lenet.onnx")  # the input was Olive's peephole output
    from bq_onnx.inspect import inspect

    assert inspect(path)["counted"]["bits_per_weight"] <= 4.0 + 1e-9
    data = np.load(MODELS / "lenet_data.npz")
    x = data["test_input"][:64]
    name = _session(MODELS / "lenet.onnx").get_inputs()[0].name
    ref = _session(MODELS / "lenet.onnx").run(None, {name: x})[0]
    got = _session(path).run(None, {name: x})[0]
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) >= 0.9


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
