"""Checks of a written model file that do not trust the code that wrote it.

``OptimizeResult.save`` verifies by itself and raises on a mismatch, so its report's ``passed`` is always True.
These checks read the file back instead: it exists and passes the onnx checker by path, holds the expected decode
ops and none of the quantized float weights, runs in onnxruntime (exact MatMulNBits) and matches a reference run
with plain onnxruntime sessions built here, and the report's verification lists every output with a finite error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper


def session(model) -> ort.InferenceSession:
    """An onnxruntime CPU session for a path, ModelProto or ir.Model, with exact MatMulNBits (DESIGN.md)."""
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 3
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    model = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run(model, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    sess = session(model)
    names = {i.name for i in sess.get_inputs()}
    return sess.run(None, {k: v for k, v in feeds.items() if k in names})


def with_weights(source, weights: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """The source model (path, ModelProto or ir.Model) with the named initializers replaced: the numpy
    reference when ``weights`` are the dequantized tensors."""
    if isinstance(source, ir.Model):
        proto = ir.serde.serialize_model(source)
    elif isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
    else:
        proto = onnx.load(os.fspath(source))
    missing = set(weights)
    for i, init in enumerate(proto.graph.initializer):
        if init.name in weights:
            dtype = numpy_helper.to_array(init).dtype
            proto.graph.initializer[i].CopyFrom(numpy_helper.from_array(weights[init.name].astype(dtype), init.name))
            missing.discard(init.name)
    assert not missing, f"weights not initializers of the source: {sorted(missing)}"
    return proto


def quantization_rtol(bits: float) -> float:
    """How far a ``bits``-wide model's outputs may stray from the float model's, relative to their largest
    magnitude: 1.5 to 3 times the error measured on the test models (2 bits: 0.67, 3: 0.18, 4: 0.11, 8: 0.006).
    Loose, yet a wrong layout, sign or scale of a decoded weight lands far outside it."""
    return 2.0 ** (2 - bits)


def check_written(
    path: str | os.PathLike,
    reference,
    feeds: Mapping[str, np.ndarray],
    *,
    report: dict | None = None,
    rtol: float = 1e-4,
    ops: Iterable[str] = (),
    domain: str | None = None,
) -> list[np.ndarray]:
    """Check the file at ``path`` against ``reference`` (a model or path) on ``feeds``; return its outputs.

    ``rtol``: allowed max abs difference relative to the reference's largest output magnitude (1e-4 against the
    numpy-dequantized reference: summation order only; larger against the float model: the quantization error).
    ``ops``: op types the graph must hold; ``domain``: a function domain it must call and define (``bq``).
    ``report``: its quantized layers must be gone as float initializers, its verification must list every
    output with a finite error.
    """
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, f"{path} was not written"
    onnx.checker.check_model(os.fspath(path), full_check=True)
    proto = onnx.load(os.fspath(path))
    op_types = {n.op_type for n in proto.graph.node}
    assert set(ops) <= op_types, f"expected {sorted(ops)} among {sorted(op_types)}"
    if domain is not None:
        called = {n.op_type for n in proto.graph.node if n.domain == domain}
        defined = {f.name for f in proto.functions if f.domain == domain}
        assert called and called <= defined, f"domain {domain}: calls {sorted(called)}, defines {sorted(defined)}"
    got = run(path, feeds)  # by path: the written external data must load as written
    if not isinstance(reference, (onnx.ModelProto, ir.Model)):
        reference = onnx.load(os.fspath(reference))  # in memory: onnxruntime refuses external shape constants
    expected = run(reference, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, (g.shape, g.dtype, e.shape, e.dtype)
        assert np.isfinite(g).all()
        e64 = np.asarray(e, np.float64)
        scale = max(float(np.max(np.abs(e64))), 1e-3) if e64.size else 1.0
        err = float(np.max(np.abs(np.asarray(g, np.float64) - e64))) if e64.size else 0.0
        assert err <= rtol * scale, f"max abs error {err:.3g} > {rtol} * {scale:.3g}"
    if report is not None:
        stored = {t.name for t in proto.graph.initializer}
        layers = {r["name"] for r in report["layers"]}
        assert layers and not layers & stored, f"float weights still stored: {sorted(layers & stored)}"
        outputs = report["verification"]["outputs"]
        assert [o["name"] for o in outputs] == [o.name for o in proto.graph.output]
        assert all(np.isfinite(o["max_abs_error"]) for o in outputs), outputs
    return got


def check_result(result, path: str | os.PathLike, report: dict | None = None, *, feeds=None,
                 float_rtol: float | None = None, **checks) -> list[np.ndarray]:
    """:func:`check_written` of ``result`` saved at ``path`` against the source with the numpy-dequantized weights
    (from ``result.context``) on seeded random inputs other than ``save``'s own; with ``float_rtol`` also against
    the float source within that quantization tolerance."""
    from bq_onnx.samples import random_feeds
    from tests import passkit

    if feeds is None:
        feeds = random_feeds(passkit.load(path), seed=11)
    reference = with_weights(result.source, passkit.dequantized(result.context))
    got = check_written(path, reference, feeds, report=report, **checks)
    if float_rtol is not None:
        check_written(path, result.source, feeds, rtol=float_rtol)
    return got
