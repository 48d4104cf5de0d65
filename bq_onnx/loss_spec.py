"""What ``--loss`` says, parsed strictly: which outputs (or last-axis slices of them) the loss fits, by which kind
of loss, with which weight. Standard library only (the CLI parses options without numpy or onnx).

Forms (repeat ``--loss`` for several terms; the loss is their weighted sum):

* ``KIND``: one term on the ``--output-name`` output (default: the first float output), as before.
* ``OUTPUT=KIND[:WEIGHT]``: a term on the named output, weight 1 unless given.
* ``OUTPUT@START:STOP=KIND[:WEIGHT]``: a term on the slice ``START:STOP`` of the output's last axis (Python
  slice bounds: either may be empty or negative, no step), e.g. ``scores@4:=kl`` or ``scores@:4=smse:0.1``.

Kinds: ``kl`` (to the FP32 distribution over the last axis; reads logits, or probabilities where the FP32 rows
already are distributions), ``ce`` (cross-entropy to ``--labels``), ``mse`` (``0.5 |y - t|^2``, t = labels or the
FP32 output), ``smse`` (scale-free MSE: each channel divided by its FP32 spread), ``cosine`` (``1 - cos(y, y_fp32)``
per row of the last axis), ``auto`` (the default rule of :mod:`bq_onnx.estimators.loss_plan` on that output).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from bq_onnx.errors import UsageError

KINDS: tuple[str, ...] = ("kl", "ce", "mse", "smse", "cosine", "auto")
FORMS = "KIND or OUTPUT[@START:STOP]=KIND[:WEIGHT]"
_SLICE = re.compile(r"^(-?\d*):(-?\d*)$")


@dataclasses.dataclass(frozen=True)
class LossTerm:
    """One term of the loss: ``kind`` on ``output`` (None: ``--output-name`` or the default output), on the last
    axis' slice ``start:stop`` (None: that bound is open), times ``weight``."""

    kind: str
    output: str | None = None
    start: int | None = None
    stop: int | None = None
    weight: float = 1.0

    @property
    def sliced(self) -> bool:
        return self.start is not None or self.stop is not None

    def __str__(self) -> str:
        if self.output is None:
            return self.kind
        cut = f"@{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}" \
            if self.sliced else ""
        weight = "" if self.weight == 1.0 else f":{self.weight:g}"
        return f"{self.output}{cut}={self.kind}{weight}"


def _kind(text: str, item: str, flag: str) -> str:
    if text not in KINDS:
        raise UsageError(f"{flag} {item!r}: the kind must be one of {', '.join(KINDS)}, got {text!r}")
    return text


def parse_term(item: str, flag: str = "--loss") -> LossTerm:
    """One ``--loss`` value (see the module's forms) -> a :class:`LossTerm`."""
    if not isinstance(item, str) or not item.strip():
        raise UsageError(f"{flag} takes {FORMS}, got {item!r}")
    item = item.strip()
    target, sep, choice = item.rpartition("=")
    if not sep:
        return LossTerm(_kind(item, item, flag))
    if not target:
        raise UsageError(f"{flag} {item!r}: no output name before '=' (forms: {FORMS})")
    kind, colon, weight_text = choice.partition(":")
    weight = 1.0
    if colon:
        try:
            weight = float(weight_text)
        except ValueError:
            raise UsageError(f"{flag} {item!r}: the weight must be a number, got {weight_text!r}") from None
        if not math.isfinite(weight) or weight <= 0:
            raise UsageError(f"{flag} {item!r}: the weight must be a positive number, got {weight_text!r}")
    output, at, cut = target.rpartition("@")
    start = stop = None
    if at:
        match = _SLICE.match(cut)
        if not match or not output:
            raise UsageError(f"{flag} {item!r}: after '@' comes a last-axis slice START:STOP (e.g. 4: or 0:4), "
                             f"got {cut!r}")
        start, stop = (int(b) if b not in ("", "-") else None for b in match.groups())
        if "-" in match.groups():
            raise UsageError(f"{flag} {item!r}: bad slice bound in {cut!r}")
    else:
        output = target
    return LossTerm(_kind(kind, item, flag), output, start, stop, weight)


def parse_loss(value: Any, flag: str = "--loss") -> tuple[LossTerm, ...] | None:
    """``None`` (the default rule), one string or a list of them -> the terms; a plain ``KIND`` stands alone."""
    if value is None:
        return None
    if isinstance(value, LossTerm):
        return (value,)
    items = [value] if isinstance(value, str) else list(value)
    if not items:
        return None
    terms = tuple(t if isinstance(t, LossTerm) else parse_term(t, flag) for t in items)
    if len(terms) > 1 and any(t.output is None for t in terms):
        raise UsageError(f"{flag}: a plain KIND is the whole loss; with several terms name each output "
                         f"({FORMS})")
    return terms


def describe(terms: tuple[LossTerm, ...] | None) -> str:
    """The option's value as the user would write it (``auto`` for the default rule)."""
    return "auto" if terms is None else " ".join(str(t) for t in terms)
