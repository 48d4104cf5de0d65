"""The budget checked on the rewritten model: what the file stores, not what the tables predicted.

The tables count each block's codes and metadata; the rewrite adds what no block owns (shape and index
constants, compact decode functions, the graph and the report metadata in the file). After a rewrite the stored
figure is measured (:func:`bq_onnx.counting.ir_stored_bytes`, or the serialized size for ``--size-mb``); while it
is over the budget, the allocation is redone with the excess reserved, then the reserve is narrowed while that
leaves much of the budget unused (at most :data:`MAX_TRIES` rewrites); an output under the budget at no reserve
(tables that priced more than was stored) is retried with the room as a negative reserve. A budget that the
cheapest allocation cannot meet is a one-line :class:`UsageError` giving the smallest size that can be met.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import onnx_ir as ir

from bq_onnx.context import Context
from bq_onnx.counting import ir_stored_bytes
from bq_onnx.errors import UsageError
from bq_onnx.sizes import storage_of

MAX_TRIES = 6
ZERO_BIT_NOTE = 0.1
"""Share of the weights at 0 bits above which the report says so."""
SLACK = 0.005
"""Stop refining once the output is within this fraction of the budget."""


@dataclasses.dataclass
class StoredBudget:
    """``--bits`` (stored bits per weight) or ``--size-mb`` (file bytes), checked after each rewrite."""

    limit_bits: float  # the budget in bits: stored tensors of the weights, or the whole file
    other_bytes: int  # --bits: the stored bytes that are not the weights' before the rewrite
    size_mb: float | None
    reserve: float = 0.0
    tries: int = 0
    good: float = math.inf  # the smallest reserve whose output fit
    bad: float = -math.inf  # the largest reserve whose output did not
    best: float = -math.inf  # the largest measured figure that fit

    @classmethod
    def of(cls, model: ir.Model, ctx: Context) -> StoredBudget | None:
        """The budget to check, or None where none binds (a fixed width, ``--bits-payload``)."""
        a = ctx.config.allocation
        if ctx.fixed or ctx.tables is None or (a.bits_payload and a.size_mb is None):
            return None
        other = other_bytes(model, ctx)
        if a.size_mb is not None:
            return cls(a.size_mb * 8e6, other, a.size_mb)
        numel = sum(t.numel for t in ctx.tables.blocks)
        return cls(float(a.bits) * numel, other, None)

    def measure_bits(self, out: ir.Model) -> float:
        """Bits the budget covers in the rewritten model."""
        if self.size_mb is not None:
            return 8.0 * file_bytes(out)
        return 8.0 * (ir_stored_bytes(out) - self.other_bytes)

    def next_reserve(self, out: ir.Model, ctx: Context) -> tuple[bool, float | None]:
        """Whether ``out`` fits and fills more of the budget than any output before, and the reserve to allocate
        with next (None: stop). Over the budget, the reserve grows by the excess; once one fits, it is bisected
        between the largest that failed and the smallest that fit while the slack is over :data:`SLACK` of the
        budget (the overhead shrinks with fewer pieces, so the first fit can waste room)."""
        measured = self.measure_bits(out)
        fits = measured <= self.limit_bits
        self.tries += 1
        best = fits and measured > self.best
        if fits:
            self.good = min(self.good, self.reserve)
            self.best = max(self.best, measured)
        else:
            self.bad = max(self.bad, self.reserve)
            if math.isinf(self.good):
                if self._at_minimum(ctx):
                    self._refuse(measured, ctx)
                if self.tries > MAX_TRIES:  # out of tries without a fit: the cheapest allocation decides
                    self.reserve = math.inf
                    return best, self.reserve
        if self.tries > MAX_TRIES or (fits and self.limit_bits - measured <= SLACK * self.limit_bits):
            return best, None
        if math.isinf(self.good):
            # the allocator may spend its whole budget: leave room for the overhead this output showed
            overhead = measured - ctx.allocation.cost
            shrink = ctx.allocation.budget - (self.limit_bits - overhead)
            self.reserve += max(measured - self.limit_bits, shrink) + 8
        elif math.isinf(self.bad):
            # every output fit with room: the tables priced more than the rewrite stores (a MatMul weight the
            # allocation splits into pieces is no MatMulNBits: fp16 scales, not the fp32 priced). Spend the room
            # as a credit, unless the allocator itself left it (every block at its widest, coarse blocks)
            a = ctx.allocation
            if a.budget - a.cost > SLACK * self.limit_bits:
                return best, None
            self.reserve -= self.limit_bits - measured
        else:
            if self.good - self.bad <= 64:
                return best, None
            self.reserve = (self.good + self.bad) / 2
        return best, self.reserve

    @staticmethod
    def _at_minimum(ctx: Context) -> bool:
        return bool(ctx.allocation.details.get("at_cheapest"))

    def _refuse(self, measured: float, ctx: Context) -> None:
        smallest = measured  # the cheapest allocation's output, or (tries spent) the last one's
        # what the tables' cost may take once the rewrite's own overhead (graph, decode constants) is left
        room = self.limit_bits - (measured - ctx.allocation.cost)
        if self.size_mb is not None:
            mb = math.ceil(smallest / 8e6 * 1e4) / 1e4
            raise BudgetUnmet(f"--size-mb {self.size_mb:g} cannot be met: the smallest file is about {mb:g} MB; "
                              f"{alternatives(ctx, f'--size-mb {mb:g}', whole_file=True)}", room)
        numel = sum(t.numel for t in ctx.tables.blocks)
        least = math.ceil(smallest / numel * 100) / 100
        larger = math.ceil(least * 10) / 10
        # --bits stops at 8: tensors so small that their scales alone cost more are budgeted as payload instead
        larger_text = f"--bits {larger:g}" if larger <= 8 else "--bits-payload: tiny tensors' scales exceed 8 bits"
        raise BudgetUnmet(f"--bits {ctx.config.allocation.bits:g} cannot be met: the smallest stored size is about "
                          f"{least:g} bits per weight; {alternatives(ctx, larger_text)}", room)


class BudgetUnmet(UsageError):
    """The cheapest allocation's output is over the stored budget (a usage error: the user asked for less than
    the format can store). ``room``: the allocator's budget that would have fitted, the overhead the output showed
    taken off (floors set from the whole budget, the heads', may be too high for it)."""

    def __init__(self, message: str, room: float | None = None) -> None:
        super().__init__(message)
        self.room = room


def alternatives(ctx: Context, larger: str, whole_file: bool = False) -> str:
    """What would meet a budget below the cheapest allocation: one clause listing the options that store less.
    Packed 2-bit codes store what int2 containers do, but their decode adds graph nodes, which a file-size budget
    counts (LeNet ``--size-mb``: smallest 0.0376 MB on the default target, 0.0293 on onnxruntime)."""
    config = ctx.config
    ways = [f"a larger budget ({larger})"]
    if config.quantization.group_size != "auto" and config.quantization.group_size not in (0, 128):
        ways.append("--group-size auto or 128 (fewer scales)")
    if config.storage.format == "native":
        st = storage_of(config, ctx.derived)
        if not st.int2 and (whole_file or not st.packed):
            ways.append("--target onnxruntime (int2 containers, which OpenVINO cannot read)")
        ways.append("--format compact (exact b-bit codes, no int4 container)")
    allowed = config.allocation.allowed_bits
    if 0 not in allowed:
        widths = ",".join(map(str, sorted({0, *allowed})))
        ways.append(f"--allowed-bits {widths} to let blocks be dropped to their mean (measured by the guard)")
    return "use " + ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def zero_bit_note(ctx: Context) -> str | None:
    """A note when the budget left many weights at 0 bits (their block mean), far outside what the expected-loss
    tables model well (DESIGN.md, Heads). 0 bits are opt-in (``--allowed-bits`` with 0, or ``--allocator
    selective``); in the native format the cheapest non-zero width (int4 codes plus fp32 scales) costs well over
    4 bits, so a lower budget with 0 allowed drops whole blocks to their mean. Says what keeps them instead."""
    if ctx.tables is None or ctx.allocation is None:
        return None
    bits = ctx.bits
    numel = sum(t.numel for t in ctx.tables.blocks)
    zero = sum(t.numel for t in ctx.tables.blocks if bits.get(t.name) == 0)
    if zero <= ZERO_BIT_NOTE * numel:
        return None
    cheapest = min((t.stored[i] / t.numel for t in ctx.tables.blocks for i, b in enumerate(t.bits) if b > 0),
                   default=0.0)
    return (f"{100 * zero / numel:.0f}% of the weights are stored as their block mean (0 bits): the cheapest "
            f"non-zero width stores about {cheapest:.2f} bits per weight in the {ctx.config.storage.format} format; "
            f"a larger --bits, --group-size auto (fewer scales), --format compact or --allowed-bits without 0 "
            f"keeps them")


UNSPENT_NOTE = 0.1
"""Share of a stored ``--bits`` budget left unspent above which ``--allocator uniform``'s report says why."""


def _stored_budget_bits(ctx: Context) -> float | None:
    """``--bits`` where it bounds the stored bits per weight (not ``--bits-payload``, ``--size-mb``, a fixed width)."""
    a = ctx.config.allocation
    if ctx.fixed or ctx.tables is None or a.bits_payload or a.size_mb is not None or a.bits is None:
        return None
    return float(a.bits)


def uniform_note(ctx: Context) -> str | None:
    """Why ``--allocator uniform`` left much of a stored budget unspent: one width for every weight, and the next
    width up stores more than the budget (in the native format int4 codes plus their scales cost 4.6 bits per weight
    at 32 rows, so ``--bits 4.5`` buys packed 3-bit grids everywhere, 3.6 bits). The default allocator spends it."""
    al, bits = ctx.allocation, _stored_budget_bits(ctx)
    if bits is None or al is None or ctx.config.allocation.allocator != "uniform" or ctx.stored_bytes is None:
        return None
    if al.method != "uniform" or "width" not in al.details or al.details.get("filled_layers"):
        return None
    numel = sum(t.numel for t in ctx.tables.blocks)
    spent = 8 * ctx.stored_bytes / numel
    if spent >= (1 - UNSPENT_NOTE) * bits:
        return None
    width = int(al.details["width"])
    wider = sorted({b for t in ctx.tables.blocks for b in t.bits if b > width})
    text = (f"--allocator uniform: every weight at {width} bits stores {spent:.2f} of the {bits:g} bits per weight "
            f"asked for")
    if wider:
        nxt = wider[0]
        cost = sum(float(t.stored[t.bits.index(nxt)] if nxt in t.bits else t.stored[t.bits.index(ctx.bits[t.name])])
                   for t in ctx.tables.blocks) / numel
        text += f"; the next width, {nxt} bits, would store about {cost:.2f} (codes in their container and scales)"
    return text + ": one width for all cannot spend the rest; the default allocator (leave --allocator out) does"


def prepare_note(ctx: Context) -> str | None:
    """Why the independent count against the given file (``bq-onnx inspect --reference``) reads below ``--bits``:
    the prepare passes removed float tensors that are not weights (BatchNormalization vectors folded into their
    Conv), and that room is not spent on the weights (:func:`other_bytes`)."""
    bits = _stored_budget_bits(ctx)
    if bits is None or not ctx.prepare_removed:
        return None
    numel = sum(t.numel for t in ctx.tables.blocks)
    less = 8 * ctx.prepare_removed / numel
    if less < 0.05:
        return None
    return (f"folding BatchNormalization into its Conv removed {ctx.prepare_removed / 1e3:.1f} kB of float vectors "
            f"({less:.2f} bits per weight) that are not weights; --bits {bits:g} bounds the quantized weights and "
            f"does not spend that room on them, so the count against the original file (bq-onnx inspect "
            f"--reference) reads about {less:.2f} bits per weight below {bits:g}")


def other_bytes(model: ir.Model, ctx: Context) -> int:
    """Stored bytes that are not the weights: ``ctx.source_bytes`` (the smaller of the model as given and as
    prepared; else ``model`` before the rewrite) less the weights. What the prepare passes add (the opset
    upgrade's ``Reduce*`` axes constants) counts against the budget, as :func:`bq_onnx.counting.count` subtracts the
    given model's; what they remove (BatchNormalization vectors folded into their Conv) is no credit for the weights
    to spend (the PP-OCR classifier's 35 BatchNormalization layers store 2.5 bits per weight: 34.52 counted bits per
    weight in its FP32 file, `benchmarks/zoo_s10.md`)."""
    source = ctx.source_bytes if ctx.source_bytes is not None else ir_stored_bytes(model)
    return source - sum(w.value.const_value.nbytes for w in ctx.weights if w.value.const_value is not None)


def serialized_bytes(model: ir.Model) -> int:
    """Bytes of the file ``save_model`` writes for ``model`` (a protobuf under 2 GB)."""
    return ir.serde.serialize_model(model).ByteSize()


PLACEHOLDER_NAME = "m" * 231 + ".onnx"
"""The output name a trial save uses: the longest ``save_model`` can write (checked: 236 characters; longer fail there
with "File name too long"). Every external tensor repeats its data file's name, so no real output is larger."""


def file_bytes(model: ir.Model) -> int:
    """Bytes :func:`~bq_onnx.model_io.save_model` writes for ``model``: the serialized size where it writes one
    file, else the model file and its external data (page-aligned), written once to a temporary folder."""
    from bq_onnx.model_io import external_data_threshold, external_tensors, model_nbytes, save_model

    if model_nbytes(model) <= external_data_threshold() and not any(True for _ in external_tensors(model)):
        return serialized_bytes(model)
    with tempfile.TemporaryDirectory(prefix="bq-size-") as folder:
        save_model(model, Path(folder) / PLACEHOLDER_NAME)
        return sum(f.stat().st_size for f in Path(folder).iterdir() if f.is_file())
