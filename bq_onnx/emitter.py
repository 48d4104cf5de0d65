"""One node emitter for every graph bq-onnx writes: gradient graphs, decode graphs and decode function bodies.

An emitter appends nodes to a tape under unique names ``{prefix}{label}_{n}``; what differs between its users
is only where constants go, so each use is a small subclass that says that and nothing else:

* :class:`GradientEmitter` (autodiff): deduplicated initializers of its own, typed and shaped (rules and shape
  inference read their dtype), named ``{prefix}const.{sha1[:8]}``.
* :class:`GraphEmitter` (decode ops in the main graph): initializers deduplicated across all the emitters of
  one rewrite through a ``shared`` dict, untyped (no value_info is written for them), named
  ``bq.const.{label}.{sha1[:10]}`` so that equal content gets one name whichever weight asked first; stored
  tensors of one weight come from :meth:`GraphEmitter.tensor`.
* :class:`FunctionEmitter` (decode function bodies): ``Constant`` nodes, named like any other node.

These names are part of the written model (outputs are byte-identical across versions), so each scheme is kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir


def i64(*values: int) -> np.ndarray:
    """An int64 vector: the shape and index constants every emitted graph needs."""
    return np.array(values, dtype=np.int64)


def _content_key(array: np.ndarray) -> tuple:
    return (array.dtype.str, array.shape, array.tobytes())


def _digest(key: tuple, length: int) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:length]


class Emitter:
    """Appends nodes to ``tape`` with unique names; subclasses decide how :meth:`const` stores a constant."""

    def __init__(self, prefix: str) -> None:
        self.tape = ir.tape.Tape()
        self.prefix = prefix
        self._count = 0
        self.derived: dict = {}

    def derive(self, key: tuple, build: Callable[[], ir.Value]) -> ir.Value:
        """A value computed by nodes (not stored), built once per ``derived`` dict: a decode's lookup tables are
        computed once per graph, not once per weight (their nodes named ``bq{digest}/...`` after a digest of
        this emitter's prefix, short but as unique as it)."""
        if key not in self.derived:
            prefix, self.prefix = self.prefix, f"bq{hashlib.sha1(self.prefix.encode()).hexdigest()[:8]}/"
            try:
                self.derived[key] = build()
            finally:
                self.prefix = prefix
        return self.derived[key]

    def name(self, label: str) -> str:
        """The next unique node name, ``{prefix}{label}_{n}``."""
        self._count += 1
        return f"{self.prefix}{label}_{self._count}"

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], label: str = "", *, domain: str = "",
           **attrs) -> ir.Value:
        """One node with one output, named after ``label`` (default: the op type); ``None`` attributes are left out."""
        return self.ops(op_type, inputs, 1, label, domain=domain, **attrs)[0]

    def ops(self, op_type: str, inputs: Sequence[ir.Value | None], count: int, label: str = "", *,
            domain: str = "", **attrs) -> Sequence[ir.Value]:
        """One node with ``count`` outputs, named ``name`` (one output) or ``name.i`` (``count``, not ``num_outputs``:
        that is an attribute of Split)."""
        name = self.name(label or op_type)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        outs = self.tape.op_multi_out(op_type, inputs, attributes=attrs or None, num_outputs=count,
                                      name=name, domain=domain)
        for i, out in enumerate(outs):
            out.name = name if count == 1 else f"{name}.{i}"
        return outs

    def const(self, array: np.ndarray | float | int, label: str = "const") -> ir.Value:
        """A constant value holding ``array``."""
        raise NotImplementedError(f"{type(self).__name__} does not say where constants go")


class GradientEmitter(Emitter):
    """Constants become typed initializers, deduplicated per emitter and listed in :attr:`initializers`."""

    def __init__(self, prefix: str) -> None:
        super().__init__(prefix)
        self.initializers: list[ir.Value] = []
        self._consts: dict[tuple, ir.Value] = {}

    def const(self, array: np.ndarray | float | int, label: str = "const") -> ir.Value:
        array = np.asarray(array)
        key = _content_key(array)
        if key not in self._consts:
            name = f"{self.prefix}{label}.{_digest(key, 8)}"
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            value.dtype = ir.DataType.from_numpy(array.dtype)
            value.shape = ir.Shape(array.shape)
            self._consts[key] = value
            self.initializers.append(value)
        return self._consts[key]


class GraphEmitter(Emitter):
    """Constants become untyped initializers in ``shared`` (one dict for all emitters of a rewrite, which
    registers them); :meth:`tensor` stores a weight's own tensors on the tape."""

    def __init__(self, prefix: str, shared: dict | None = None, derived: dict | None = None) -> None:
        super().__init__(prefix)
        self.shared = {} if shared is None else shared
        if derived is not None:  # one graph's computed values, shared by its weights' emitters (in node order)
            self.derived = derived
        self._stored: dict[tuple, ir.Value] = {}

    def const(self, array: np.ndarray | float | int, label: str = "const") -> ir.Value:
        array = np.asarray(array)
        key = _content_key(array)
        if key not in self.shared:
            name = f"bq.const.{label}.{_digest(key, 10)}"
            self.shared[key] = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        return self.shared[key]

    def tensor(self, array: np.ndarray, name: str, dtype: ir.DataType | None = None, *, reuse: bool = False
               ) -> ir.Value:
        """A stored initializer of this weight. ``reuse``: an identical array this emitter already stored with
        ``reuse`` is returned instead (slices of one tensor share its codebook)."""
        key = _content_key(array) if reuse else None
        if key is not None and key in self._stored:
            return self._stored[key]
        value = ir.Value(name=name, const_value=ir.tensor(array, dtype=dtype, name=name))
        self.tape._initializers.append(value)  # the tape records what the rewrite must register
        if key is not None:
            self._stored[key] = value
        return value


class FunctionEmitter(Emitter):
    """Constants become ``Constant`` nodes of the function body (a function has no initializers)."""

    def const(self, array: np.ndarray | float | int, label: str = "const") -> ir.Value:
        name = self.name(label)
        out = self.tape.op("Constant", [], attributes={"value": ir.tensor(np.asarray(array))}, name=name)
        out.name = name
        return out
