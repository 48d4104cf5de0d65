"""The typed values passes hand to each other, and the settings they read.

Passes never reach into each other: what one produces for a later one lives here (the weights found, their
quantized forms, the report), so a pipeline is just a list of passes over one model and one context.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import onnx_ir as ir

from bq_onnx.layout import WeightLayout
from bq_onnx.posterior import Posterior
from bq_onnx.qtensor import QuantizedTensor
from bq_onnx.quantizers import Spec

Format = Literal["native", "compact"]


@dataclasses.dataclass
class Settings:
    """What the user asked for (CLI flags and API keywords map onto these one to one)."""

    bits: float = 4  # fixed width, or the average-bits budget of the allocation
    format: Format = "native"
    quantizer: str = "uniform"  # a scalar method, a vector family (vq, vq2, vq4, vq8) or auto
    outliers: float | str = 0.0  # fraction of each tensor kept as sparse fp16 outliers, or "auto" (tables choose)
    group_size: int = 32
    group_choices: tuple[int, ...] = ()  # --group-size auto: block sizes the tables choose from per tensor and width
    min_size: int = 128
    seed: int = 0
    keep_fp: tuple[str, ...] = ()
    allocator: str = "greedy"
    granularity: int | None = None  # None: a block is a tensor; N: slices of N output channels
    allowed_bits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8)
    include_metadata: bool = False
    size_mb: float | None = None
    min_bits: tuple[tuple[str, int], ...] = ()
    tables: str = "closed"  # closed form from the posterior, or "mc": measured KL per block and width
    target: str | None = None  # a runtime profile (runtimes/profiles.py) the output is legalized for
    # set by target legalization (bq_onnx.targets), exact weight names: floors and group sizes per weight
    weight_min_bits: tuple[tuple[str, int], ...] = ()
    weight_group_size: tuple[tuple[str, int], ...] = ()

    def group_size_for(self, weight: str | None) -> int:
        """The group size of one weight (a legalized per-weight value, else ``group_size``)."""
        found = [g for name, g in self.weight_group_size if name == weight]
        return found[-1] if found else self.group_size

    def block_choices_for(self, weight: str | None, rows: int) -> tuple[int, ...]:
        """Block sizes offered for one weight of ``rows`` reduction rows (empty: its one group size).

        Sizes at or past ``rows`` all mean one block per column; only the smallest of them is kept. A weight whose
        group size a target legalized keeps that one.
        """
        if not self.group_choices or any(name == weight for name, _ in self.weight_group_size):
            return ()
        whole = [g for g in self.group_choices if g >= rows]
        sizes = sorted({g for g in self.group_choices if 0 < g < rows} | ({min(whole)} if whole else set()))
        return tuple(sizes) if len(sizes) > 1 else ()

    def weight_floor(self, weight: str) -> int:
        """The legalized minimum width of one weight (0: none)."""
        return max((b for name, b in self.weight_min_bits if name == weight), default=0)

    @property
    def chooses_design(self) -> bool:
        """Several designs per tensor and width (``vq``, ``auto``, ``--outliers auto``): the tables choose."""
        return self.quantizer in ("vq", "auto") or self.outliers == "auto" or bool(self.group_choices)

    @property
    def fixed(self) -> bool:
        """Same width everywhere without tables: uniform allocation of a whole number of payload bits."""
        return (
            self.allocator == "uniform" and float(self.bits).is_integer() and self.size_mb is None
            and not self.include_metadata and not self.min_bits and int(self.bits) in self.allowed_bits
            and self.tables == "closed" and not self.chooses_design and not self.outliers
        )


@dataclasses.dataclass
class WeightInfo:
    """A weight the pipeline may quantize: an initializer and the view its consumers imply."""

    name: str
    value: ir.Value
    layout: WeightLayout
    consumers: tuple[str, ...]  # "OpType:node_name" for reports

    @property
    def numel(self) -> int:
        k, n = self.layout.view_shape
        return k * n


@dataclasses.dataclass
class Context:
    settings: Settings
    weights: list[WeightInfo] = dataclasses.field(default_factory=list)
    posterior: Posterior | None = None
    tables: list = dataclasses.field(default_factory=list)  # BlockTable per allocation block
    bits: dict[str, int] = dataclasses.field(default_factory=dict)  # block name -> allocated width
    designs: dict[tuple[str, int], Spec] = dataclasses.field(default_factory=dict)  # (weight, width) -> chosen design
    allocation: object | None = None
    distillation: dict | None = None
    quantized: dict[str, QuantizedTensor] = dataclasses.field(default_factory=dict)
    layers: list[dict] = dataclasses.field(default_factory=list)
    messages: list[str] = dataclasses.field(default_factory=list)
    progress: bool = False

    def pieces_for(self, weight: str, columns: int) -> list[tuple[int, int, int]]:
        """``(start, stop, bits)`` column ranges of one weight: its allocated blocks, else the fixed ``--bits``."""
        pieces = sorted((t.columns[0], t.columns[1], self.bits[t.name]) for t in self.tables
                        if t.weight == weight and t.name in self.bits)
        if not pieces:
            return [(0, columns, max(int(self.settings.bits), self.settings.weight_floor(weight)))]
        merged = [list(pieces[0])]
        for start, stop, bits in pieces[1:]:
            if bits == merged[-1][2] and start == merged[-1][1]:
                merged[-1][1] = stop
            else:
                merged.append([start, stop, bits])
        return [tuple(p) for p in merged]

    def weight(self, name: str) -> WeightInfo:
        for info in self.weights:
            if info.name == name:
                return info
        raise KeyError(name)
