"""The runtime interface: is it available, what can it hold, open a session, run it.

Each adapter states a :class:`Capabilities` profile (ops, containers, bit widths, symmetry, block sizes,
local functions, opsets) so later passes can legalize a model for it. Sessions are always created from a
path (models over 2 GB cannot travel in memory); ``exact=True`` pins the precision settings that make
runtime outputs comparable with the numpy reference.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Mapping

import numpy as np


@dataclasses.dataclass(frozen=True)
class Capabilities:
    name: str
    containers: frozenset[str]  # DequantizeLinear code containers: int4, uint4, int8, uint8, int2, uint2
    compressed_bits: frozenset[int]  # widths executed on compressed weights (e.g. MatMulNBits)
    symmetric_only: bool
    block_sizes: frozenset[int] | None  # None: any
    block_axes: frozenset[int]
    divisible_blocks: bool  # the blocked axis must be a multiple of the block size
    local_functions: bool  # reads model-local functions without inlining
    opsets: tuple[int, int]
    # Fields below: target legalization and static validation (runtimes/profiles.py, bq_onnx/validate.py).
    native_bits: frozenset[int] = frozenset(range(9))  # widths stored without a larger container (--strict-size)
    int4_ops: frozenset[str] | None = None  # ops an int4 DequantizeLinear may feed (None: any)
    int4_blocked_only: bool = False  # int4 needs block_size (no per-axis int4)
    int8_per_channel: bool = False  # weights that cannot be int4 become int8 per output channel (group size 0)
    even_last_dim: bool = False  # int4 code tensors need an even last dimension
    codebooks: bool = True  # Gather-based codebook decodes
    fp16_scales: bool = False  # fp16 DequantizeLinear scales cast to float in front of it (bq_onnx/sizes.py)
    packed_codes: bool = False  # native: 1..3-bit grids with no container of their size stored packed (sizes.py)
    domains: frozenset[str] = frozenset({"", "ai.onnx"})  # op domains read (model-local functions aside)
    description: str = ""


class Session(abc.ABC):
    """An opened model: named inputs in, outputs (in graph order) out."""

    input_names: list[str]
    output_names: list[str]

    @abc.abstractmethod
    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class Runtime(abc.ABC):
    name: str = ""
    capabilities: Capabilities

    @abc.abstractmethod
    def available(self) -> tuple[bool, str]:
        """(usable here, reason when not)."""

    @abc.abstractmethod
    def session(self, path: str | os.PathLike, *, exact: bool = True, threads: int | None = None,
                lean: bool = False, spin: bool = True) -> Session:
        """A session of the model at ``path``; ``lean``: least memory over speed (checks, never timings);
        ``spin=False``: idle worker threads sleep instead of spinning (the same results; CPU time over latency)."""
