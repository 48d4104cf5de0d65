"""The tables and the guard hold a slice of a weight, not copies of it (issue 21: peak memory within 1.5 x model
+ 1 GiB at default options).

At default options a 64 MiB weight peaked at 2.68 GiB (``benchmarks/streaming_memory.md``): the tables held the
decoded weight, its float64 error and their squares at once, and every guard candidate with bit-packed codes was
run in onnxruntime, whose decode of those codes (constant-folded or not) holds float intermediates of about
20x the weight. numpy's allocations are traced by ``tracemalloc``; onnxruntime's are not, so the guard's side is
checked by what it opens sessions on.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest

import bq_onnx
from bq_onnx import quantizers
from bq_onnx.qtensor import QuantizedPieces, take_columns
from bq_onnx.runtimes import folding
from bq_onnx.runtimes.sessions import TempSessions
from bq_onnx.stages import guard, tables
from tests.conftest import MODELS, matmul_readout

LENET = MODELS / "lenet.onnx"


def _peak(fn):
    """(fn(), the most bytes numpy held at once above what it held before)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


class _Info:
    name = "w"


class _Ctx:
    posterior = None


@pytest.mark.parametrize("weighted", [False, True])
def test_the_tables_sum_a_weights_loss_slice_by_slice(monkeypatch, weighted):
    rng = np.random.default_rng(0)
    view = rng.standard_normal((512, 4096)).astype(np.float32)  # 8 MiB
    importance = rng.random(view.shape) if weighted else None
    spec = quantizers.candidates("uniform", 0.0, 3, view.size)[0]
    qt = quantizers.quantize_spec(view, 3, spec, 32, importance, seed=0)
    err = (qt.dequantize().astype(np.float64) - view) ** 2  # the whole-tensor formula, an independent reference
    expected = (err * importance if weighted else err).sum(axis=0)
    del err
    monkeypatch.setattr(tables, "LOSS_CHUNK_BYTES", 256 << 10)
    got, peak = _peak(lambda: tables._Scorer(_Ctx())._column_losses(_Info(), view, qt, importance))
    assert np.array_equal(got, expected)  # the same sums, in the same order
    # the whole-tensor formula held the decoding's temporaries, the float64 error and the squares: 8x the view
    assert peak < 0.5 * view.nbytes, peak / view.nbytes


def test_a_mixed_weight_decodes_into_one_array():
    rng = np.random.default_rng(1)
    view = rng.standard_normal((256, 4096)).astype(np.float32)
    pieces = []
    for i, bits in enumerate((2, 3, 4, 8, 5, 3, 2, 6)):  # decoding one piece holds about 5x the piece
        a, b = i * 512, (i + 1) * 512
        spec = quantizers.candidates("uniform", 0.0, bits, view.size)[0]
        pieces.append((a, b, quantizers.quantize_spec(view[:, a:b], bits, spec, 32, None, seed=0)))
    mixed = QuantizedPieces(view.shape, tuple(pieces))
    expected = np.concatenate([qt.dequantize() for _, _, qt in pieces], axis=1)
    got, peak = _peak(mixed.dequantize)
    assert np.array_equal(got, expected)
    assert peak < 2 * view.nbytes, peak / view.nbytes  # decoded pieces, then joined: twice the weight and more


def test_folded_decode_bytes_counts_packed_codes_not_containers():
    result = bq_onnx.optimize(LENET, bits=3, no_guard=True)  # int4 layers mixed with packed 3- and 2-bit ones
    assert any(layer.get("packed_codes") for layer in result.report["layers"])
    packed = result.model
    packed_bytes = sum(v.const_value.nbytes for v in packed.graph.initializers.values()
                       if v.const_value.dtype == ir.DataType.UINT8)
    codes = sum(v.const_value.nbytes for v in packed.graph.initializers.values()
                if v.const_value.dtype in (ir.DataType.UINT8, ir.DataType.UINT4))  # a small layer's int4 codes cast
    assert 0 < 32 * packed_bytes <= folding.folded_decode_bytes(packed) <= 32 * codes
    w = np.random.default_rng(3).standard_normal((256, 128)).astype(np.float32)
    containers = bq_onnx.optimize(matmul_readout(w), bits=4, allocator="uniform", no_guard=True).model
    assert {n.op_type for n in containers.graph} >= {"DequantizeLinear"}  # int4 codes onnxruntime never folds
    assert folding.folded_decode_bytes(containers) == 0


