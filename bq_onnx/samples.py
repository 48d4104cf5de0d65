"""Sample inputs for verification when the user gives no calibration data: seeded, typed, shape-true."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

_INT_TYPES = {
    ir.DataType.INT64: np.int64,
    ir.DataType.INT32: np.int32,
    ir.DataType.INT8: np.int8,
    ir.DataType.UINT8: np.uint8,
    ir.DataType.INT16: np.int16,
}
_FLOAT_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16, ir.DataType.DOUBLE: np.float64}


def random_feeds(model: ir.Model, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """One feed per graph input that has no initializer; symbolic dimensions become ``batch``.

    Integer inputs get small non-negative values (valid token ids and indices for any realistic table).
    """
    rng = np.random.default_rng(seed)
    initializers = set(model.graph.initializers)
    feeds = {}
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        shape = [d if isinstance(d, int) else batch for d in (value.shape or [])]
        dtype = value.dtype
        if dtype in _FLOAT_TYPES:
            feeds[value.name] = rng.standard_normal(shape).astype(_FLOAT_TYPES[dtype])
        elif dtype in _INT_TYPES:
            feeds[value.name] = rng.integers(0, 4, size=shape).astype(_INT_TYPES[dtype])
        elif dtype == ir.DataType.BOOL:
            feeds[value.name] = np.ones(shape, dtype=bool)
        else:
            feeds[value.name] = np.zeros(shape, dtype=np.float32)
    return feeds
