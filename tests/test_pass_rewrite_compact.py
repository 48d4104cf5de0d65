"""RewriteCompactPass (passes/rewrite_compact.py): exact b-bit packing decoded by ``bq`` functions, numbers exact."""

from __future__ import annotations

import numpy as np
import pytest

from tests import passkit, tiny
from tests.conftest import ALL_WIDTHS
from tests.written import run


@pytest.mark.parametrize(("quantizer", "bits"), [("uniform", 1), ("uniform", 3), ("uniform-sym", 5), ("lloyd", 2)])
def test_weights_become_packed_bytes_and_bq_function_calls(quantizer, bits):
    model, ctx = passkit.quantized_model(tiny.layouts_model(), format="compact", quantizer=quantizer, bits=bits,
                                         group_size=16, min_size=64, allowed_bits=ALL_WIDTHS)  # 1 bit: opt-in
    model = passkit.rewrite(model, ctx)
    graph = model.graph
    calls = [n for n in graph if n.domain == "bq"]
    assert len(calls) == 3 and "DequantizeLinear" not in [n.op_type for n in graph]
    assert {n.op_type for n in calls} <= {f.name for f in model.functions.values()}
    assert model.opset_imports["bq"] >= 1
    assert not {"E", "W", "G"} & set(graph.initializers)
    packed = graph.initializers["W.bq_packed"].const_value
    assert packed.size == -(-40 * 24 // 8) * bits  # exactly `bits` bits per weight, in whole bytes of 8 values
    feeds = tiny.feeds()
    expected = tiny.forward(passkit.dequantized(ctx), feeds)
    np.testing.assert_allclose(run(model, feeds)[0], expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
