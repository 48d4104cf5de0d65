"""A weight as the quantizers see it: its ``(K, N)`` view and importance, and the one function that designs its
quantizer at a width (the expected-loss tables and the quantize pass must agree exactly, so both call it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from bq_onnx import quantizers
from bq_onnx.context import Context, WeightInfo
from bq_onnx.errors import DataError
from bq_onnx.idle import arrays_to_disk
from bq_onnx.model_io import StreamedExternalTensor
from bq_onnx.qtensor import QuantizedTensor, num_blocks
from bq_onnx.quantizers import cache as design_cache
from bq_onnx.quantizers import sliced
from bq_onnx.quantizers.grids import DesignGrid, encode_rows


def weight_array(value: ir.Value) -> np.ndarray:
    """The initializer as float32, with NaN/Inf reported by name."""
    arr = np.asarray(value.const_value.numpy(), dtype=np.float32)
    _check_finite(arr, value.name)
    return arr


def _check_finite(arr: np.ndarray, name: str | None, where: str = "") -> None:
    """A :class:`DataError` naming ``name`` (and ``where``: which rows) if ``arr`` holds NaN/Inf."""
    flat = arr.reshape(-1)
    step = COLUMN_CHUNK_BYTES // 4  # checked by slices: a whole-size boolean mask is a quarter of the weight again
    bad = sum(int(flat[a:a + step].size - np.isfinite(flat[a:a + step]).sum()) for a in range(0, flat.size, step))
    if bad:
        raise DataError(f"weight '{name}' contains {bad} NaN/Inf value(s){where}")


def weight_view(ctx: Context, info: WeightInfo) -> tuple[np.ndarray, np.ndarray | None]:
    """The values to store and their importance, in the ``(K, N)`` view.

    With a posterior: its mean (a Bayesian network's mean is the weight to store, paper 001; ours equals the
    weight) and its precision as the per-element importance every quantizer weights its error by. Within a run
    the same arrays (read-only) come back for the same weight and posterior (:func:`bq_onnx.quantizers.cache.kept`).
    """
    posterior = ctx.posterior
    if posterior is None:
        if isinstance(info.value.const_value, ir.ExternalTensor):  # read lazily from its file: not kept
            return info.layout.to_view(weight_array(info.value)), None
        return design_cache.kept((info.value.const_value,), (info.name, info.layout),
                                 lambda: (info.layout.to_view(weight_array(info.value)), None))
    wp = posterior.weights[info.name]

    def view() -> tuple[np.ndarray, np.ndarray]:
        return (info.layout.to_view(np.asarray(wp.mean, dtype=np.float32)),
                info.layout.to_view(np.asarray(wp.precision, dtype=np.float64)))

    return design_cache.kept((wp,), (info.name, info.layout), view, lambda arrays: _to_disk(info, arrays))


def _to_disk(info: WeightInfo, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...] | None:
    """A big weight's view and importance as read-only views of a temporary file (:func:`bq_onnx.idle.arrays_to_disk`;
    None where it cannot be written), the model's own initializer left where it is. Why (issue 21): kept in
    memory, the first weights' arrays (12 bytes per element: 3x the weight) stayed resident all run while the others
    were designed and measured; mapped, their pages come back only while a step reads them, and go again with
    :func:`bq_onnx.idle.drop_pages` after each weight."""
    raw = getattr(info.value.const_value, "raw", None)
    own = {str(i): a for i, a in enumerate(arrays)
           if a is not None and not (isinstance(raw, np.ndarray) and np.shares_memory(a, raw))}
    moved = arrays_to_disk(own)
    if all(moved[k] is a for k, a in own.items()):
        return None
    return tuple(moved.get(str(i), a) for i, a in enumerate(arrays))


def design(
    ctx: Context,
    view: np.ndarray,
    importance: np.ndarray | None,
    bits: int,
    weight: str | None = None,
    spec: quantizers.Spec | None = None,
    base: QuantizedTensor | None = None,
) -> QuantizedTensor:
    """The quantizer of a whole weight at ``bits`` (the tables and the final model use this one function).

    ``spec``: the design; default the one the tables chose for ``(weight, bits)``, else the first candidate of
    ``--quantizer``/``--outliers``. ``base``: the same design without outliers, when already computed. Where the
    tables kept this design's grid (:attr:`Context.grids <bq_onnx.context.Context.grids>`, in whichever process
    they ran) only its codes are chosen again: the same design without its search.
    """
    q = ctx.config.quantization
    spec, block, grid = _planned(ctx, view.shape, bits, weight, spec, base is None)
    if uses_double_scales(ctx, spec, bits, view.shape[0], block):
        spec = dataclasses.replace(spec, double_scales=True)
    if grid is not None:
        return quantizers.quantize_spec(view, bits, spec, block, importance, seed=q.seed, grid=grid)
    if view.nbytes > COLUMN_CHUNK_BYTES and importance is None and base is None:
        if quantizers.column_separable(spec, bits):
            return _by_columns(view, bits, spec, block, q.seed)
        if sliced.supported(spec, bits):  # Lloyd codebooks, outliers: the same bytes, one slice's temporaries
            return sliced.quantize_by_columns(view, bits, spec, block, q.seed, COLUMN_CHUNK_BYTES)
    return quantizers.quantize_spec(view, bits, spec, block, importance, seed=q.seed, base=base)


def _planned(ctx: Context, shape: tuple[int, int], bits: int, weight: str | None, spec: quantizers.Spec | None,
             gridded: bool) -> tuple[quantizers.Spec, int, DesignGrid | None]:
    """:func:`design`'s spec, block size and kept grid (None: none, or not this design's) for a ``shape`` view."""
    q, d = ctx.config.quantization, ctx.derived
    if spec is None:
        spec = ctx.designs.get((weight, bits)) or quantizers.candidates(q.quantizer, d.outliers, bits,
                                                                          shape[0] * shape[1])[0]
    group = spec.block or d.group_size_for(weight)
    block = shape[0] if group <= 0 else group
    grid = ctx.grids.get((weight, bits)) if weight is not None and gridded else None
    if grid is not None and not (grid.spec == spec and grid.block_size == block and grid.shape == tuple(shape)):
        grid = None
    return spec, block, grid


def streamed_design(ctx: Context, info: WeightInfo, bits: int) -> QuantizedTensor | None:
    """:func:`design` of ``info`` at ``bits`` (no importance) read band by band of rows from its external data
    file, where the tables kept the design's grid, the weight is big (over :data:`COLUMN_CHUNK_BYTES`), float32 and
    stored as its view (a MatMul ``[K, N]``): the same codes as the design of the whole view
    (:func:`bq_onnx.quantizers.grids.encode_rows`), without the float weight in memory (issue 21: the quantize
    step read the whole weight to choose codes on a grid it already had). None where any of that does not hold."""
    tensor = info.value.const_value
    if not isinstance(tensor, StreamedExternalTensor) or tensor.dtype != ir.DataType.FLOAT \
            or info.layout.needs_transpose or tensor.nbytes <= COLUMN_CHUNK_BYTES:
        return None
    k, n = info.layout.view_shape
    _, _, grid = _planned(ctx, (k, n), bits, info.name, None, True)
    if grid is None:
        return None

    def rows(a: int, b: int) -> np.ndarray:
        x = tensor.read_bytes(4 * a * n, 4 * (b - a) * n).view("<f4").reshape(b - a, n)
        _check_finite(x, info.name, f" in rows {a}..{b - 1}")
        return x

    return encode_rows(rows, grid)


DOUBLE_SCALE_MIN_BLOCKS = 3
"""Blocks per column from which double-quantized scales store less: ``16 + 8 nb < 16 nb`` bits for ``nb >= 3``."""


def uses_double_scales(ctx: Context, spec: quantizers.Spec, bits: int, k: int, block: int) -> bool:
    """Whether a design stores its scales double-quantized: compact format with ``--scales double`` (default), a
    uniform grid, and enough blocks per column that one super scale per column plus a byte per block is cheaper
    than an fp16 scale per block. The native format's ``DequantizeLinear`` takes fp16 scales only."""
    return (ctx.config.storage.format == "compact" and ctx.config.storage.scales == "double"
            and spec.method == "uniform" and spec.dim == 1 and 0 < bits <= 8
            and num_blocks(k, block) >= DOUBLE_SCALE_MIN_BLOCKS)


