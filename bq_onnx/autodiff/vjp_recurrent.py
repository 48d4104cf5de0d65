"""VJP rules of the recurrent ops LSTM, GRU and RNN (default activations, every direction, both layouts).

The sequence length is symbolic in exported models, so the backward pass cannot be unrolled. Per direction the
rule emits two standard ``Scan`` nodes: a forward one that recomputes the recurrence (from X, W, R, B and the
initial states; the forward op's own outputs lack the LSTM cell states) and stacks per step what the backward
needs (gate activations, previous states), and a backward one over the reversed stacks that carries the state
gradients and stacks the gradient of every step's gate pre-activations. Everything that is not recurrent (the
input projection, dX, dW, dR, dB, peepholes) is one batched op over all steps outside the Scans. Values a step
reads from outside (R, peepholes) enter each Scan as states carried unchanged: OpenVINO's Scan reads no
outer-scope values. The rule needs no static shape.

Processing order: a reverse direction runs over X flipped along time (``Slice`` with step -1); both Scans only
ever run forward. ``sequence_lens`` is a mask per (step, batch): a masked step keeps the state and writes zeros
to Y, which reproduces the op for both directions (a reverse direction starts at step ``len - 1`` from the
initial state because every later step kept it).

Refused (the weights fall back to another estimator with a note): other ``activations``, ``clip``, LSTM
``input_forget``, and element types other than float32/float64.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, register

DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
INT64_MIN = -(2**63)


def _emit(cx: Vjp, tape: ir.tape.Tape, op_type: str, inputs: Sequence[ir.Value | None], count: int, attrs: dict
          ) -> Sequence[ir.Value]:
    """One node on ``tape`` named by the rule's emitter; ``attrs`` may hold ``num_outputs`` (Split's)."""
    name = cx.em.name(op_type)
    outs = tape.op_multi_out(op_type, inputs, attributes=attrs or None, num_outputs=count, name=name)
    for i, out in enumerate(outs):
        out.name = name if count == 1 else f"{name}.{i}"
    return outs


def _split(cx: Vjp, value: ir.Value, parts: int, axis: int = -1) -> Sequence[ir.Value]:
    """Equal parts of an outer-graph value (``Emitter.ops`` cannot pass Split's ``num_outputs`` attribute)."""
    return _emit(cx, cx.em.tape, "Split", [value], parts, {"axis": axis, "num_outputs": parts})


class _Body:
    """A Scan body under construction: typed inputs, nodes named by the rule's emitter, ``Constant`` nodes."""

    def __init__(self, cx: Vjp, dtype: ir.DataType) -> None:
        self.cx = cx
        self.dtype = dtype
        self.tape = ir.tape.Tape()
        self.outer_values: dict[ir.Value, ir.Value] = {}
        self._one: ir.Value | None = None

    def input(self, label: str, rank: int | None) -> ir.Value:
        shape = None if rank is None else ir.Shape([None] * rank)
        return ir.Value(name=self.cx.em.name(label), type=ir.TensorType(self.dtype), shape=shape)

    def outer(self, value: ir.Value) -> ir.Value:
        """An outer-graph value read by every step. OpenVINO's Scan reads no outer-scope values, so it enters
        as a state carried unchanged."""
        if value not in self.outer_values:
            rank = None if value.shape is None else len(value.shape)
            self.outer_values[value] = self.input("outer", rank)
        return self.outer_values[value]

    def op(self, op_type: str, inputs: Sequence[ir.Value | None], **attrs) -> ir.Value:
        return self.ops(op_type, inputs, 1, **attrs)[0]

    def ops(self, op_type: str, inputs: Sequence[ir.Value | None], count: int, **attrs) -> Sequence[ir.Value]:
        return _emit(self.cx, self.tape, op_type, inputs, count, attrs)

    def split(self, value: ir.Value, parts: int) -> Sequence[ir.Value]:
        """Equal parts along the last axis (the gates)."""
        return self.ops("Split", [value], parts, axis=-1, num_outputs=parts)

    # arithmetic shorthands keep the cell equations readable
    def add(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Add", [a, b])

    def sub(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Sub", [a, b])

    def mul(self, a: ir.Value, b: ir.Value) -> ir.Value:
        return self.op("Mul", [a, b])

    def one(self) -> ir.Value:
        if self._one is None:
            self._one = self.op("Constant", [], value=ir.tensor(np.array(1, dtype=self.dtype.numpy())))
        return self._one

    def sigmoid_grad(self, g: ir.Value, s: ir.Value) -> ir.Value:
        """g * s * (1 - s) for s = sigmoid(a)."""
        return self.mul(self.mul(g, s), self.sub(self.one(), s))

    def tanh_grad(self, g: ir.Value, t: ir.Value) -> ir.Value:
        """g * (1 - t^2) for t = tanh(a)."""
        return self.mul(g, self.sub(self.one(), self.mul(t, t)))

    def keep(self, value: ir.Value) -> ir.Value:
        """A body output must be a value of its own (not a body input, not another output)."""
        return self.op("Identity", [value])


Step = Callable[[_Body, list[ir.Value], list[ir.Value]], tuple[list[ir.Value], list[ir.Value]]]


def _scan(
    cx: Vjp, dtype: ir.DataType, states: list[ir.Value], seqs: list[tuple[ir.Value, int]], step: Step
) -> tuple[list[ir.Value], list[ir.Value]]:
    """A forward ``Scan`` over axis 0 of ``seqs`` (value, rank of one step) carrying ``states`` (rank 2).

    ``step(body, states, slices)`` returns the new states and the per-step outputs (outer values it reads go
    through ``body.outer``); returns the final states and the stacked per-step outputs.
    """
    body = _Body(cx, dtype)
    state_in = [body.input("state", 2) for _ in states]
    slices = [body.input("step", rank) for _, rank in seqs]
    new_states, outs = step(body, state_in, slices)
    outer = list(body.outer_values.items())
    outputs = [body.keep(v) for v in [*new_states, *(inner for _, inner in outer), *outs]]
    for out in outputs:
        out.type = ir.TensorType(dtype)
    inputs = [*state_in, *(inner for _, inner in outer), *slices]
    graph = ir.Graph(inputs, outputs, nodes=body.tape.nodes, name=cx.em.name("scan_body"))
    carried = [*states, *(value for value, _ in outer)]
    results = cx.ops("Scan", [*carried, *(v for v, _ in seqs)], len(outputs), body=graph, num_scan_inputs=len(seqs))
    return list(results[: len(states)]), list(results[len(carried) :])


def _attrs(cx: Vjp, node: ir.Node) -> int:
    """Refuse what the rules do not implement; returns the number of directions."""
    op = node.op_type
    direction = cx.attr("direction", "forward")
    directions = {"forward": 1, "reverse": 1, "bidirectional": 2}.get(direction)
    if directions is None:
        raise RuleUnavailable(f"{op} direction '{direction}'")
    acts = cx.attr("activations")
    if acts is not None and [a.lower() for a in acts] != list(DEFAULT_ACTIVATIONS[op]) * directions:
        raise RuleUnavailable(f"{op} activations {list(acts)} (only the default {list(DEFAULT_ACTIVATIONS[op])})")
    if cx.attr("clip") is not None:
        raise RuleUnavailable(f"{op} with clip")
    if op == "LSTM" and int(cx.attr("input_forget", 0)):
        raise RuleUnavailable("LSTM with input_forget")
    return directions


@register("LSTM", "GRU", "RNN")
def recurrent(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dX, dW, dR, dB, d initial_h (and LSTM's d initial_c, dP) from the gradients of Y, Y_h (and Y_c).

    Layout 1 is transposed to layout 0 around the computation; each direction is differentiated on its own
    and the results are stacked along the direction axis (dX summed).
    """
    op = node.op_type
    directions = _attrs(cx, node)
    x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
    b, lens, h0 = cx.input(3), cx.input(4), cx.input(5)
    c0, p = (cx.input(6), cx.input(7)) if op == "LSTM" else (None, None)
    dtype = x.dtype or w.dtype
    if dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        raise RuleUnavailable(f"{op} of element type {dtype} (float32/float64 only)")
    batch_first = int(cx.attr("layout", 0)) == 1

    def seq_first(v: ir.Value) -> ir.Value:
        return cx.op("Transpose", [v], perm=[1, 0, 2]) if batch_first else v

    xs = seq_first(x)
    g_y, g_yh = (gy + [None] * 3)[0], (gy + [None] * 3)[1]
    g_yc = (gy + [None] * 3)[2] if op == "LSTM" else None
    if g_y is not None and batch_first:
        g_y = cx.op("Transpose", [g_y], perm=[1, 2, 0, 3])
    g_yh, g_yc = (seq_first(g) if g is not None else None for g in (g_yh, g_yc))

    zero = cx.em.const(np.array(0, dtype=dtype.numpy()))
    state_shape = cx.op("Concat", [cx.shape(xs, 1, 2), cx.shape(r, 2, 3)], axis=0)
    zeros = cx.op("Expand", [zero, state_shape])
    mask = None
    if lens is not None:
        length = cx.op("Squeeze", [cx.shape(xs, 0, 1)])
        steps = cx.op("Range", [cx.em.const(np.array(0, np.int64)), length, cx.em.const(np.array(1, np.int64))])
        valid = cx.op("Less", [cx.op("Unsqueeze", [steps, cx.ints_const(1)]),
                               cx.op("Unsqueeze", [cx.op("Cast", [lens], to=ir.DataType.INT64), cx.ints_const(0)])])
        mask = cx.op("Unsqueeze", [cx.op("Cast", [valid], to=dtype), cx.ints_const(-1)])  # [T, batch, 1]

    reverse = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[cx.attr("direction", "forward")]
    per_dir: list[dict[str, ir.Value]] = []
    for d in range(directions):
        flip = _flip(cx) if reverse[d] else _same
        index = cx.em.const(np.array(d, np.int64))

        def pick(v: ir.Value, axis: int = 0, index: ir.Value = index) -> ir.Value:
            return cx.op("Gather", [v, index], axis=axis)

        ctx = _Direction(
            cx=cx, op=op, dtype=dtype, linear_before_reset=int(cx.attr("linear_before_reset", 0)),
            x=flip(xs), w=pick(w), r=pick(r), b=None if b is None else pick(b), p=None if p is None else pick(p),
            h0=zeros if h0 is None else pick(seq_first(h0)), c0=zeros if c0 is None else pick(seq_first(c0)),
            mask=None if mask is None else flip(mask),
            g_y=None if g_y is None else flip(pick(g_y, 1)),
            g_yh=zeros if g_yh is None else pick(g_yh), g_yc=zeros if g_yc is None else pick(g_yc),
        )
        grads = _differentiate(ctx)
        grads["x"] = flip(grads["x"])
        per_dir.append(grads)

    def stacked(key: str) -> ir.Value:
        parts = [cx.op("Unsqueeze", [g[key], cx.ints_const(0)]) for g in per_dir]
        return parts[0] if len(parts) == 1 else cx.op("Concat", parts, axis=0)

    dx = per_dir[0]["x"]
    for g in per_dir[1:]:
        dx = cx.op("Add", [dx, g["x"]])
    out: list[ir.Value | None] = [seq_first(dx), stacked("w"), stacked("r"), stacked("b") if b is not None else None,
                                  None, seq_first(stacked("h0")) if h0 is not None else None]
    if op == "LSTM":
        out += [seq_first(stacked("c0")) if c0 is not None else None, stacked("p") if p is not None else None]
    return out[: len(node.inputs)]


def _same(v: ir.Value) -> ir.Value:
    return v


def _flip(cx: Vjp) -> Callable[[ir.Value], ir.Value]:
    def flip(v: ir.Value) -> ir.Value:
        return cx.op("Slice", [v, cx.ints_const(-1), cx.ints_const(INT64_MIN), cx.ints_const(0), cx.ints_const(-1)])

    return flip


@dataclasses.dataclass
class _Direction:
    """One direction's inputs in processing order (seq-first, flipped for a reverse direction)."""

    cx: Vjp
    op: str
    dtype: ir.DataType
    linear_before_reset: int
    x: ir.Value
    w: ir.Value
    r: ir.Value
    b: ir.Value | None
    p: ir.Value | None
    h0: ir.Value
    c0: ir.Value
    mask: ir.Value | None
    g_y: ir.Value | None
    g_yh: ir.Value
    g_yc: ir.Value


def _differentiate(dn: _Direction) -> dict[str, ir.Value]:
    """The input projection of every step at once ([T, batch, gates * hidden], with the biases that add to it),
    then the op's own recurrence."""
    cx = dn.cx
    xw = cx.op("MatMul", [dn.x, cx.op("Transpose", [dn.w], perm=[1, 0])])
    rb = None
    if dn.b is not None:
        wb, rb = _split(cx, dn.b, 2, 0)
        if dn.op == "GRU" and dn.linear_before_reset:
            rb_z, rb_r, rb_h = _split(cx, rb, 3, 0)
            xw = cx.op("Add", [xw, cx.op("Add", [wb, cx.op("Concat", [rb_z, rb_r, cx.zeros_like(rb_h)], axis=0)])])
            rb = rb_h  # added inside the reset gate's product
        else:
            xw = cx.op("Add", [xw, cx.op("Add", [wb, rb])])
            rb = None
    return {"LSTM": _lstm, "GRU": _gru, "RNN": _rnn}[dn.op](dn, xw, rb)


def _masked(body: _Body, m: ir.Value | None, new: ir.Value, old: ir.Value) -> ir.Value:
    """The carried state: ``new`` where the step is valid, else ``old``."""
    return new if m is None else body.add(old, body.mul(m, body.sub(new, old)))


def _step_grad(body: _Body, m: ir.Value | None, g_state: ir.Value, g_y: ir.Value | None) -> ir.Value:
    """The gradient reaching a step's new state: the carried one plus Y's (both zero on masked steps)."""
    g = g_state if g_y is None else body.add(g_state, g_y)
    return g if m is None else body.mul(m, g)


def _pass_through(body: _Body, m: ir.Value | None, g_prev: ir.Value, g_state: ir.Value) -> ir.Value:
    """A masked step hands the carried gradient on unchanged."""
    return g_prev if m is None else body.add(g_prev, body.mul(body.sub(body.one(), m), g_state))


def _seqs(dn: _Direction, stacks: list[ir.Value]) -> tuple[list[tuple[ir.Value, int]], int | None, int | None]:
    """The backward Scan's inputs: the forward stacks, the mask and Y's gradient, all reversed in time;
    returns them with the slice positions of the mask and of Y's gradient."""
    flip = _flip(dn.cx)
    seqs = [(flip(v), 2) for v in stacks]
    mi = yi = None
    if dn.mask is not None:
        mi = len(seqs)
        seqs.append((flip(dn.mask), 2))
    if dn.g_y is not None:
        yi = len(seqs)
        seqs.append((flip(dn.g_y), 2))
    return seqs, mi, yi


def _weight_grad(cx: Vjp, g: ir.Value, x: ir.Value) -> ir.Value:
    """sum over steps and batch of g^T x: [rows, cols] from [T, batch, rows] and [T, batch, cols]."""
    gt = cx.op("Transpose", [cx.op("Flatten", [g], axis=2)], perm=[1, 0])
    return cx.op("MatMul", [gt, cx.op("Flatten", [x], axis=2)])


def _sum_steps(cx: Vjp, g: ir.Value) -> ir.Value:
    return cx.reduce_sum(g, [0, 1], keepdims=0)


def _common(dn: _Direction, g_pre: ir.Value, g_rec: ir.Value, h_in: ir.Value) -> dict[str, ir.Value]:
    """dX, dW, dR, dB from the stacked gradients of the gate pre-activations (``g_pre``: what X W^T + Wb
    feeds; ``g_rec``: what the recurrent product feeds, read with ``h_in``)."""
    cx = dn.cx
    flip = _flip(cx)
    g_pre, g_rec = flip(g_pre), flip(g_rec)  # back to processing order
    grads = {
        "x": cx.op("MatMul", [g_pre, cx.own_copy(dn.w)]),
        "w": _weight_grad(cx, g_pre, dn.x),
        "r": _weight_grad(cx, g_rec, h_in),
    }
    if dn.b is not None:
        grads["b"] = cx.op("Concat", [_sum_steps(cx, g_pre), _sum_steps(cx, g_rec)], axis=0)
    return grads


# ----------------------------------------------------------------------------------------------- LSTM


def _lstm(dn: _Direction, xw: ir.Value, _: ir.Value | None) -> dict[str, ir.Value]:
    """i, o, f, c~ gates (W's row order); peepholes read c_{t-1} for i and f and the new c for o."""
    cx = dn.cx
    r_t = cx.op("Transpose", [dn.r], perm=[1, 0])
    peep = None if dn.p is None else _split(cx, dn.p, 3, 0)  # i, o, f
    masked = dn.mask is not None

    def forward(body: _Body, states: list[ir.Value], sl: list[ir.Value]):
        h, c = states
        m = sl[1] if masked else None
        pre = body.add(sl[0], body.op("MatMul", [h, body.outer(r_t)]))
        ai, ao, af, ac = body.split(pre, 4)
        if peep is not None:
            ai = body.add(ai, body.mul(body.outer(peep[0]), c))
            af = body.add(af, body.mul(body.outer(peep[2]), c))
        i, f, cc = body.op("Sigmoid", [ai]), body.op("Sigmoid", [af]), body.op("Tanh", [ac])
        c_new = body.add(body.mul(f, c), body.mul(i, cc))
        if peep is not None:
            ao = body.add(ao, body.mul(body.outer(peep[1]), c_new))
        o = body.op("Sigmoid", [ao])
        h_new = body.mul(o, body.op("Tanh", [c_new]))
        acts = body.op("Concat", [i, o, f, cc], axis=-1)
        return [_masked(body, m, h_new, h), _masked(body, m, c_new, c)], [acts, c_new, h, c]

    seqs = [(xw, 2)] + ([(dn.mask, 2)] if masked else [])
    _, (acts, c_new, h_prev, c_prev) = _scan(cx, dn.dtype, [dn.h0, dn.c0], seqs, forward)
    r_own = cx.own_copy(dn.r)
    bseqs, mi, yi = _seqs(dn, [acts, c_new, c_prev])

    def backward(body: _Body, states: list[ir.Value], sl: list[ir.Value]):
        gh, gc = states
        acts_t, cn, cp = sl[:3]
        m = None if mi is None else sl[mi]
        i, o, f, cc = body.split(acts_t, 4)
        g_h = _step_grad(body, m, gh, None if yi is None else sl[yi])
        g_c = gc if m is None else body.mul(m, gc)
        tc = body.op("Tanh", [cn])
        g_c = body.add(g_c, body.tanh_grad(body.mul(g_h, o), tc))
        g_ao = body.sigmoid_grad(body.mul(g_h, tc), o)
        if peep is not None:
            g_c = body.add(g_c, body.mul(g_ao, body.outer(peep[1])))
        g_ai = body.sigmoid_grad(body.mul(g_c, cc), i)
        g_af = body.sigmoid_grad(body.mul(g_c, cp), f)
        g_ac = body.tanh_grad(body.mul(g_c, i), cc)
        g_cp = body.mul(g_c, f)
        if peep is not None:
            g_peep = body.add(body.mul(g_ai, body.outer(peep[0])), body.mul(g_af, body.outer(peep[2])))
            g_cp = body.add(g_cp, g_peep)
        g_pre = body.op("Concat", [g_ai, g_ao, g_af, g_ac], axis=-1)
        g_hp = body.op("MatMul", [g_pre, body.outer(r_own)])
        return [_pass_through(body, m, g_hp, gh), _pass_through(body, m, g_cp, gc)], [g_pre]

    (g_h0, g_c0), (g_pre,) = _scan(cx, dn.dtype, [dn.g_yh, dn.g_yc], bseqs, backward)
    grads = _common(dn, g_pre, g_pre, h_prev)
    grads["h0"], grads["c0"] = g_h0, g_c0
    if peep is not None:
        g_ai, g_ao, g_af, _ = _split(cx, _flip(cx)(g_pre), 4, -1)
        grads["p"] = cx.op("Concat", [_sum_steps(cx, cx.op("Mul", [g_ai, c_prev])),
                                      _sum_steps(cx, cx.op("Mul", [g_ao, c_new])),
                                      _sum_steps(cx, cx.op("Mul", [g_af, c_prev]))], axis=0)
    return grads


# ----------------------------------------------------------------------------------------------- GRU


def _gru(dn: _Direction, xw: ir.Value, rb_h: ir.Value | None) -> dict[str, ir.Value]:
    """z, r, h~ gates; ``linear_before_reset`` 0: h~ reads (r * h) Rh^T, 1: r * (h Rh^T + Rbh)."""
    cx = dn.cx
    lbr = dn.linear_before_reset
    r_z, r_r, r_h = _split(cx, dn.r, 3, 0)  # [hidden, hidden] each
    rt_z, rt_r, rt_h = (cx.op("Transpose", [v], perm=[1, 0]) for v in (r_z, r_r, r_h))
    masked = dn.mask is not None

    def forward(body: _Body, states: list[ir.Value], sl: list[ir.Value]):
        (h,) = states
        m = sl[1] if masked else None
        xz, xr, xh = body.split(sl[0], 3)
        z = body.op("Sigmoid", [body.add(xz, body.op("MatMul", [h, body.outer(rt_z)]))])
        rg = body.op("Sigmoid", [body.add(xr, body.op("MatMul", [h, body.outer(rt_r)]))])
        if lbr:
            q = body.op("MatMul", [h, body.outer(rt_h)])
            if rb_h is not None:
                q = body.add(q, body.outer(rb_h))
            hc = body.op("Tanh", [body.add(xh, body.mul(rg, q))])
        else:
            q = None
            hc = body.op("Tanh", [body.add(xh, body.op("MatMul", [body.mul(rg, h), body.outer(rt_h)]))])
        h_new = body.add(hc, body.mul(z, body.sub(h, hc)))
        outs = [body.op("Concat", [z, rg, hc], axis=-1), h] + ([q] if q is not None else [])
        return [_masked(body, m, h_new, h)], outs

    seqs = [(xw, 2)] + ([(dn.mask, 2)] if masked else [])
    _, stacks = _scan(cx, dn.dtype, [dn.h0], seqs, forward)
    acts, h_prev = stacks[0], stacks[1]
    bseqs, mi, yi = _seqs(dn, stacks)
    own = [cx.own_copy(v) for v in (r_z, r_r, r_h)]

    def backward(body: _Body, states: list[ir.Value], sl: list[ir.Value]):
        (gh,) = states
        acts_t, hp = sl[0], sl[1]
        m = None if mi is None else sl[mi]
        z, rg, hc = body.split(acts_t, 3)
        g = _step_grad(body, m, gh, None if yi is None else sl[yi])
        g_z = body.sigmoid_grad(body.mul(g, body.sub(hp, hc)), z)
        g_ah = body.tanh_grad(body.sub(g, body.mul(g, z)), hc)
        g_hp = body.mul(g, z)
        if lbr:
            g_q = body.mul(g_ah, rg)
            g_r = body.sigmoid_grad(body.mul(g_ah, sl[2]), rg)
            g_hp = body.add(g_hp, body.op("MatMul", [g_q, body.outer(own[2])]))
        else:
            g_rh = body.op("MatMul", [g_ah, body.outer(own[2])])
            g_r = body.sigmoid_grad(body.mul(g_rh, hp), rg)
            g_hp = body.add(g_hp, body.mul(g_rh, rg))
            g_q = g_ah
        g_zr = body.add(body.op("MatMul", [g_z, body.outer(own[0])]), body.op("MatMul", [g_r, body.outer(own[1])]))
        g_hp = body.add(g_hp, g_zr)
        g_pre = body.op("Concat", [g_z, g_r, g_ah], axis=-1)
        g_rec = body.op("Concat", [g_z, g_r, g_q], axis=-1)
        return [_pass_through(body, m, g_hp, gh)], [g_pre, g_rec]

    (g_h0,), (g_pre, g_rec) = _scan(cx, dn.dtype, [dn.g_yh], bseqs, backward)
    grads = _common(dn, g_pre, g_rec, h_prev)
    if not lbr:  # h~'s recurrent product reads r * h_{t-1}: its rows of dR differ from the z and r rows
        g_z, g_r, g_h = _split(cx, _flip(cx)(g_pre), 3, -1)
        r_act = _split(cx, acts, 3, -1)[1]
        zr = cx.op("Concat", [g_z, g_r], axis=-1)
        grads["r"] = cx.op("Concat", [_weight_grad(cx, zr, h_prev),
                                      _weight_grad(cx, g_h, cx.op("Mul", [r_act, h_prev]))], axis=0)
    grads["h0"] = g_h0
    return grads


# ----------------------------------------------------------------------------------------------- RNN


def _rnn(dn: _Direction, xw: ir.Value, _: ir.Value | None) -> dict[str, ir.Value]:
    """h_t = tanh(x_t W^T + h_{t-1} R^T + Wb + Rb)."""
    cx = dn.cx
    r_t = cx.op("Transpose", [dn.r], perm=[1, 0])
    masked = dn.mask is not None

    def forward(body: _Body, states: list[ir.Value], sl: list[ir.Value]):
        (h,) = states
        m = sl[1] if masked else None
        h_new = body.op("Tanh", [body.add(sl[0], body.op("MatMul", [h, body.outer(r_t)]))])
        return [_masked(body, m, h_new, h)], [h_new, h]

    seqs = [(xw, 2)] + ([(dn.mask, 2)] if masked else [])
    _, (h_new, h_prev) = _scan(cx, dn.dtype, [dn.h0], seqs, forward)
    bseqs, mi, yi = _seqs(dn, [h_new])
    r_own = cx.own_copy(dn.r)

    def backward(body: _Body, states: list[ir.Value], sl: list[ir.Value]):
        (gh,) = states
        m = None if mi is None else sl[mi]
        g_pre = body.tanh_grad(_step_grad(body, m, gh, None if yi is None else sl[yi]), sl[0])
        return [_pass_through(body, m, body.op("MatMul", [g_pre, body.outer(r_own)]), gh)], [g_pre]

    (g_h0,), (g_pre,) = _scan(cx, dn.dtype, [dn.g_yh], bseqs, backward)
    grads = _common(dn, g_pre, g_pre, h_prev)
    grads["h0"] = g_h0
    return grads
