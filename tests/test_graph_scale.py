"""Linear time in graph size (issue 21): loading with validation, the target validator, the weight survey,
inspect, and a whole optimize with its write on a chain of N nodes cost CPU time proportional to N.

CPU time of this process (``time.process_time``), not wall time: other work on the machine does not move it.
10x the nodes must cost under 25x the time (linear is 10x, quadratic 100x); the benchmark
``python -m benchmarks.graph_scale`` measures the same paths at 1e5 and 1e6 nodes.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.graph_scale import chain
from bq_onnx import api
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


def _optimize_cost(tmp_path, nodes: int) -> float:
    path = tmp_path / f"chain{nodes}.onnx"
    onnx.save(chain(nodes), str(path))
    start = time.process_time()
    result = api.optimize(path, bits=8, allocator="uniform")
    result.save(tmp_path / f"out{nodes}.onnx", verify=False, force=True)
    return time.process_time() - start


def test_optimize_and_write_are_linear_in_nodes(tmp_path):
    """Every pass (prepare with its opset conversion, weights, allocation, rewrite, sort), the provenance hashes
    and the write: one rescan of the graph per node would make 10x the nodes cost 100x."""
    _optimize_cost(tmp_path, 200)
    small = _optimize_cost(tmp_path, SMALL)
    large = _optimize_cost(tmp_path, SMALL * FACTOR)
    assert large < BOUND * small, (small, large)


def matmuls(nodes: int) -> onnx.ModelProto:
    """A chain of ``nodes`` MatMuls, each with its own 8x8 weight: as many weights as nodes (a pass that walks
    the graph once per weight is quadratic here, not on :func:`chain`'s single weight)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"W{i}") for i in range(nodes)]
    names = ["x", *(f"h{i}" for i in range(1, nodes)), "y"]
    graph = helper.make_graph([helper.make_node("MatMul", [names[i], f"W{i}"], [names[i + 1]]) for i in range(nodes)],
                              "matmuls", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    return model


def _graph_walks(tmp_path, monkeypatch, model: onnx.ModelProto, name: str) -> int:
    """Nodes handed out by ``ir.Graph.__iter__`` (every pass's ``for node in graph``) in one optimize and write."""
    seen = [0]
    plain = ir.Graph.__iter__

    def counted(graph):
        seen[0] += len(graph)
        return plain(graph)

    path = tmp_path / f"{name}.onnx"
    onnx.save(model, str(path))
    with monkeypatch.context() as patch:
        patch.setattr(ir.Graph, "__iter__", counted)
        api.optimize(path, bits=4, allocator="uniform", min_size=16).save(tmp_path / f"{name}.bq.onnx",
                                                                           verify=False)
    return seen[0]


@pytest.mark.parametrize("graph", [chain, matmuls])
def test_optimize_walks_the_graph_a_fixed_number_of_times(tmp_path, monkeypatch, graph):
    """Deterministic where timing is not: the node visits of the whole optimize grow with the nodes, not with
    their square (a pass that walks the graph once per node or per weight would make 10x the nodes 100x the
    visits; the rewrite's postcondition did, once per weight, until issue 21)."""
    small, large = (_graph_walks(tmp_path, monkeypatch, graph(n), f"{graph.__name__}{n}") for n in (60, 600))
    assert small > 60  # the count sees the passes' walks
    assert large < 1.2 * FACTOR * small, (small, large)


@pytest.mark.parametrize("collector_on", [True, False])
def test_inspect_surveys_once_without_the_collector(tmp_path, monkeypatch, collector_on):
    """Inspect builds the protobuf view of a float model once (the count without a reference reuses the report's
    survey: a second view of a 1e6-node graph was seconds and a gigabyte of cycles) and runs with the cyclic
    collector off (full collections re-scanned the live view: the part of its time that grew faster than the
    nodes), leaving the collector as it found it."""
    import gc

    from bq_onnx import proto_graph

    built, collecting = [], []
    plain = proto_graph.build

    def counted(graph, scopes=None):
        built.append(graph.name)
        collecting.append(gc.isenabled())
        return plain(graph, scopes)

    path = tmp_path / "chain.onnx"
    onnx.save(chain(40), str(path))
    monkeypatch.setattr(proto_graph, "build", counted)
    was = gc.isenabled()
    (gc.enable if collector_on else gc.disable)()
    try:
        assert inspect(path)["counted"]["against"] == "quantized ops"
        assert gc.isenabled() is collector_on
    finally:
        (gc.enable if was else gc.disable)()
    assert built == ["chain"] and collecting == [False]
