"""The VJP rule table: op type -> rule, gathered from the ``vjp_*`` family modules.

Families: :mod:`vjp_elementwise` (arithmetic, activations), :mod:`vjp_activations` (Softplus, Mish, Elu, Selu,
PRelu, trigonometric, Mean), :mod:`vjp_linalg` (MatMul, Gemm), :mod:`vjp_einsum`, :mod:`vjp_nn` (Conv,
ConvTranspose, pools, normalizations, softmax), :mod:`vjp_norm` (Instance/Group normalization, LRN),
:mod:`vjp_shape` (reshapes, slicing, gathering, reductions), :mod:`vjp_reduce` (L1/L2/LogSum reductions),
:mod:`vjp_select` (Max/Min, ReduceMax/Min, GlobalMaxPool, CumSum, GatherElements), :mod:`vjp_resize` (Resize, Pad,
Tile, DepthToSpace/SpaceToDepth), :mod:`vjp_scatter` (GatherND, ScatterND/Elements, Trilu), :mod:`vjp_recurrent`
(LSTM, GRU, RNN), :mod:`vjp_control` (If; small Loop/Scan unrolled first), :mod:`vjp_loop` (Loop/Scan by their body).
:data:`NON_DIFFERENTIABLE` ops are treated as constants: their outputs carry no gradient (shape computations,
comparisons, random generators, and the piecewise-constant Floor/Ceil/Round/Sign whose derivative is zero almost
everywhere).
"""

from __future__ import annotations

from bq_onnx.autodiff import (  # noqa: F401  (register their rules)
    vjp_activations,
    vjp_control,
    vjp_einsum,
    vjp_elementwise,
    vjp_linalg,
    vjp_loop,
    vjp_nn,
    vjp_norm,
    vjp_recurrent,
    vjp_reduce,
    vjp_resize,
    vjp_scatter,
    vjp_select,
    vjp_shape,
)
from bq_onnx.autodiff.vjp_common import RULES, Rule, RuleUnavailable, Vjp

NON_DIFFERENTIABLE = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "Shape",
        "Size",
        "Range",
        "EyeLike",
        "NonZero",
        "ArgMax",
        "ArgMin",
        "Equal",
        "Less",
        "LessOrEqual",
        "Greater",
        "GreaterOrEqual",
        "Not",
        "And",
        "Or",
        "Xor",
        "IsNaN",
        "IsInf",
        "Floor",
        "Ceil",
        "Round",
        "Sign",
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Bernoulli",
        "Multinomial",
    }
)

__all__ = ["NON_DIFFERENTIABLE", "RULES", "Rule", "RuleUnavailable", "Vjp", "rule_for"]


def rule_for(op_type: str, domain: str = "") -> Rule | None:
    """The rule of a default-domain op, or ``None``."""
    if domain not in ("", "ai.onnx"):
        return None
    return RULES.get(op_type)
