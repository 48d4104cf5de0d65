"""Linear time in graph size (issue 21): loading with validation, the target validator, the weight survey and
inspect on a chain of N nodes cost CPU time proportional to N.

CPU time of this process (``time.process_time``), not wall time: other work on the machine does not move it.
10x the nodes must cost under 25x the time (linear is 10x, quadratic 100x); the benchmark
``python -m benchmarks.graph_scale`` measures the same paths at 1e5 and 1e6 nodes.
"""

from __future__ import annotations

import time

import onnx

from benchmarks.graph_scale import chain
from bq_onnx.config import WeightsConfig
from bq_onnx.inspect import inspect
from bq_onnx.model_io import load_model
from bq_onnx.stages.weights import survey
from bq_onnx.validate import validate

SMALL, FACTOR, BOUND = 1500, 10, 25


def _cost(tmp_path, nodes: int) -> float:
    path = tmp_path / f"chain{nodes}.onnx"
    onnx.save(chain(nodes), str(path))
    start = time.process_time()
    model = load_model(path)
    assert not validate(model, "onnxruntime")
    found = survey(model, WeightsConfig())
    assert [w.name for w in found.weights] == ["W"]
    assert inspect(path)["totals"]["layers"] == 1
    return time.process_time() - start


def test_graph_paths_are_linear_in_nodes(tmp_path):
    _cost(tmp_path, 200)  # imports and first-call caches out of the measurement
    small = _cost(tmp_path, SMALL)
    large = _cost(tmp_path, SMALL * FACTOR)
    assert large < BOUND * small, (small, large)
