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

Format = Literal["native", "compact"]


@dataclasses.dataclass
class Settings:
    """What the user asked for (CLI flags and API keywords map onto these one to one)."""

    bits: int = 4
    format: Format = "native"
    quantizer: str = "uniform"
    group_size: int = 32
    min_size: int = 128
    seed: int = 0
    keep_fp: tuple[str, ...] = ()


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
    bits: dict[str, int] = dataclasses.field(default_factory=dict)
    quantized: dict[str, QuantizedTensor] = dataclasses.field(default_factory=dict)
    layers: list[dict] = dataclasses.field(default_factory=list)
    messages: list[str] = dataclasses.field(default_factory=list)
    progress: bool = False

    def bits_for(self, name: str) -> int:
        """The bit width of one weight: fixed for now; the allocation pass will fill ``bits``."""
        return self.bits.get(name, self.settings.bits)

    def weight(self, name: str) -> WeightInfo:
        for info in self.weights:
            if info.name == name:
                return info
        raise KeyError(name)