def test_the_guard_feeds_decoded_weights_instead_of_decoding_packed_codes_in_onnxruntime(monkeypatch):
    reference = bq_onnx.optimize(LENET, bits=3)  # small: its candidates run in onnxruntime as written
    opened = []
    open_session = TempSessions.open

    def recording_open(self, model):
        opened.append(folding.folded_decode_bytes(model))
        return open_session(self, model)

    monkeypatch.setattr(TempSessions, "open", recording_open)
    monkeypatch.setattr(guard, "folds_too_much", lambda model: folding.folded_decode_bytes(model) > 0)
    fed = bq_onnx.optimize(LENET, bits=3)
    assert opened and not any(opened)  # no session of a model with packed codes: the FP32 model, fed
    g, r = fed.report["guard"], reference.report["guard"]
    assert g["result"] == r["result"] and fed.report["allocation"] == reference.report["allocation"]
    for key in ("first", "uniform"):  # the same losses up to float32 summation order
        assert g[key]["measured_loss"] == pytest.approx(r[key]["measured_loss"], rel=1e-4)
    assert ir.to_proto(fed.model).SerializeToString() == ir.to_proto(reference.model).SerializeToString()


def test_the_guard_hands_back_the_fp32_pages_before_a_fed_run_and_writes_the_same(monkeypatch):
    """A candidate fed all its weights decoded reads none of the FP32 model's: the pages the probes read of them are
    handed back first (issue 21: 1x the model beside the decoded candidate at 1 GiB); the output is the same."""
    with np.load(MODELS / "lenet_calib.npz") as data:
        calib = {"input": data["input"][:64]}
    monkeypatch.setattr(guard, "folds_too_much", lambda model: True)  # every candidate fed decoded
    reference = bq_onnx.optimize(LENET, bits=3, calib=calib)
    called, real = [], guard.page_out_sessions
    monkeypatch.setattr(guard, "page_out_sessions", lambda: called.append(real()))
    monkeypatch.setattr(guard, "PAGE_OUT_BYTES", 0)
    paged = bq_onnx.optimize(LENET, bits=3, calib=calib)
    assert len(called) >= 2  # the allocation and uniform at least
    assert ir.to_proto(paged.model).SerializeToString() == ir.to_proto(reference.model).SerializeToString()


def test_take_columns_is_what_the_tables_decode():
    rng = np.random.default_rng(2)
    view = rng.standard_normal((64, 100)).astype(np.float32)
    spec = quantizers.candidates("uniform", 0.01, 3, view.size)[0]  # outliers: their indexes move with the slice
    qt = quantizers.quantize_spec(view, 3, spec, 32, None, seed=0)
    assert np.array_equal(np.concatenate([take_columns(qt, a, min(a + 30, 100)).dequantize()
                                          for a in range(0, 100, 30)], axis=1), qt.dequantize())


@pytest.mark.parametrize("bits", [1, 3, 5, 8])
def test_codes_are_packed_slice_by_slice(monkeypatch, bits):
    from bq_onnx import packing

    codes = np.random.default_rng(4).integers(0, 1 << bits, 1_000_003).astype(np.uint8)
    flat = np.zeros(-(-codes.size // 8) * 8, dtype=np.uint8)
    flat[:codes.size] = codes
    # an independent reference: value i's bit j is bit i * bits + j of the little-endian stream
    stream = ((flat[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    expected = (stream.reshape(-1, 8) << np.arange(8)).sum(axis=1).astype(np.uint8)
    monkeypatch.setattr(packing, "PACK_CHUNK", 1 << 16)
    got, peak = _peak(lambda: packing.pack_bits(codes, bits))
    assert np.array_equal(got, expected)
    # the packed bytes and a slice's temporaries; the whole bit matrix was 8 bytes per code and more
    assert peak < got.nbytes + 1.5 * codes.nbytes, peak / codes.nbytes
