"""What opening a packed output costs: the bytes of every value the runtimes fold to constants at load.

onnxruntime keeps every folded intermediate until its constant-folding pass ends, so the sum of their sizes is the
memory a packed decode adds to opening the model (``benchmarks/load_cost.md``). Unpacking bit by bit in float
held about 115 bytes per weight at 3 bits (native; 90 compact); the byte lookup holds about a third of that.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.inliner
import onnxruntime as ort
import pytest
from onnx import helper

import bq_onnx
from tests.test_containers import matmul_readout

BYTES_PER_WEIGHT = 40
"""The most a 3-bit packed weight may hold in folded values per weight (measured: 30-32 native, 36-37 compact;
before the byte lookup 114-117 native, 76-90 compact)."""


def folded_bytes(path: str) -> int:
    """Bytes of every value computed from initializers alone (what constant folding materializes), measured by
    running the model with each of them as an output (local functions inlined first, as the runtimes do)."""
    model = onnx.load(path)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    known = {t.name for t in model.graph.initializer}
    folded = []
    for node in model.graph.node:
        if all(not name or name in known for name in node.input):
            outputs = [name for name in node.output if name]
            known.update(outputs)
            folded += outputs
    del model.graph.output[:]
    model.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in folded)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: np.zeros([d if isinstance(d, int) else 1 for d in i.shape], np.float32)
             for i in session.get_inputs()}
    return sum(np.asarray(v).nbytes for v in session.run(folded, feeds))


@pytest.mark.parametrize("quantizer", ["uniform", "uniform-sym"])
@pytest.mark.parametrize("fmt", ["native", "compact"])
def test_a_packed_decode_folds_through_small_intermediates(tmp_path, fmt, quantizer):
    w = (np.random.default_rng(0).standard_normal((256, 256)) * 0.05).astype(np.float32)
    meta = (16 + (3 if quantizer == "uniform" else 0)) / 32 + 0.5  # as tests/test_containers.py: forces packing
    result = bq_onnx.optimize(matmul_readout(w), bits=3 + meta, quantizer=quantizer, group_size=32, min_size=1,
                              allowed_bits=(3,), no_guard=True, format=fmt)
    path = tmp_path / "q.onnx"
    result.save(path)  # verified: decodes to the numpy reference exactly
    assert result.context.quantized["W"].bits == 3
    if fmt == "native":
        assert result.context.derived.packed_codes
    model = onnx.load(str(path))
    assert sum(n.op_type == "Range" for n in model.graph.node) == 2  # the table, built in the graph once
    assert not any(n.op_type == "Range" for f in model.functions for n in f.node)  # a decode function's input
    assert folded_bytes(str(path)) / w.size <= BYTES_PER_WEIGHT


def test_a_weight_with_packed_pieces_is_still_split_into_fused_matmuls(tmp_path):
    """Pieces of one MatMul weight (int4 slices beside 3-bit packed ones) each feed their own MatMul
    (``passes/split_matmul.py``), so the int4 ones stay DequantizeLinear that onnxruntime fuses: the packed decode
    is about 20 ops deep through its byte table, and a piece's walk back to the constants stopped at 16 before
    (the whole weight was then one float MatMul, its int4 pieces decoded by arithmetic)."""
    w = (np.random.default_rng(1).standard_normal((1024, 2048)) * 0.05).astype(np.float32)
    result = bq_onnx.optimize(matmul_readout(w), bits=3.9, group_size=32, min_size=1, no_guard=True,
                              granularity="rows:512")  # a few pieces, each big enough to be split off
    path = tmp_path / "q.onnx"
    result.save(path)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert result.context.derived.packed_codes and "Gather" in ops  # packed pieces are there
    assert ops.count("DequantizeLinear") >= 1 and ops.count("MatMul") > 2  # one MatMul per piece (and the table's)
