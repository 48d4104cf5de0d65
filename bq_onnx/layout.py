"""Mapping real weight tensors to the canonical ``(K, N)`` view and back.

Blocks are cut along the reduction axis, whatever the consumer: a MatMul weight ``[K, N]`` is already in
view; a Gemm ``transB`` weight ``[N, K]`` is transposed; a Conv weight ``[M, C, kh, kw]`` reduces over
``C*kh*kw``; an embedding table ``[V, D]`` is read row by row, so its blocks run along ``D``; a recurrent layer's
``W [D, G*H, I]`` / ``R [D, G*H, H]`` reduces over its last axis, each direction's gate row an output channel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy only where arrays are moved: the weight survey (``bq-onnx inspect``) starts without it
    import numpy as np


@dataclasses.dataclass(frozen=True)
class WeightLayout:
    """``view = reshape(transpose(w, perm), (K, N))`` where ``perm`` lists reduction axes first."""

    shape: tuple[int, ...]
    reduction_axes: tuple[int, ...]

    @property
    def perm(self) -> tuple[int, ...]:
        rest = tuple(a for a in range(len(self.shape)) if a not in self.reduction_axes)
        return self.reduction_axes + rest

    @property
    def view_shape(self) -> tuple[int, int]:
        k = math.prod(int(self.shape[a]) for a in self.reduction_axes)
        n = math.prod(int(self.shape[a]) for a in self.perm[len(self.reduction_axes) :])
        return k, n

    @property
    def transposed_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.perm)

    @property
    def is_identity(self) -> bool:
        """True when the tensor already is its view (no Transpose/Reshape in the graph)."""
        return self.perm == tuple(range(len(self.shape))) and len(self.shape) == 2

    @property
    def needs_transpose(self) -> bool:
        return self.perm != tuple(range(len(self.shape)))

    @property
    def inverse_perm(self) -> tuple[int, ...]:
        return tuple(sorted(range(len(self.perm)), key=self.perm.__getitem__))

    def to_view(self, w: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.ascontiguousarray(np.transpose(w, self.perm)).reshape(self.view_shape)

    def from_view(self, view: np.ndarray) -> np.ndarray:
        import numpy as np

        return np.ascontiguousarray(np.transpose(view.reshape(self.transposed_shape), self.inverse_perm))


#: Recurrent layers whose inputs 1 (``W``) and 2 (``R``) are weights ``[num_directions, gates*hidden, reduced]``.
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


def reduction_axes_for(op_type: str, input_index: int, rank: int, attrs: dict) -> tuple[int, ...] | None:
    """Which axes of a weight the consumer reduces over, or None when the weight is not a quantizable input."""
    if rank == 0:
        return None
    if op_type == "MatMul":
        if input_index == 1:
            return (0,) if rank == 1 else (rank - 2,)
        if input_index == 0:
            return (rank - 1,)
    elif op_type == "Gemm" and rank == 2:
        if input_index == 1:
            return (1,) if attrs.get("transB", 0) else (0,)
        if input_index == 0:
            return (0,) if attrs.get("transA", 0) else (1,)
    elif op_type == "Conv" and input_index == 1 and rank >= 3:
        return tuple(range(1, rank))
    elif op_type == "ConvTranspose" and input_index == 1 and rank >= 3:
        return (0,) + tuple(range(2, rank))
    elif op_type == "Gather" and input_index == 0 and rank == 2 and attrs.get("axis", 0) == 0:
        return (1,)
    elif op_type in RECURRENT_OPS and input_index in (1, 2) and rank == 3:
        return (2,)
    return None
