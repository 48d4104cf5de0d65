"""Every bit width and quantizer round-trips exactly through both storage formats and both runtimes.

The model ``y = x @ W`` fed with ``x = I`` returns the decoded weight itself, so what the runtime decodes is
compared bit for bit with ``QuantizedTensor.dequantize()`` and the stored codes with the numpy codes.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

import bq_onnx
from bq_onnx.packing import unpack_bits
from bq_onnx.quantizers import METHODS
from bq_onnx.runtimes import get_runtime
from tests.conftest import ALL_WIDTHS, matmul_readout

FORMATS = ("native", "compact")


def _readout(tmp_path, w, bits, method, group, fmt, runtime="onnxruntime"):
    result = bq_onnx.optimize(matmul_readout(w), bits=bits, quantizer=method, group_size=group, format=fmt,
                              min_size=1, allocator="uniform", allowed_bits=ALL_WIDTHS)  # 1 bit is opt-in
    path = tmp_path / f"{fmt}-{method}-{bits}.onnx"
    result.save(path, verify=False, force=True)
    qt = result.context.quantized["W"]
    eye = np.eye(w.shape[0], dtype=np.float32)
    decoded = get_runtime(runtime).session(path, exact=True).run({"x": eye})[0]
    return path, qt, decoded


def _stored_codes(path, qt) -> np.ndarray:
    """Read the codes back from the file, independently of the decode graph."""
    tensors = {t.name: t for t in onnx.load(str(path)).graph.initializer}
    k, n = qt.shape
    if "W.bq_packed" in tensors:
        packed = numpy_helper.to_array(tensors["W.bq_packed"])
        return unpack_bits(packed, qt.bits, k * n).reshape(k, n)
    codes = numpy_helper.to_array(tensors["W.bq_codes"])
    if codes.ndim == 3:  # the fast layout stores whole blocks as [K/B, B, N] (passes/fast_layout.py): same bytes
        codes = codes.reshape(-1, codes.shape[-1])
    if "W.bq_codes.tail" in tensors:  # a ragged last block, stored per axis below the whole blocks
        codes = np.concatenate([codes, numpy_helper.to_array(tensors["W.bq_codes.tail"])])
    codes = codes.astype(np.int16)  # int2/uint2/int4/uint4 (ml_dtypes) and int8/uint8 all widen exactly
    if qt.kind == "uniform" and qt.symmetric:
        codes = codes + qt.implicit_zero_point
    return codes[:k].astype(np.uint8)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", range(1, 9))
def test_every_width_and_quantizer_round_trips(tmp_path, fmt, method, bits):
    rng = np.random.default_rng(bits * 100 + METHODS.index(method))
    k, n, group = 37, 6, 16  # ragged last block (37 = 2*16 + 5)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    path, qt, decoded = _readout(tmp_path, w, bits, method, group, fmt)
    assert qt.bits == bits
    np.testing.assert_array_equal(decoded, qt.dequantize())
    np.testing.assert_array_equal(_stored_codes(path, qt), qt.codes)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(2, 70),  # a reduction of one element is no weight (tests/test_stage_weights.py)
    n=st.integers(1, 9),
    group=st.sampled_from([0, 1, 3, 8, 16, 32, 128]),
    bits=st.integers(1, 8),
    method=st.sampled_from(METHODS),
    fmt=st.sampled_from(FORMATS),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_and_blocks_round_trip(tmp_path_factory, k, n, group, bits, method, fmt, seed):
    w = (np.random.default_rng(seed).standard_normal((k, n)) * 3).astype(np.float32)
    tmp = tmp_path_factory.mktemp("rt")
    path, qt, decoded = _readout(tmp, w, bits, method, group, fmt)
    np.testing.assert_array_equal(decoded, qt.dequantize())
    np.testing.assert_array_equal(_stored_codes(path, qt), qt.codes)


@pytest.mark.parametrize(
    ("fmt", "method", "bits"),
    [(f, m, b) for f, m, b in itertools.product(FORMATS, METHODS, (2, 3, 4, 8)) if (b + len(m)) % 2 == 0]
    + [("native", "uniform", 4), ("compact", "uniform", 3), ("native", "uniform-sym", 5)],
)
def test_openvino_decodes_exactly(tmp_path, fmt, method, bits):
    """OpenVINO (functions inlined by the adapter, f32 hints) decodes what numpy decodes."""
    w = np.random.default_rng(bits).standard_normal((40, 8)).astype(np.float32)  # ragged: 40 = 2*16 + 8
    _, qt, decoded = _readout(tmp_path, w, bits, method, 16, fmt, runtime="openvino")
    np.testing.assert_array_equal(decoded, qt.dequantize())
