"""A tiny model with every weight layout a rewrite handles, and its float64 numpy forward pass."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import make_model

RNG = np.random.default_rng(3)
WEIGHTS = {
    "E": RNG.standard_normal((12, 40)).astype(np.float32),  # Gather table
    "W": RNG.standard_normal((40, 24)).astype(np.float32),  # MatMul B, K = 40: ragged at block 16
    "G": RNG.standard_normal((8, 24)).astype(np.float32),  # Gemm transB, view (24, 8)
}


def layouts_model() -> onnx.ModelProto:
    """``y = Gemm(Relu((x + E[ids]) @ W), G, transB)``."""
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"]),
        helper.make_node("Add", ["x", "e"], ["xe"]),
        helper.make_node("MatMul", ["xe", "W"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "G"], ["y"], transB=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 40]),
                              helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])],
                      [numpy_helper.from_array(v, k) for k, v in WEIGHTS.items()])


def feeds(seed: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((3, 40)).astype(np.float32), "ids": np.array([0, 11, 5], np.int64)}


def forward(weights: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The model in float64 numpy with the given weights (the float ones, or the dequantized ones)."""
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    h = (inputs["x"].astype(np.float64) + w["E"][inputs["ids"]]) @ w["W"]
    return np.maximum(h, 0) @ w["G"].T
