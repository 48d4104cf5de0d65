"""``random-bits`` (paper 001 §4.3, eqs. 6-13): a softmax over widths per layer, trained by gradient descent on
the expected quantization error plus a budget penalty, alternating with learned quantization ranges."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np

from bq_onnx.allocation.problem import (
    Allocation,
    Block,
    LayerStats,
    _ensure_budget,
    _fill,
    _layers,
    _prepare,
    _result,
)

RB_MAX_SAMPLES = 1 << 16
"""Random Bits: layers with more weights (and one range per layer) estimate ``tau`` on a seeded subsample."""


@dataclasses.dataclass
class _RBData:
    """All layers' (sampled) weights as flat arrays, with their range group and layer."""

    mu: np.ndarray
    cw: np.ndarray  # c_j(w) / sigma_w^2, the weight of a squared error in tau (eq. 7)
    gid: np.ndarray  # range group of each element
    lid: np.ndarray  # layer of each element
    glayer: np.ndarray  # layer of each group
    gshape: list[tuple[int, ...]]  # per layer: () for one range, (nb, N) for blocked ranges
    gstart: np.ndarray  # first group of each layer
    mean0: np.ndarray  # per group: the 0-bit value (c/sigma^2-weighted mean)
    init: np.ndarray  # (4, groups): min, max, 5th and 95th percentile of each group's weights (all of them)

    @property
    def groups(self) -> int:
        return self.glayer.size


