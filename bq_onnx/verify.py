"""Built-in verification: the written model must compute what the numpy-dequantized reference computes.

The reference is the input model with every quantized weight replaced by ``QuantizedTensor.dequantize()``
(numpy, mapped back to the weight's own layout). Both run in onnxruntime with exact precision settings.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from bq_onnx.context import Context
from bq_onnx.errors import ModelError, VerificationError
from bq_onnx.model_io import load_model, save_model
from bq_onnx.pipeline import prepare_passes, run_passes

#: Outputs may differ by summation order (fused MatMulNBits vs MatMul), nothing more: relative to the output's
#: magnitude, 1e-4 for float32 and a few units in the last place for float16.
RTOL = 1e-4


@dataclasses.dataclass
class OutputCheck:
    name: str
    max_abs_error: float
    max_abs_reference: float
    ok: bool


def reference_model(source, ctx: Context) -> ir.Model:
    """The input model, prepared like the pipeline does, with dequantized weights in place of the floats."""
    model = run_passes(load_model(source), prepare_passes(ctx))
    for name, qt in ctx.quantized.items():
        value = model.graph.initializers[name]
        info = ctx.weight(name)
        restored = info.layout.from_view(qt.dequantize())
        dtype = value.dtype
        np_dtype = dtype.numpy() if dtype is not None else np.float32
        value.const_value = ir.tensor(restored.astype(np_dtype), name=name)
    return model


def compare(reference: list[np.ndarray], candidate: list[np.ndarray], names: list[str]) -> list[OutputCheck]:
    checks = []
    for name, ref, out in zip(names, reference, candidate):
        ref64, out64 = np.asarray(ref, dtype=np.float64), np.asarray(out, dtype=np.float64)
        if ref64.shape != out64.shape:
            checks.append(OutputCheck(name, float("inf"), 0.0, False))
            continue
        scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
        err = float(np.max(np.abs(ref64 - out64))) if ref64.size else 0.0
        finite = bool(np.isfinite(out64).all() == np.isfinite(ref64).all())
        dtype = np.asarray(ref).dtype
        rtol = max(RTOL, 8 * float(np.finfo(dtype).eps)) if np.issubdtype(dtype, np.floating) else 0.0
        checks.append(OutputCheck(name, err, scale, finite and err <= rtol * max(scale, 1e-3)))
    return checks


def verify_written(
    path: str | os.PathLike, source, ctx: Context, feeds: Mapping[str, np.ndarray], runtime: str = "onnxruntime"
) -> list[OutputCheck]:
    """Reload ``path``, check it by path, run it and the reference on ``feeds``; raise on a mismatch."""
    from bq_onnx.runtimes import get_runtime

    path = Path(path)
    try:
        onnx.checker.check_model(os.fspath(path))
    except onnx.checker.ValidationError as exc:
        raise VerificationError(f"{path}: written model fails the onnx checker: {str(exc).splitlines()[0]}") from None
    rt = get_runtime(runtime)
    try:
        candidate_session = rt.session(path, exact=True)
    except ModelError as exc:
        raise VerificationError(str(exc)) from None
    reference = reference_model(source, ctx)
    with tempfile.TemporaryDirectory(prefix="bq-ref-") as tmp:
        ref_path = Path(tmp) / "reference.onnx"
        save_model(reference, ref_path)
        del reference
        ref_out = rt.session(ref_path, exact=True).run(feeds)
    out = candidate_session.run(feeds)
    checks = compare(ref_out, out, candidate_session.output_names)
    bad = [c for c in checks if not c.ok]
    if bad:
        c = bad[0]
        raise VerificationError(
            f"{path}: output '{c.name}' differs from the numpy-dequantized reference "
            f"(max abs error {c.max_abs_error:.3g}, reference magnitude {c.max_abs_reference:.3g})"
        )
    return checks
