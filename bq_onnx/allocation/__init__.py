"""Bit allocation: choose one width per block so that the total stored cost meets a budget.

Plain numpy/scipy; nothing here knows about ONNX. The input is a list of :class:`Block` tables (for every allowed
width the expected loss and the stored cost), the output an :class:`Allocation`. The problem is separable: minimize
``sum_b loss_b(m_b)`` subject to ``sum_b cost_b(m_b) <= budget`` (a multiple-choice knapsack).

Methods, one module each (:func:`allocate` dispatches on the name through :data:`ALLOCATORS`):

* ``uniform``: one width for every block, the largest whose total cost fits: the baseline to beat.
* ``greedy`` (BayesQ, paper 004 eqs. 10-11): upgrades by expected-loss reduction per extra cost, taken along each
  block's lower convex hull so that a non-concave loss curve cannot trap it.
* ``dp``: the exact optimum by dynamic programming over a discretized cost axis (validation, small models).
* ``quantile-inform`` (paper 001 §4.2, appendix D): per-layer informativeness ``|mu|/sigma`` mapped to widths by
  evenly spaced thresholds whose scale is searched to meet the budget.
* ``random-bits`` (paper 001 §4.3, eqs. 6-13): a softmax over widths per layer, trained by gradient descent on the
  expected quantization error plus a budget penalty, alternating with learned quantization ranges.
* ``selective`` (paper 000): blocks of low importance are stored as their mean (0 bits), the rest by greedy on a
  rate-distortion objective.

Shared guarantees: the total cost never exceeds the budget; every method except ``uniform`` (a baseline by
definition) and an exact ``dp`` ends with :func:`_fill`, which spends what is left of the budget on the best
single upgrades, so the budget is used up to the granularity of the blocks (``greedy`` and ``selective`` then
run the swap search :func:`_swap_refine`, which closes most of greedy's knapsack gap on coarse blocks); identical
inputs give identical outputs, ties going to the earlier block (then the lower width). Bad input raises
:class:`ValueError`. Totals are summed with ``math.fsum`` (correctly rounded).
"""

from __future__ import annotations

from bq_onnx.allocation.dp import DP_MAX_CELLS, DP_MAX_TABLE, allocate_dp
from bq_onnx.allocation.greedy import allocate_greedy
from bq_onnx.allocation.problem import Allocation, Block, LayerStats, lower_hull
from bq_onnx.allocation.quantile_inform import allocate_quantile_inform, layer_informativeness
from bq_onnx.allocation.random_bits import RB_MAX_SAMPLES, allocate_random_bits
from bq_onnx.allocation.registry import ALLOCATORS, METHODS, Allocator, allocate
from bq_onnx.allocation.selective import allocate_selective
from bq_onnx.allocation.uniform import allocate_uniform

__all__ = [
    "ALLOCATORS",
    "DP_MAX_CELLS",
    "DP_MAX_TABLE",
    "METHODS",
    "RB_MAX_SAMPLES",
    "Allocation",
    "Allocator",
    "Block",
    "LayerStats",
    "allocate",
    "allocate_dp",
    "allocate_greedy",
    "allocate_quantile_inform",
    "allocate_random_bits",
    "allocate_selective",
    "allocate_uniform",
    "layer_informativeness",
    "lower_hull",
]
