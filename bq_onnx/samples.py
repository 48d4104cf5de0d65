"""Sample inputs for verification when the user gives no calibration data: seeded, typed, shape-true."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.budgets import nbytes, require
from bq_onnx.errors import ModelError, UsageError

_INT_TYPES = {
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT16: np.int16,
}
_FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}


#: Sizes tried in turn for the symbolic dimensions of random verification inputs, until the model runs on them:
#: 2 is cheap, yet fails inside many real models (silero-vad reflect-pads its 2-sample clip by 32 samples, its
#: LSTM wants 128 of them; a 2x2 image does not survive five stride-2 layers).
SYMBOLIC_SIZES = (2, 8, 32, 128, 512)


def has_symbolic_dims(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None) -> bool:
    """Whether random inputs have a symbolic dimension whose size they choose (none given by ``shapes``)."""
    initializers = set(model.graph.initializers)
    return any(v.name not in initializers and v.name not in (shapes or {}) and
               any(not _static(d) for d in (v.shape or [])) for v in model.graph.inputs)


def random_feeds(model: ir.Model, batch: int = 2, seed: int = 0,
                 shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """One feed per graph input that has no initializer; symbolic dimensions become ``batch``, or what
    ``shapes`` (``--input-shape``) gives for the input.

    Integer inputs get small non-negative values (valid token ids and indices for any realistic table). A
    symbolic dimension that a directly consuming MatMul/Gemm/Conv weight pins down takes the weight's size.
    """
    rng = np.random.default_rng(seed)
    initializers = set(model.graph.initializers)
    inputs = [v for v in model.graph.inputs if v.name not in initializers]
    shapes = dict(shapes or {})
    unknown = sorted(set(shapes) - {v.name for v in inputs})
    if unknown:
        raise UsageError(f"--input-shape: unknown input '{unknown[0]}' (model inputs: "
                         f"{', '.join(v.name for v in inputs)})")
    feeds = {}
    for value in inputs:
        if value.name in shapes:
            shape = _given_shape(value, shapes[value.name])
        else:
            pinned = _pinned_dims(model, value)
            shape = [d if _static(d) else pinned.get(axis, batch) for axis, d in enumerate(value.shape or [])]
        dtype = value.dtype
        _check_size(value, shape, value.name in shapes)
        if dtype in _FLOAT_TYPES:
            feeds[value.name] = rng.standard_normal(shape).astype(_FLOAT_TYPES[dtype])
        elif dtype in _INT_TYPES:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(_INT_TYPES[dtype])
        elif dtype == ir.DataType.BOOL:
            feeds[value.name] = np.ones(shape, dtype=bool)
        else:
            feeds[value.name] = np.zeros(shape, dtype=np.float32)
    return feeds


def _check_size(value: ir.Value, shape: Sequence[int], given: bool) -> None:
    """A random input's size, computed exactly, within the memory budget (a model may declare any static shape:
    ``[2^32, 2^32]`` would be 2^66 bytes)."""
    size = nbytes(shape, 64)  # generated in float64 or int64 first
    error = UsageError if given else ModelError
    what = f"input '{value.name}' of shape {list(shape)}: random verification inputs"
    if size is None:
        raise error(f"{what} have more elements than a C size can count")
    require(size, what, error)


def _static(dim: object) -> bool:
    """A known size; exporters such as paddle2onnx write an unknown (batch) dimension as -1."""
    return isinstance(dim, int) and dim >= 0


def _given_shape(value: ir.Value, dims: Sequence[int]) -> list[int]:
    """``dims`` checked against the input's rank and fixed dimensions."""
    want = [d if _static(d) else str(d) for d in (value.shape or [])]
    bad = value.shape is not None and (len(dims) != len(want) or any(
        isinstance(w, int) and w != d for w, d in zip(want, dims)))
    if bad:
        raise UsageError(f"--input-shape {value.name}={','.join(map(str, dims))}: the model expects shape {want}")
    return list(dims)


def _pinned_dims(model: ir.Model, value: ir.Value) -> dict[int, int]:
    """Axes of an input whose size a directly consuming weight fixes (MatMul K, Gemm K, Conv channels)."""
    rank = len(value.shape or [])
    pinned: dict[int, int] = {}
    for use in value.uses():
        node, idx = use.node, use.idx
        other = node.inputs[1 - idx] if node.op_type in ("MatMul", "Gemm") and idx in (0, 1) else None
        if node.op_type == "Conv" and idx == 0:
            other = node.inputs[1]
        # an initializer, or a decoded weight (quantized models keep its static shape on the value)
        shape = other.shape if other is not None else None
        if shape is None or rank == 0 or not all(isinstance(d, int) for d in shape):
            continue
        if other.const_value is None and other.producer() is None:
            continue  # a graph input, not a weight
        w = [int(d) for d in shape]
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type == "MatMul" and idx == 0 and len(w) >= 2:
            pinned[rank - 1] = w[-2]
        elif node.op_type == "Gemm" and idx == 0 and len(w) == 2 and rank == 2:
            pinned[0 if attrs.get("transA", 0) else 1] = w[1] if attrs.get("transB", 0) else w[0]
        elif node.op_type == "Conv" and len(w) >= 3 and rank >= 2:
            pinned[1] = w[1] * int(attrs.get("group", 1))
    return pinned