#: A weight bigger than this is designed in slices of output channels of about this size: the quantizers'
#: temporaries cost about 5x what they quantize, which for one 8 GiB tensor is 40 GiB (issue 21).
COLUMN_CHUNK_BYTES = 16 << 20


SLICES = "slices"
"""The design cache's tag of the slices :func:`design` cuts a big weight into (dropped after the tables)."""


def _by_columns(view: np.ndarray, bits: int, spec: quantizers.Spec, block: int, seed: int) -> QuantizedTensor:
    """The same design as one call on the whole ``view`` (blocks run down columns), slice by slice of columns."""
    k, n = view.shape
    step = max(1, COLUMN_CHUNK_BYTES // max(1, k * view.itemsize))
    # slices of a weight whose codes at a few widths overflow the design cache are not kept: the tables ask for
    # them again only after every other slice and width (an LRU cache that never hits; 256 MiB held all run); the
    # others are dropped once the tables are done (SLICES), as nothing after them asks for a slice
    keep = SLICES if view.size <= design_cache.MAX_BYTES // 4 else False
    whole = quantizers.by_columns((k, n), lambda a, b: quantizers.quantize_spec(
        view[:, a:b], bits, spec, block, None, seed=seed, keep=keep), step)
    return whole if whole is not None else quantizers.quantize_spec(view, bits, spec, block, None, seed=seed)