def _rb_data(keys: list[str], layers: Mapping[str, LayerStats], max_samples: int, seed: int) -> _RBData:
    mus, ivs, cs, gids, lids, glayer, gshape, gstart, inits = [], [], [], [], [], [], [], [], []
    ngroups = 0
    for j, key in enumerate(keys):
        st = layers[key]
        if not isinstance(st, LayerStats):
            raise ValueError(f"random-bits: layers[{key!r}] must be a LayerStats, got {type(st).__name__}")
        mu = np.asarray(st.mu, dtype=np.float64)
        if mu.size == 0 or not np.isfinite(mu).all():
            raise ValueError(f"random-bits: layer {key!r}: mu must be non-empty and finite")
        try:
            sigma = np.broadcast_to(np.asarray(st.sigma, dtype=np.float64), mu.shape)
        except ValueError as e:
            raise ValueError(f"random-bits: layer {key!r}: sigma does not match mu's shape {mu.shape}") from e
        with np.errstate(over="ignore", divide="ignore"):
            ok = np.isfinite(sigma).all() and (sigma > 0).all() and np.isfinite(1.0 / sigma**2).all()
        if not ok:
            raise ValueError(f"random-bits: layer {key!r}: sigma must be finite and positive (1/sigma^2 finite)")
        if st.coef is None:
            c = np.abs(mu) / sigma
        else:
            c = np.asarray(st.coef, dtype=np.float64)
            if c.shape != mu.shape or not np.isfinite(c).all() or (c < 0).any():
                raise ValueError(f"random-bits: layer {key!r}: coef must be finite, >= 0 and shaped like mu")
        rng = np.random.default_rng([seed, j])
        flat = np.arange(mu.size)
        if st.block_size is None:  # one range: a random subset of the weights
            shape: tuple[int, ...] = ()
            ng = 1
            if mu.size > max_samples:
                flat = np.sort(rng.choice(mu.size, size=max_samples, replace=False))
            g = np.zeros(flat.size, dtype=np.int64)
            inits.append(np.percentile(mu.ravel(), [0.0, 100.0, 5.0, 95.0])[:, None])
        else:  # one range per block: a random subset of the columns, whole blocks
            bs = int(st.block_size)
            if bs <= 0:
                raise ValueError(f"random-bits: layer {key!r}: block_size must be positive, got {st.block_size}")
            rows = mu.shape[0] if mu.ndim >= 1 else 1
            cols = mu.size // rows
            shape = (-(-rows // bs), cols)
            ng = shape[0] * cols
            if mu.size > max_samples:
                keep = np.sort(rng.choice(cols, size=max(1, max_samples // rows), replace=False))
                flat = (np.arange(rows)[:, None] * cols + keep[None, :]).ravel()
            r, col = np.divmod(flat, cols)
            g = (r // bs) * cols + col
            inits.append(_block_percentiles(mu.reshape(rows, cols), bs, (0.0, 100.0, 5.0, 95.0)))
        cj = c.ravel()[flat]
        tot = cj.sum()
        cj = cj / tot if tot > 0 else np.full(cj.size, 1.0 / cj.size)
        mus.append(mu.ravel()[flat])
        ivs.append(1.0 / sigma.ravel()[flat] ** 2)
        cs.append(cj)
        gids.append(g + ngroups)
        lids.append(np.full(flat.size, j, dtype=np.int64))
        glayer.append(np.full(ng, j, dtype=np.int64))
        gshape.append(shape)
        gstart.append(ngroups)
        ngroups += ng
    cw = np.concatenate(cs) * np.concatenate(ivs)
    mu_all, gid_all = np.concatenate(mus), np.concatenate(gids)
    den = np.bincount(gid_all, cw, ngroups)
    num = np.bincount(gid_all, cw * mu_all, ngroups)
    plain = np.bincount(gid_all, mu_all, ngroups) / np.maximum(np.bincount(gid_all, None, ngroups), 1)
    mean0 = np.where(den > 0, num / np.where(den > 0, den, 1.0), plain)
    d = _RBData(
        mu_all,
        cw,
        gid_all,
        np.concatenate(lids),
        np.concatenate(glayer),
        gshape,
        np.array(gstart, dtype=np.int64),
        mean0,
        np.concatenate(inits, axis=1),
    )
    return d


def _block_percentiles(x: np.ndarray, block_size: int, qs: Sequence[float]) -> np.ndarray:
    """``(len(qs), nb * N)``: percentiles (``np.percentile``'s linear interpolation) of every block of ``block_size``
    rows of each column of ``x`` ``(K, N)``, blocks in ``(block_row, column)`` order; the last block may be short."""
    rows, cols = x.shape
    nb = -(-rows // block_size)
    pad = nb * block_size - rows
    if pad:
        x = np.concatenate([x, np.full((pad, cols), np.nan)])
    v = np.sort(x.reshape(nb, block_size, cols), axis=1)  # NaN padding sorts last
    counts = np.full(nb, block_size)
    counts[-1] -= pad
    out = np.empty((len(qs), nb, cols))
    for i, q in enumerate(qs):
        pos = q / 100.0 * (counts - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, counts - 1)
        frac = (pos - lo)[:, None]
        at_lo = np.take_along_axis(v, lo[:, None, None], axis=1)[:, 0]
        at_hi = np.take_along_axis(v, hi[:, None, None], axis=1)[:, 0]
        out[i] = at_lo * (1 - frac) + at_hi * frac
    return out.reshape(len(qs), nb * cols)


def _rb_errors(d: _RBData, alpha: np.ndarray, beta: np.ndarray, gbits: np.ndarray) -> np.ndarray:
    """Per element ``c * (Q(mu, b) - mu)^2 / sigma^2``, ``b = gbits`` of its group (paper 001 §3.2 quantizer).

    ``Q(mu, b) = alpha + s * clamp(round((mu - alpha) / s), 0, 2^b - 1)``, ``s = (beta - alpha) / (2^b - 1)``;
    ``b = 0`` decodes to the group's ``c/sigma^2``-weighted mean (the 0-bit "mean" storage); ``s = 0`` to alpha.
    """
    lev = np.exp2(gbits.astype(np.float64)) - 1.0
    step = np.where(lev > 0, (beta - alpha) / np.maximum(lev, 1.0), 0.0)
    inv = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    a = alpha[d.gid]
    z = d.mu - a
    z *= inv[d.gid]
    np.rint(z, out=z)
    np.clip(z, 0.0, lev[d.gid] if lev.min() != lev.max() else float(lev[0]), out=z)
    z *= step[d.gid]
    z += a
    zero = gbits == 0
    if zero.any():
        np.copyto(z, d.mean0[d.gid], where=zero[d.gid])
    z -= d.mu
    z *= z
    z *= d.cw
    return z


def _rb_tau(d: _RBData, alpha: np.ndarray, beta: np.ndarray, widths: np.ndarray, nlayers: int) -> np.ndarray:
    """``tau[j, i]`` of eq. 7 for every layer ``j`` and width ``widths[i]``."""
    tau = np.empty((nlayers, widths.size))
    for i, w in enumerate(widths):
        e = _rb_errors(d, alpha, beta, np.full(d.groups, w, dtype=np.int64))
        tau[:, i] = np.bincount(d.lid, e, nlayers)
    return tau


def _rb_update_ranges(
    d: _RBData, alpha: np.ndarray, beta: np.ndarray, layer_bits: np.ndarray, iters: int, step: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Eq. 13 updates of ``[alpha, beta]`` at the current widths ``b_hat`` (second loss ``T``, eq. 12).

    Eq. 13 gives ``dT/dbeta = 2 T_g / (beta - alpha) = -dT/dalpha`` (straight-through, clipping ignored): its
    direction is always a symmetric shrink of the range, its size depends on the units of ``mu``. We move along
    that direction by a fraction ``step`` of the range, halved up to 3 times until the group's exact ``T``
    decreases; a step that never decreases it is rejected (the approximation ignores clipping, so blind steps
    would shrink ranges forever). Returns the new ranges and the number of accepted group steps.
    """
    alpha, beta = alpha.copy(), beta.copy()
    gbits = layer_bits[d.glayer]
    active = (gbits > 0) & (beta > alpha)
    accepted = 0
    t_now = np.bincount(d.gid, _rb_errors(d, alpha, beta, gbits), d.groups)
    for _ in range(iters):
        frac = np.where(active & (t_now > 0), step, 0.0)
        pending = frac > 0
        for _ in range(4):
            if not pending.any():
                break
            half = 0.5 * frac * (beta - alpha)
            na, nb = np.where(pending, alpha + half, alpha), np.where(pending, beta - half, beta)
            t_new = np.bincount(d.gid, _rb_errors(d, na, nb, gbits), d.groups)
            ok = pending & (t_new < t_now)
            alpha[ok], beta[ok], t_now[ok] = na[ok], nb[ok], t_new[ok]
            accepted += int(ok.sum())
            pending &= ~ok
            frac = frac * 0.5
        active &= beta > alpha
    return alpha, beta, accepted


def allocate_random_bits(
    blocks: Sequence[Block],
    budget: float,
    layers: Mapping[str, LayerStats],
    *,
    eta: float = 3e3,
    steps: int = 500,
    lr: float = 0.2,
    seed: int = 0,
    init: str = "minmax",
    final: str = "expectation",
    gradient: str = "natural",
    range_every: int | None = None,
    range_iters: int = 2,
    range_step: float = 0.05,
    normalize: bool = True,
    max_samples: int = RB_MAX_SAMPLES,
) -> Allocation:
    """Random Bits (paper 001 §4.3): learn a distribution over widths per layer, then round it.

    Per layer ``j`` (``layers`` keyed like :func:`allocate_quantile_inform`) a softmax over the layer's allowed
    widths (logits ``Phi``, eq. 4) and the loss of eq. 9, ``sum_ji tau_ji P_ji + eta * (E[b_mean] - gamma)^2``
    with ``gamma = budget / total numel``. ``tau`` is eq. 7 with the uniform quantizer of §3.2 on the layer's (or
    block's) ``[alpha, beta]`` (:func:`_rb_errors`; the plain paper quantizer, not :mod:`bq_onnx.quantizers`,
    because the ranges are what it learns). ``E[b_mean]`` is ``E[cost] / numel`` from the blocks' cost tables
    (eq. 8 exactly when cost = numel * bits). With ``normalize``, ``tau`` is divided by the median of its initial
    entries so that ``eta`` is scale-free. Gradients of eq. 9 are analytic (appendix F.1): ``dL/dP_ji = tau_ji +
    2 eta (E[b_mean] - gamma) cost_ji / numel`` and ``dL/dPhi = P * (dL/dP - <P, dL/dP>)``. With
    ``gradient="natural"`` (default) the step uses the centred ``dL/dP`` instead, i.e. the ``Phi``-gradient
    preconditioned by the softmax's Fisher: the plain one vanishes where a probability saturates and leaves a
    layer stuck at a poor width (``"plain"`` keeps it); either way Adam (learning rate ``lr``) sizes the steps,
    since ``tau`` spans decades. ``Phi`` starts at 0 (uniform probabilities). Every ``range_every`` steps
    (default ``steps // 20``) the widths ``b_hat`` (eq. 10: rounded expectation, ``final="expectation"``, or
    ``final="argmax"``) give ``b_mean``; if it is below ``gamma`` the ranges take ``range_iters`` eq. 13 steps
    (:func:`_rb_update_ranges`) and ``tau`` is recomputed. Ranges start at min/max (``init="minmax"``, default:
    eq. 13 only ever shrinks a range, so it needs room) or the 5th/95th percentiles (``"percentile"``, §3.2).
    Layers over ``max_samples`` weights estimate ``tau`` and learn ranges on a subsample seeded by ``(seed, layer
    index)``: random weights with one range per layer, random columns (whole blocks) with ``block_size``, whose
    other blocks keep their initial ranges; initial ranges always come from all the weights. Finally blocks take
    the nearest allowed width to their layer's ``b_hat``; if over budget, the downgrades with the least loss added
    per cost saved are applied; then :func:`_fill`. Cost: about 20 refreshes of ``tau`` and the ranges, each
    ``~(widths + 10)`` passes over the sampled weights.
    ``details["layers"][key]`` holds ``bits`` (``b_hat``), ``probabilities``, ``tau`` and the learned ``alpha``
    / ``beta`` (floats, or ``(nb, N)`` nested lists with ``block_size``).
    """
    p = _prepare(blocks, budget)
    if init not in ("minmax", "percentile"):
        raise ValueError(f"init must be 'minmax' or 'percentile', got {init!r}")
    if final not in ("expectation", "argmax"):
        raise ValueError(f"final must be 'expectation' or 'argmax', got {final!r}")
    if gradient not in ("natural", "plain"):
        raise ValueError(f"gradient must be 'natural' or 'plain', got {gradient!r}")
    if range_every is None:
        range_every = max(1, steps // 20)
    if steps < 0 or range_every <= 0 or range_iters < 0 or max_samples <= 0 or not (0 < range_step < 1):
        raise ValueError("need steps >= 0, range_every > 0, range_iters >= 0, max_samples > 0, 0 < range_step < 1")
    keys, lidx = _layers(p)
    missing = [k for k in keys if k not in layers]
    if missing:
        raise ValueError(f"random-bits: no LayerStats for layer(s) {missing[:5]}")
    nl = len(keys)
    widths = np.unique(p.width[p.valid])
    # mask[j, i]: width i is allowed for some block of layer j; cost_tab[j, i]: the layer's cost at that width.
    mask = np.zeros((nl, widths.size), dtype=bool)
    cost_tab = np.zeros((nl, widths.size))
    for i, w in enumerate(widths):
        has = (p.valid & (p.width == w)).any(axis=1)
        np.logical_or.at(mask[:, i], lidx, has)
        cost_tab[:, i] = np.bincount(lidx, p.take(p.cost, p.nearest(np.full(p.n, w))), nl)
    total_numel = float(p.numel.sum())
    gamma = p.budget / total_numel

    d = _rb_data(keys, layers, max_samples, seed)
    alpha, beta, p5, p95 = (row.copy() for row in d.init)
    if init == "percentile":  # a degenerate percentile range keeps min/max
        keep = p95 > p5
        alpha, beta = np.where(keep, p5, alpha), np.where(keep, p95, beta)
    tau = _rb_tau(d, alpha, beta, widths, nl)
    valid_tau = tau[mask]
    scale = float(np.median(valid_tau)) if normalize else 1.0
    if not (scale > 0 and math.isfinite(scale)):
        scale = float(valid_tau.mean()) if valid_tau.mean() > 0 else 1.0

    phi = np.zeros((nl, widths.size))
    m1, m2 = np.zeros_like(phi), np.zeros_like(phi)
    b1, b2, eps = 0.9, 0.999, 1e-8

    def probs(ph: np.ndarray) -> np.ndarray:
        z = np.where(mask, ph, -np.inf)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)

    def layer_widths(pr: np.ndarray) -> np.ndarray:
        if final == "argmax":
            return widths[np.argmax(pr, axis=1)]
        target = np.rint(pr @ widths)
        dist = np.where(mask, np.abs(widths[None, :] - target[:, None]), np.inf)
        return widths[np.argmin(dist, axis=1)]

    def objective(pr: np.ndarray) -> tuple[float, float]:
        e_bmean = float((pr * cost_tab).sum() / total_numel)
        return float((np.where(mask, tau / scale, 0.0) * pr).sum() + eta * (e_bmean - gamma) ** 2), e_bmean

    range_updates = range_steps = 0
    for t in range(1, steps + 1):
        pr = probs(phi)
        e_bmean = float((pr * cost_tab).sum() / total_numel)
        g_p = np.where(mask, tau / scale + 2.0 * eta * (e_bmean - gamma) * cost_tab / total_numel, 0.0)
        centred = np.where(mask, g_p - (pr * g_p).sum(axis=1, keepdims=True), 0.0)
        grad = centred if gradient == "natural" else pr * centred
        m1 = b1 * m1 + (1 - b1) * grad
        m2 = b2 * m2 + (1 - b2) * grad * grad
        phi = phi - lr * (m1 / (1 - b1**t)) / (np.sqrt(m2 / (1 - b2**t)) + eps)
        if range_iters and t % range_every == 0:
            bhat = layer_widths(probs(phi))
            b_mean = float(cost_tab[np.arange(nl), np.searchsorted(widths, bhat)].sum() / total_numel)
            if b_mean < gamma:
                alpha, beta, acc = _rb_update_ranges(d, alpha, beta, bhat, range_iters, range_step)
                range_updates += 1
                range_steps += acc
                if acc:
                    tau = _rb_tau(d, alpha, beta, widths, nl)
    pr = probs(phi)
    bhat = layer_widths(pr)
    loss_val, e_bmean = objective(pr)
    choice = p.nearest(bhat[lidx])
    over = p.total_cost(choice) > p.budget
    choice = _ensure_budget(p, choice)
    choice, filled = _fill(p, choice)

    def ranges(j: int) -> dict:
        g0, shape = int(d.gstart[j]), d.gshape[j]
        if shape == ():
            return {"alpha": float(alpha[g0]), "beta": float(beta[g0])}
        ng = int(np.prod(shape))
        return {"alpha": alpha[g0 : g0 + ng].reshape(shape), "beta": beta[g0 : g0 + ng].reshape(shape)}

    details = {
        "gamma": gamma,
        "eta": eta,
        "steps": steps,
        "lr": lr,
        "seed": seed,
        "init": init,
        "final": final,
        "gradient": gradient,
        "range_every": range_every,
        "tau_scale": scale,
        "objective": loss_val,
        "expected_bits_per_weight": e_bmean,
        "range_updates": range_updates,
        "range_steps_accepted": range_steps,
        "widths": widths,
        "layers": {
            key: {
                "bits": bhat[j],
                "probabilities": {int(w): float(pr[j, i]) for i, w in enumerate(widths) if mask[j, i]},
                "tau": {int(w): float(tau[j, i]) for i, w in enumerate(widths) if mask[j, i]},
                **ranges(j),
            }
            for j, key in enumerate(keys)
        },
        "downgraded": over,
        "fill_moves": filled,
    }
    return _result("random-bits", p, choice, details)
