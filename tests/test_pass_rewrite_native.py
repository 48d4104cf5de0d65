"""RewriteNativePass (passes/rewrite_native.py): quantized weights become standard decode ops, numbers exact."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from tests import passkit, tiny
from tests.written import run

INT = ir.DataType


def _rewritten(packed: bool = False, **settings):
    model, ctx = passkit.quantized_model(tiny.layouts_model(), format="native", group_size=16, min_size=64,
                                         **settings)
    ctx.derived = dataclasses.replace(ctx.derived, packed_codes=packed)  # as a budget containers cannot meet sets
    return passkit.rewrite(model, ctx), ctx


def _check_numbers(model: ir.Model, ctx) -> None:
    """onnxruntime on the rewritten graph computes the float64 forward pass of the numpy-dequantized weights."""
    feeds = tiny.feeds()
    expected = tiny.forward(passkit.dequantized(ctx), feeds)
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize(("quantizer", "bits", "container"), [
    ("uniform", 3, INT.UINT4), ("uniform-sym", 4, INT.INT4), ("uniform", 8, INT.UINT8), ("uniform-sym", 6, INT.INT8),
])
def test_uniform_weights_become_blocked_dequantize_linear(quantizer, bits, container):
    model, ctx = _rewritten(bits=bits, quantizer=quantizer)
    graph = model.graph
    assert not {"E", "W", "G"} & set(graph.initializers)
    dqs = [n for n in graph if n.op_type == "DequantizeLinear"]
    blocked = [n for n in dqs if "block_size" in n.attributes]
    assert len(blocked) == 3
    assert all(n.attributes["axis"].value == 0 and n.attributes["block_size"].value == 16 for n in blocked)
    assert {n.inputs[0].const_value.dtype for n in dqs} == {container}
    assert all((len(n.inputs) == 2) == (quantizer == "uniform-sym") for n in dqs)  # symmetric: no zero point
    # K = 40: two whole blocks of 16, and the ragged 8 rows per axis below them (nothing padded, nothing sliced)
    tails = [n for n in dqs if "block_size" not in n.attributes]
    assert tails and all(n.inputs[0].const_value.shape[0] == 8 and n.attributes["axis"].value == 1 for n in tails)
    assert not any(n.op_type == "Slice" for n in graph)
    assert all(n.inputs[1].producer().op_type == "Cast" for n in dqs)  # fp16 scales cast to float first
    _check_numbers(model, ctx)


@pytest.mark.parametrize("quantizer", ["uniform", "uniform-sym"])
def test_widths_without_a_container_of_their_size_are_packed_and_decoded_inline(quantizer):
    """3 bits on the default target under a budget containers cannot meet (int4 would store 4): codes and zero
    points packed at 3 bits, no local function, no DequantizeLinear, no BitwiseAnd (a byte lookup, which OpenVINO
    folds at load), its table built once for the graph however many layers read it."""
    model, ctx = _rewritten(packed=True, bits=3, quantizer=quantizer)
    graph = model.graph
    ops = {n.op_type for n in graph}
    assert "DequantizeLinear" not in ops and "BitwiseAnd" not in ops and not model.functions
    assert ops <= {"Reshape", "Cast", "Mul", "Floor", "Sub", "MatMul", "Slice", "Expand", "Transpose", "Concat",
                   "Add", "Conv", "Gemm", "Gather", "Relu", "Flatten", "Identity", "Shape", "Pad", "Range", "Split",
                   "Equal"}
    assert len(ctx.quantized) > 1 and sum(n.op_type == "Range" for n in graph) == 2  # built once: two Range
    for name, qt in ctx.quantized.items():
        packed = graph.initializers[f"{name}.bq_packed"].const_value
        stream = qt.codes.size + (qt.zero_point.size if quantizer == "uniform" else 0)  # zero points after codes
        assert packed.dtype == INT.UINT8 and packed.shape[0] == -(-stream // 8) * 3
        assert f"{name}.bq_zero" not in graph.initializers
        assert graph.initializers[f"{name}.bq_scale"].const_value.dtype == INT.FLOAT16
    assert all(r["packed_codes"] and r["dequantized_at_load"] for r in ctx.layers)
    _check_numbers(model, ctx)


def test_codebook_weights_decode_by_gather_without_dequantize_linear():
    model, ctx = _rewritten(bits=3, quantizer="nf")
    ops = [n.op_type for n in model.graph]
    assert "DequantizeLinear" not in ops and ops.count("Gather") >= 4  # one per codebook, plus the model's own
    assert not {"E", "W", "G"} & set(model.graph.initializers)
    _check_numbers(model, ctx)


def test_rewrite_needs_quantized_weights():
    ctx = passkit.context(min_size=64)
    model = passkit.find_weights(passkit.prepare(passkit.load(tiny.layouts_model()), ctx), ctx)
    with pytest.raises(AssertionError, match="must be quantized first"):
        passkit.rewrite(model, ctx)


@pytest.mark.parametrize("quantizer", ["uniform", "uniform-sym"])
def test_packed_recurrent_weights_fold_for_openvino(tmp_path, quantizer):
    """OpenVINO's LSTM takes constant weights only: the packed decode (one stream, codes viewed per block, a ragged
    last block padded: W has K = 24 rows in blocks of 16, R one block of 16) folds at load, and both runtimes
    compute the numpy-dequantized weights."""
    from onnx_ir import serde

    from tests.test_every_weight import _floats, _openvino, _replaced, recurrent_model

    proto = recurrent_model("LSTM")
    model, ctx = passkit.quantized_model(proto, format="native", group_size=16, min_size=64, bits=3,
                                         quantizer=quantizer)
    ctx.derived = dataclasses.replace(ctx.derived, packed_codes=True)
    model = passkit.rewrite(model, ctx)
    assert all(r["packed_codes"] for r in ctx.layers) and "Pad" in {n.op_type for n in model.graph}
    path = tmp_path / "q.onnx"
    path.write_bytes(serde.serialize_model(model).SerializeToString())
    feeds = {"x": _floats(5, 2, 24)}
    expected = run(_replaced(proto, passkit.dequantized(ctx)), feeds)
    for got in (run(path, feeds), _openvino(path, feeds)):
        for g, e in zip(got, expected, strict=True):
            assert float(np.abs(g.astype(np.float64) - e).max()) <= 1e-5 * max(float(np.abs(e).max()), 1e-3)
