"""VJP rule of Einsum: the gradient of operand i is an Einsum of the output gradient with the other operands.

y[out] = sum over the other labels of prod_j x_j[term_j]; so dx_i[term_i] = sum over the labels not in term_i of
g[out] prod_{j != i} x_j[term_j]. Ellipses become explicit labels (right-aligned, static ranks needed). A label
of term_i that occurs nowhere else was summed inside x_i alone: the Einsum leaves it out and the result is
broadcast back along it. A label whose dim x_i has as 1 while the others broadcast it is summed back. Scalar
operands (empty terms) and a scalar g are factors multiplied in afterwards. Refused: a label repeated inside one
term (diagonals, traces).
"""

from __future__ import annotations

import string

import onnx_ir as ir

from bq_onnx.autodiff.vjp_common import Grads, RuleUnavailable, Vjp, register


def _parse(equation: str, ranks: list[int]) -> tuple[list[str], str]:
    """Terms and output with every ellipsis spelled out in unused labels."""
    equation = equation.replace(" ", "")
    lhs, arrow, out = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise RuleUnavailable("Einsum equation and inputs disagree")
    used = set(equation) - set(".,->")
    free = [c for c in string.ascii_letters if c not in used]
    widths = [rank - (len(t) - 3) for t, rank in zip(terms, ranks) if "..." in t]
    width = max(widths, default=0)
    if width > len(free):
        raise RuleUnavailable("Einsum with too many labels")
    ellipsis = "".join(free[:width])
    spelled = []
    for term, rank in zip(terms, ranks):
        if "..." in term:
            n = rank - (len(term) - 3)
            term = term.replace("...", ellipsis[width - n :] if n else "")
        if len(term) != rank:
            raise RuleUnavailable("Einsum term and operand rank disagree")
        spelled.append(term)
    if not arrow:
        counts = "".join(spelled)
        out = ellipsis + "".join(sorted(c for c in set(counts) if counts.count(c) == 1 and c not in ellipsis))
    else:
        out = out.replace("...", ellipsis)
    return spelled, out


def _dims(value: ir.Value) -> list:
    return list(value.shape) if value.shape is not None else []


@register("Einsum")
def einsum(cx: Vjp, node: ir.Node, gy: list) -> Grads:
    """dx_i = einsum(g, x_j (j != i) -> term_i), broadcast along labels only x_i has, summed along x_i's
    broadcast (length-1) dims."""
    inputs = list(node.inputs)
    ranks = [cx.rank(x) for x in inputs]
    terms, out = _parse(str(cx.attr("equation")), ranks)
    if any(len(set(t)) != len(t) for t in terms) or len(set(out)) != len(out):
        raise RuleUnavailable("Einsum with a repeated label in one term (diagonal)")
    g, y = gy[0], node.outputs[0]
    static: dict[str, set] = {}
    for term, x in zip(terms, inputs):
        for label, dim in zip(term, _dims(x)):
            static.setdefault(label, set()).add(dim if isinstance(dim, int) else None)
    y_dims = _dims(y)
    for k, label in enumerate(out):
        dims = static.get(label, set())
        if 1 in dims and len(dims) > 1 and (len(y_dims) != len(out) or y_dims[k] == 1):
            # onnx's shape inference can give a broadcast label the length 1 (ij,ij->ij with [1, n], [m, n]),
            # and the rules after the Einsum would then sum g to that wrong shape
            raise RuleUnavailable("Einsum output shape inferred without the broadcast of a length-1 label")
    grads: list[ir.Value | None] = []
    for i, (term, x) in enumerate(zip(terms, inputs)):
        if not cx.needs(i):
            grads.append(None)
            continue
        factors = [(out, g)] + [(t, v) for j, (t, v) in enumerate(zip(terms, inputs)) if j != i]
        present = set("".join(t for t, _ in factors))
        kept = "".join(c for c in term if c in present)
        tensors = [(t, v) for t, v in factors if t]
        scalars = [v for t, v in factors if not t]
        if not tensors:
            dx = scalars.pop(0)
        elif len(tensors) == 1 and sorted(tensors[0][0]) == sorted(kept):
            t, v = tensors[0]
            dx = v if t == kept else cx.op("Transpose", [v], perm=[t.index(c) for c in kept])
        else:
            equation = ",".join(t for t, _ in tensors) + "->" + kept
            dx = cx.op("Einsum", [v for _, v in tensors], equation=equation)
        for v in scalars:
            dx = cx.op("Mul", [dx, v])
        if kept != term:
            missing = [k for k, c in enumerate(term) if c not in present]
            dx = cx.op("Unsqueeze", [dx, cx.ints_const(*missing)])
        # dx's dims as far as shapes say: where x_i has a 1 that another factor may broadcast, an unknown dim, so
        # that unbroadcast sums it (or decides at run time); labels only x_i has are 1 until the Expand.
        shaped = [(out, y)] + [(t, v) for t, v in factors[1:]]
        guess = []
        for k, c in enumerate(term):
            own = _dims(x)[k]
            others = [d for t, v in shaped for lab, d in zip(t, _dims(v)) if lab == c]
            if c not in present:
                guess.append(1)
            elif others and all(isinstance(d, int) and d == own for d in others):
                guess.append(own)
            else:
                guess.append(ir.SymbolicDim(None))
        dx = cx.unbroadcast(dx, ir.Shape(guess), x)
        if kept != term:
            dx = cx.op("Expand", [dx, cx.shape(x)])
        grads.append(dx)
    return grads
