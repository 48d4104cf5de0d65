"""Design the quantizer of every weight: float tensor -> :class:`QuantizedTensor` in ``ctx.quantized``.

One weight at a time, so only one float copy of one tensor is ever materialised beside the (lazy) model.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from bq_onnx import quantizers
from bq_onnx.context import Context
from bq_onnx.errors import DataError
from bq_onnx.progress import progress


def weight_array(value: ir.Value) -> np.ndarray:
    """The initializer as float32, with NaN/Inf reported by name."""
    arr = np.asarray(value.const_value.numpy(), dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = int(arr.size - np.isfinite(arr).sum())
        raise DataError(f"weight '{value.name}' contains {bad} NaN/Inf value(s)")
    return arr


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Quantize each weight found by FindWeightsPass at the bits the context asks for."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def requires(self, model: ir.Model) -> None:
        assert self.ctx.weights, "FindWeightsPass must run first"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        s = self.ctx.settings
        posterior = self.ctx.posterior
        for info in progress(self.ctx.weights, "quantize", enabled=self.ctx.progress):
            importance = None
            if posterior is not None:
                wp = posterior.weights[info.name]
                # A Bayesian network's posterior mean is the weight to store (paper 001); ours equals the weight.
                view = info.layout.to_view(np.asarray(wp.mean, dtype=np.float32))
                importance = info.layout.to_view(np.asarray(wp.precision, dtype=np.float64))
            else:
                view = info.layout.to_view(weight_array(info.value))
            k, _ = view.shape
            block = k if s.group_size <= 0 else s.group_size
            bits = self.ctx.bits_for(info.name)
            self.ctx.quantized[info.name] = quantizers.quantize(view, bits, s.quantizer, block, importance,
                                                                seed=s.seed)
        return ir.passes.PassResult(model, modified=False)

    def ensures(self, model: ir.Model) -> None:
        missing = [w.name for w in self.ctx.weights if w.name not in self.ctx.quantized]
        assert not missing, f"weights left unquantized: {missing}"
