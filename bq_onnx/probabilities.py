"""Class probabilities from logits and one-hot rows from class indices: the targets a classification loss reads."""

from __future__ import annotations

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, computed in float64 and returned as float32."""
    z = z.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def one_hot(index: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((*index.shape, classes), dtype=np.float32)
    np.put_along_axis(out, index[..., None], 1.0, axis=-1)
    return out
