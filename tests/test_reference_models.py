"""The shipped reference models: recorded accuracy holds, 4-bit sizes meet the bound, both runtimes agree."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

import bq_onnx
from bq_onnx.model_io import save_model
from bq_onnx.runtimes import get_runtime
from bq_onnx.verify import reference_model
from tests.conftest import MODELS

NAMES = ("lenet", "digits_mlp")


def _data(name: str) -> dict:
    with np.load(MODELS / f"{name}_data.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name", NAMES)
def test_recorded_fp32_accuracy_reproduces(name):
    data = _data(name)
    logits = get_runtime("onnxruntime").session(MODELS / f"{name}.onnx").run({"input": data["test_input"]})[0]
    recorded = json.loads((MODELS / "accuracy.json").read_text())[name]["fp32_test_accuracy"]
    assert (logits.argmax(1) == data["test_labels"]).mean() == pytest.approx(recorded, abs=1e-9)


def test_lenet_compact_4bit_is_within_6_percent_of_the_payload_bound(tmp_path):
    result = bq_onnx.optimize(MODELS / "lenet.onnx", bits=4, format="compact", bits_payload=True)
    result.save(tmp_path / "lenet.onnx")
    t = result.report["totals"]
    bound = t["original_bytes"] * 4 / 32 + t["metadata_bits"] / 8
    assert t["stored_bytes"] <= 1.06 * bound, (t["stored_bytes"], bound)
    assert t["bits_per_weight"] == 4.0


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fmt", ["native", "compact"])
def test_both_runtimes_match_the_numpy_reference(tmp_path, name, fmt):
    data = _data(name)
    feeds = {"input": data["test_input"][:64]}
    # native: 6 bits, its cheapest width (int4 plus scales at group 32) stores over 5
    result = bq_onnx.optimize(MODELS / f"{name}.onnx", bits=6 if fmt == "native" else 4, format=fmt)
    out = tmp_path / "q.onnx"
    result.save(out, feeds=feeds)
    ref = tmp_path / "ref.onnx"
    save_model(reference_model(result.source, result.context), ref)
    expected = get_runtime("onnxruntime").session(ref).run(feeds)[0]
    for runtime in ("onnxruntime", "openvino"):
        got = get_runtime(runtime).session(out, exact=True).run(feeds)[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())
    accuracy = (get_runtime("onnxruntime").session(out).run({"input": data["test_input"]})[0].argmax(1)
                == data["test_labels"]).mean()
    assert accuracy > 0.95


def test_optimize_accepts_an_ir_model_and_keeps_it():
    model = ir.load(MODELS / "lenet.onnx")
    result = bq_onnx.optimize(model, bits=3, bits_payload=True)
    assert result.report["totals"]["bits_per_weight"] == 3.0
    assert all(v.dtype == ir.DataType.FLOAT for v in model.graph.initializers.values())
