"""State a model feeds back to itself: which outputs are the next call's inputs, and runs chained through them.

Why: a streaming model (a voice-activity detector's LSTM state, a recurrent cell's ``h``/``c``) is called again
and again with the state it returned. Measured one call at a time, on samples that each carry the FP32 state, a
quantized model's error in that state costs nothing; in use it compounds over the stream. On silero-vad at 3.5
stored bits the allocation measured a lower one-call loss than uniform and a higher state error, and lost 1.2
points of decision agreement on streamed clips (``benchmarks/zoo_paired.md``); chained over the held-out samples
(each call fed the state the same model returned on the one before) the same two models rank the other way.

A pair is an input and an output of the same float type and the same shape on the data, whose names say the one
follows the other (:func:`follows`): the output is the input's name plus ``N``/``n``/``_out``/``_new``/``_next``
(``state`` -> ``stateN``, ``h`` -> ``hn``), or ``in``/``prev``/``past``/``old``/``0`` in the input's name is
``out``/``next``/``present``/``new``/``n`` in the output's. Names are required as well as shapes: an autoencoder's
reconstruction has its input's shape and is no state.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from bq_onnx.runtimes.base import Session

_SUFFIXES = ("n", "new", "out", "next")
_SWAPS = (("in", "out"), ("prev", "next"), ("past", "present"), ("old", "new"), ("0", "n"))


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[^0-9a-z]+", name.lower()) if w]


def follows(inp: str, out: str) -> bool:
    """Whether the output name ``out`` reads as the next value of the input ``inp`` (the module's rule)."""
    a, b = inp.lower(), out.lower()
    if a == b:
        return False
    if b.startswith(a) and b[len(a):].lstrip("._-:/") in _SUFFIXES:
        return True
    wa, wb = _words(a), _words(b)
    if len(wa) != len(wb) or not wa:
        return False
    differ = [(x, y) for x, y in zip(wa, wb) if x != y]
    if len(differ) != 1:
        return False
    x, y = differ[0]
    return any(x.endswith(old) and x[: len(x) - len(old)] + new == y for old, new in _SWAPS)


def feedback_pairs(feeds: Mapping[str, np.ndarray], names: Sequence[str], outputs: Sequence[np.ndarray]
                   ) -> list[tuple[str, int]]:
    """(input, index in ``names``) of each output fed back: of ``outputs`` (one run on ``feeds``), the float ones
    whose input (:func:`follows`) is in ``feeds`` with the same dtype and shape."""
    pairs = []
    taken: set[str] = set()
    for i, (name, value) in enumerate(zip(names, outputs)):
        value = np.asarray(value)
        if value.dtype.kind != "f":
            continue
        for inp, given in feeds.items():
            given = np.asarray(given)
            if inp not in taken and given.dtype == value.dtype and given.shape == value.shape \
                    and follows(inp, name):
                pairs.append((inp, i))
                taken.add(inp)
                break
    return pairs


def chained_runs(session: Session, steps: Iterable[Mapping[str, np.ndarray]], pairs: Sequence[tuple[str, int]],
                 extra: Mapping[str, np.ndarray] | None = None) -> list[list[np.ndarray]]:
    """``session`` on each of ``steps`` in order, each state input of ``pairs`` fed what the run before returned
    (the first step, and a step whose state has another shape, keep their own); ``extra``: fed to every run."""
    out: list[list[np.ndarray]] = []
    carry: dict[str, np.ndarray] = {}
    for feeds in steps:
        fed = {**feeds, **(extra or {})}
        for inp, value in carry.items():
            if np.shape(fed[inp]) == value.shape:
                fed[inp] = value
        result = session.run(fed)
        carry = {inp: np.asarray(result[i]) for inp, i in pairs}
        out.append(result)
    return out
