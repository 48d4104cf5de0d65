"""The typed values the stages hand to each other: the options they read, the values derived from those, the
results.

Each analysis stage (:mod:`bq_onnx.stages`) returns a typed value (the weights found, a :class:`Posterior`, the
:class:`Tables`, an :class:`Allocation`, the quantized forms) and :func:`bq_onnx.pipeline.optimize_model` keeps it
here for the later stages and the report; the passes that change the model read what they need from here. The
options are :class:`bq_onnx.config.OptimizeConfig` (declared there, once); :class:`Derived` holds what is computed
from them and from the model, never asked for by the user.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from bq_onnx.config import OptimizeConfig, QuantizerConfig, parse_group_size

if TYPE_CHECKING:
    import onnx_ir as ir

    from bq_onnx.allocation import Allocation
    from bq_onnx.layout import WeightLayout
    from bq_onnx.posterior import Posterior
    from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor
    from bq_onnx.quantizers import Spec
    from bq_onnx.stages.tables import Tables


@dataclasses.dataclass
class Derived:
    """Values computed from the options, not options themselves.

    ``group_size``: the working block size (``--group-size auto`` works at 64 and offers ``group_choices``; a
    target may move it to a size it accepts). ``outliers``: the resolved ``--outliers`` (its default depends on the
    quantizer). ``weight_min_bits`` / ``weight_group_size``: per-weight floors and group sizes that target
    legalization (:mod:`bq_onnx.targets`) sets, by exact weight name.
    """

    group_size: int = QuantizerConfig.group_size
    group_choices: tuple[int, ...] = ()
    outliers: float | str = 0.0
    weight_min_bits: tuple[tuple[str, int], ...] = ()
    weight_group_size: tuple[tuple[str, int], ...] = ()
    packed_codes: bool = False  # native: 1..3-bit grids stored packed, as the budget needs (bq_onnx.targets)

    @classmethod
    def from_config(cls, config: OptimizeConfig) -> Derived:
        q = config.quantization
        size, choices = parse_group_size(q.group_size)
        outliers = ("auto" if q.quantizer == "auto" else 0.0) if q.outliers is None else q.outliers
        return cls(group_size=size, group_choices=choices, outliers=outliers)

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

    def to_report(self) -> dict:
        return {"group_size": self.group_size, "group_choices": list(self.group_choices), "outliers": self.outliers,
                "weight_min_bits": [list(p) for p in self.weight_min_bits],
                "weight_group_size": [list(p) for p in self.weight_group_size]}


def chooses_design(config: OptimizeConfig, derived: Derived) -> bool:
    """Several designs per tensor and width (``vq``, ``auto``, ``--outliers auto``): the tables choose."""
    return config.quantization.quantizer in ("vq", "auto") or derived.outliers == "auto" or bool(derived.group_choices)


def is_fixed(config: OptimizeConfig, derived: Derived) -> bool:
    """Same width everywhere without tables: uniform allocation of a whole number of payload bits."""
    a = config.allocation
    return (
        a.allocator == "uniform" and float(a.bits).is_integer() and a.size_mb is None
        and not a.bits_include_metadata and not a.min_bits and int(a.bits) in a.allowed_bits
        and a.tables == "closed" and not chooses_design(config, derived) and not derived.outliers
    )


@dataclasses.dataclass
class WeightInfo:
    """A weight the pipeline may quantize: an initializer and the view its consumers imply."""

    name: str
    value: ir.Value
    layout: WeightLayout
    consumers: tuple[str, ...]  # "OpType:node_name" for reports (" in <subgraph path>" for a subgraph reader)
    scope: str = ""  # the graph that owns the initializer: "" main, else its subgraph path

    @property
    def numel(self) -> int:
        k, n = self.layout.view_shape
        return k * n


@dataclasses.dataclass
class Context:
    config: OptimizeConfig = dataclasses.field(default_factory=OptimizeConfig)
    derived: Derived | None = None  # None: Derived.from_config(config)
    weights: list[WeightInfo] = dataclasses.field(default_factory=list)
    posterior: Posterior | None = None
    tables: Tables | None = None  # None: a fixed width, no tables
    allocation: Allocation | None = None
    distillation: dict | None = None
    quantized: dict[str, QuantizedTensor | QuantizedPieces] = dataclasses.field(default_factory=dict)
    layers: list[dict] = dataclasses.field(default_factory=list)
    stored_bytes: int | None = None  # what the quantized weights take in the output, shared constants included
    source_bytes: int | None = None  # every tensor the model stores as given, or as prepared where that is less
    prepare_removed: int = 0  # bytes the prepare passes removed (BatchNormalization folded): no room for the weights
    messages: list[str] = dataclasses.field(default_factory=list)
    progress: bool = False
    floors: dict[str, int] = dataclasses.field(default_factory=dict)  # block -> least width (heads, guard repairs)
    heads: set[str] = dataclasses.field(default_factory=set)  # weights feeding an output directly (bq_onnx.heads)
    head_notes: list[str] = dataclasses.field(default_factory=list)  # the messages the floors above said
    unpriced: set[str] = dataclasses.field(default_factory=set)  # no gradient, not measurable: kept at uniform
    guard: dict | None = None  # the held-out check's report (bq_onnx.stages.guard)
    exclusions: list[dict] = dataclasses.field(default_factory=list)  # what each --exclude/--only matched
    moments: dict | None = None  # weight -> input second moment A, for --rounding gptq (bq_onnx.stages.moments)
    rounding_auto: bool = False  # --rounding auto chose GPTQ: the guard measures nearest beside it
    rounded: dict = dataclasses.field(default_factory=dict)  # GPTQ results, measured choices, metrics: caches

    def __post_init__(self) -> None:
        if self.derived is None:
            self.derived = Derived.from_config(self.config)

    @property
    def fixed(self) -> bool:
        return is_fixed(self.config, self.derived)

    @property
    def chooses_design(self) -> bool:
        return chooses_design(self.config, self.derived)

    @property
    def bits(self) -> dict[str, int]:
        """Block name -> allocated width (empty without an allocation)."""
        return dict(self.allocation.bits) if self.allocation is not None else {}

    @property
    def designs(self) -> dict[tuple[str, int], Spec]:
        """(weight, width) -> the design the tables chose, where they chose among several."""
        return self.tables.designs if self.tables is not None else {}

    @property
    def grids(self) -> dict:
        """(weight, width) -> the grid of the design the tables chose (:mod:`bq_onnx.quantizers.grids`), while
        the posterior is the one they were scored on (its mean and precision are what the grids were fitted to)."""
        tables = self.tables
        if tables is None or tables.grid_posterior is not self.posterior:
            return {}
        return tables.grids

    def pieces_for(self, weight: str, columns: int, bits: dict[str, int] | None = None) -> list[tuple[int, int, int]]:
        """``(start, stop, bits)`` column ranges of one weight: its allocated blocks (``bits``: block widths other
        than the allocation's), else the fixed ``--bits``."""
        bits = self.bits if bits is None else bits
        blocks = self.tables.blocks if self.tables is not None else ()
        pieces = sorted((t.columns[0], t.columns[1], bits[t.name]) for t in blocks
                        if t.weight == weight and t.name in bits)
        if not pieces:
            return [(0, columns, max(int(self.config.allocation.bits), self.derived.weight_floor(weight)))]
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
