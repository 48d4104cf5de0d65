"""Quantizer designs: what ``--quantizer``/``--outliers`` offer a tensor (:func:`candidates`), and how one
design is applied (:func:`quantize_spec`) and scored (:func:`quantization_error`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from bq_onnx.qtensor import FLOAT16_BITS, QuantizedTensor, float16_tensor
from bq_onnx.quantizers import cache as design_cache
from bq_onnx.quantizers.grids import DesignGrid, encode
from bq_onnx.quantizers.registry import QUANTIZERS, VECTOR_FAMILIES, quantize


@dataclasses.dataclass(frozen=True)
class Spec:
    """One quantizer design: a scalar ``method`` (``dim == 1``) or a vector codebook (``method == "vq"``, ``dim``
    in 2/4/8), with ``outliers`` = the fraction of weights isolated as sparse fp16 values and ``block`` = the rows
    per block (0: the run's group size). ``double_scales``: uniform scales stored as byte codes times a per-column
    fp16 super scale; set by :func:`bq_onnx.weights.design` from the format, never offered as a design of its own."""

    method: str
    dim: int = 1
    outliers: float = 0.0
    block: int = 0
    double_scales: bool = False

    @property
    def label(self) -> str:
        name = f"vq{self.dim}" if self.method == "vq" else self.method
        return (name + (f"+outliers{100 * self.outliers:g}%" if self.outliers else "")
                + (f"/g{self.block}" if self.block else ""))


def candidates(
    quantizer: str, outliers: float | str, bits: int, numel: int, blocks: Sequence[int] = ()
) -> list[Spec]:
    """The designs offered for a tensor of ``numel`` weights at ``bits``; the first is the plain reference.

    ``quantizer`` is one of :data:`QUANTIZERS`. Vector families offer the lengths :func:`vector_dims` allows
    at that width; where none is (e.g. 8 bits, or a codebook too large for the tensor) the scalar Lloyd codebook
    stands in. ``outliers``: a fraction (every design carries it) or ``"auto"`` (each design without and with
    each of :data:`bq_onnx.outliers.FRACTIONS`). ``blocks``: block sizes to offer each design at (the first is
    the reference; empty: the run's group size only). 0 bits is always the mean (with the outliers asked for).
    """
    from bq_onnx.outliers import FRACTIONS
    from bq_onnx.vector import vector_dims

    if quantizer not in QUANTIZERS:
        raise ValueError(f"unknown quantizer {quantizer!r}; expected one of {QUANTIZERS}")
    if bits == FLOAT16_BITS:  # the float16 width: fp16 values, one design
        return [Spec("float16")]
    dims = vector_dims(bits, numel)
    if bits == 0:
        base = [Spec("uniform" if quantizer in VECTOR_FAMILIES or quantizer == "auto" else quantizer)]
    elif quantizer == "auto":
        base = [Spec("uniform"), Spec("lloyd"), *(Spec("vq", d) for d in dims)]
    elif quantizer == "vq":
        base = [Spec("vq", d) for d in dims] or [Spec("lloyd")]
    elif quantizer in VECTOR_FAMILIES:  # forced length: allowed up to a codebook as large as the codes
        d = int(quantizer[2:])
        base = [Spec("vq", d)] if d in vector_dims(bits, numel, share=1.0) else [Spec("lloyd")]
    else:
        base = [Spec(quantizer)]
    fractions = (0.0, *FRACTIONS) if outliers == "auto" else (float(outliers),)
    sizes = tuple(blocks) if blocks and bits > 0 else (0,)
    return [dataclasses.replace(b, outliers=f, block=g) for g in sizes for b in base for f in fractions]


def quantize_spec(
    w: np.ndarray,
    bits: int,
    spec: Spec,
    block_size: int = 32,
    weights: np.ndarray | None = None,
    *,
    seed: int = 0,
    base: QuantizedTensor | None = None,
    grid: DesignGrid | None = None,
    keep: bool | str = True,
) -> QuantizedTensor:
    """Quantize with one :class:`Spec`; ``base`` is the same spec without outliers when already computed; ``grid``:
    this design's grid, taken from it earlier (:mod:`bq_onnx.quantizers.grids`): only its codes are chosen again.
    ``keep=False``: neither looked up in nor kept by the design cache (a caller whose calls never come back while
    their result is still cached); a string: kept under that tag (:func:`bq_onnx.quantizers.cache.forget`).

    Vector codebooks need blocks in whole vectors: ``block_size`` is rounded up to a multiple of ``dim``.
    Inside :func:`bq_onnx.quantizers.cache.scope` a call seen before returns the earlier result.
    """
    if grid is not None:
        def compute() -> QuantizedTensor:
            return encode(w, grid)
    else:
        def compute() -> QuantizedTensor:
            return _quantize_spec(w, bits, spec, block_size, weights, seed, None)
    if base is None and keep and design_cache.active():
        key = ("spec", design_cache.digest(w), design_cache.digest(weights), bits, spec, block_size, seed)
        return design_cache.cached(key, compute, keep if isinstance(keep, str) else None)
    return compute() if base is None else _quantize_spec(w, bits, spec, block_size, weights, seed, base)


#: A column-separable design (:func:`column_separable`) of a weight bigger than this is computed slice by slice of
#: output channels of about this size, its importance sliced with it: the quantizers' temporaries (a blocked copy
#: of the weight, a float64 one of its importance, decoded levels, errors) cost about 8x the weight, and they were
#: the peak of a run with a posterior (issue 21: 0.5 GiB of the 0.125 GiB scale model's 1.35 GiB with ``--calib``).
SLICE_BYTES = 16 << 20


def column_separable(spec: Spec, bits: int) -> bool:
    """Designs whose every block lies in one output channel and depends on nothing else: plain uniform grids
    (no per-tensor codebook, no outliers chosen across the tensor, no vectors). Their importance is scaled by a
    power of two (:func:`bq_onnx.quantizers.blocked.weight_scale`), so a slice's design is the whole one's."""
    return spec.method == "uniform" and spec.dim == 1 and not spec.outliers and 0 < bits <= 8


def by_columns(shape: tuple[int, int], part: Callable[[int, int], QuantizedTensor],
               step: int) -> QuantizedTensor | None:
    """The design of a whole ``shape`` weight from ``part(a, b)``, the same design of its columns ``a:b``, ``step``
    columns at a time; None where a part turns out not to be separable (a codebook or outliers)."""
    k, n = shape
    first, fields = None, {}
    for a in range(0, n, step):
        piece = part(a, min(a + step, n))
        if piece.outlier_index is not None or piece.codebook is not None:
            return None
        if first is None:  # results go straight into whole-size arrays: no list of parts to join
            first = piece
            fields = {f: None if getattr(piece, f) is None else
                      np.empty((getattr(piece, f).shape[0], n), dtype=getattr(piece, f).dtype)
                      for f in ("codes", "scale", "zero_point", "offset", "scale_code")}
            if piece.super_scale is not None:
                fields["super_scale"] = np.empty(n, dtype=np.float32)
        for f, whole in fields.items():
            if whole is not None and whole.ndim == 1:  # per column: the super scales
                whole[a:a + step] = getattr(piece, f)
            elif whole is not None:
                whole[:, a:a + step] = getattr(piece, f)
    return dataclasses.replace(first, shape=(k, n), **fields)


def _quantize_spec(w: np.ndarray, bits: int, spec: Spec, block_size: int, weights: np.ndarray | None, seed: int,
                   base: QuantizedTensor | None) -> QuantizedTensor:
    from bq_onnx.outliers import isolate_outliers
    from bq_onnx.vector import quantize_vector

    if bits == FLOAT16_BITS:
        return float16_tensor(w)
    if base is None and np.ndim(w) == 2 and column_separable(spec, bits) \
            and (weights is None or np.shape(weights) == np.shape(w)):
        step = max(1, SLICE_BYTES // max(1, 4 * w.shape[0]))
        if w.shape[1] > step:
            whole = by_columns(w.shape, lambda a, b: _quantize_spec(
                w[:, a:b], bits, spec, block_size, None if weights is None else weights[:, a:b], seed, None), step)
            if whole is not None:
                return whole
    if spec.method == "vq" and bits > 0:
        block = -(-block_size // spec.dim) * spec.dim
        fitted: list[QuantizedTensor] = [] if base is None else [base]

        def design(x: np.ndarray, h: np.ndarray | None) -> QuantizedTensor:
            init = fitted[0].codebook if fitted else None  # the refit without outliers starts from the plain fit
            qt = quantize_vector(x, bits, spec.dim, block, h, seed=seed, init=init)
            fitted.append(qt)
            return qt
    else:
        method = "uniform" if spec.method == "vq" else spec.method

        def design(x: np.ndarray, h: np.ndarray | None) -> QuantizedTensor:
            return quantize(x, bits, method, block_size, h, seed=seed, double_scales=spec.double_scales and bits > 0)

    return isolate_outliers(w, weights, spec.outliers, design, base)


def quantization_error(w: np.ndarray, qt: QuantizedTensor, weights: np.ndarray | None = None) -> float:
    """Weighted squared error ``sum(weights * (qt.dequantize() - w) ** 2)``, in float64."""
    w64 = np.asarray(w, dtype=np.float64)
    if w64.shape != tuple(qt.shape):
        raise ValueError(f"w has shape {w64.shape}, the quantized tensor {tuple(qt.shape)}")
    d = qt.dequantize().astype(np.float64) - w64
    d *= d
    if weights is not None:
        d *= np.asarray(weights, dtype=np.float64)
    return float(d.sum())
