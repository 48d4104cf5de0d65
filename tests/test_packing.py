"""Exact b-bit packing against an independent bit-by-bit reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bq_onnx.packing import pack_bits, packed_size, unpack_bits


def reference_pack(values: list[int], bits: int) -> bytes:
    """Bit i of the stream is bit (i % bits) of value i // bits; stream bit j lives in byte j // 8, bit j % 8."""
    count = -(-len(values) // 8) * 8
    stream = []
    for i in range(count):
        v = values[i] if i < len(values) else 0
        stream.extend((v >> j) & 1 for j in range(bits))
    out = bytearray(len(stream) // 8)
    for j, bit in enumerate(stream):
        out[j // 8] |= bit << (j % 8)
    return bytes(out)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 8).flatmap(lambda b: st.tuples(st.just(b), st.lists(st.integers(0, (1 << b) - 1), max_size=70))))
def test_pack_matches_reference_and_round_trips(case):
    bits, values = case
    codes = np.array(values, dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == np.uint8
    assert packed.size == packed_size(len(values), bits)
    assert packed.tobytes() == reference_pack(values, bits)
    np.testing.assert_array_equal(unpack_bits(packed, bits, len(values)), codes)


def test_eight_values_take_exactly_bits_bytes():
    for bits in range(1, 9):
        assert pack_bits(np.full(8, (1 << bits) - 1, dtype=np.uint8), bits).tolist() == [255] * bits


def test_rejects_codes_that_do_not_fit():
    with pytest.raises(ValueError):
        pack_bits(np.array([4], dtype=np.uint8), 2)
    with pytest.raises(ValueError):
        unpack_bits(np.zeros(3, dtype=np.uint8), 2, 9)
