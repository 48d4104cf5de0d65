"""A quantized weight decoded band by band of rows (issue 21: verification's reference written without the decoded
weight whole): every band is exactly those rows of the whole decode, for every kind that can be cut by rows,
ragged last blocks, pieces of different widths and block sizes, and outliers; and the reference's writing holds
about a band, not the weight."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from bq_onnx import quantizers
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, dequantize_rows, row_step, take_rows


def _design(view: np.ndarray, method: str, bits: int, block: int, outliers: float = 0.0) -> QuantizedTensor:
    spec = quantizers.candidates(method, outliers, bits, view.size)[0]
    return quantizers.quantize_spec(view, bits, spec, block, None, seed=0)


def _bands(qt, rows: int) -> np.ndarray:
    step = row_step(qt, rows)
    assert step is not None
    k = qt.shape[0]
    return np.concatenate([dequantize_rows(qt, a, min(a + step, k)) for a in range(0, k, step)])


@pytest.mark.parametrize(("method", "outliers"), [("uniform", 0.0), ("uniform", 0.01), ("uniform-sym", 0.0),
                                                  ("lloyd", 0.0), ("gaussian", 0.0)])
def test_bands_of_rows_are_the_whole_decode(method, outliers):
    view = np.random.default_rng(0).standard_normal((200, 48)).astype(np.float32)  # 200 = 6 blocks of 32 + 8
    qt = _design(view, method, 3, 32, outliers)
    assert qt.kind in ("uniform", "codebook")
    for rows in (1, 32, 64, 100, 500):
        assert np.array_equal(_bands(qt, rows), qt.dequantize())


def test_bands_of_pieces_with_different_block_sizes_are_the_whole_decode():
    view = np.random.default_rng(1).standard_normal((256, 90)).astype(np.float32)
    parts = [(0, 30, _design(view[:, :30], "uniform", 2, 32)), (30, 60, _design(view[:, 30:60], "uniform", 4, 64)),
             (60, 90, _design(view[:, 60:], "uniform", 8, 128))]
    mixed = QuantizedPieces(view.shape, tuple(parts))
    assert row_step(mixed, 1) == 128  # a whole block of every piece
    assert np.array_equal(_bands(mixed, 100), mixed.dequantize())


def test_what_cannot_be_cut_by_rows_says_so():
    view = np.random.default_rng(2).standard_normal((64, 16)).astype(np.float32)
    assert row_step(_design(view, "uniform", 4, 64), 8) is None  # one block per column
    vector = _design(view, "vq2", 2, 32)
    assert vector.kind == "vector" and row_step(vector, 8) is None
    with pytest.raises(ValueError, match="whole blocks"):
        take_rows(_design(view, "uniform", 4, 32), 16, 48)


def test_a_band_decode_holds_a_band():
    view = np.random.default_rng(3).standard_normal((4096, 1024)).astype(np.float32)  # 16 MiB
    qt = _design(view, "uniform", 4, 32)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        for a in range(0, 4096, 256):
            dequantize_rows(qt, a, a + 256)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * view.nbytes, peak / view.nbytes  # the whole decode: the weight and its temporaries
