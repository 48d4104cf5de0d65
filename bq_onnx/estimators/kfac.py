"""``kfac``: Kronecker factors of the Fisher from layer inputs and output gradients of MatMul, Gemm and Conv
weights; the weights it does not cover get the ``fisher-mc`` diagonal from the same gradient runs.

The Fisher of a layer ``y = a W`` is approximated by ``A (x) G`` with ``A = E[sum_t a_t a_t^T]`` over the
layer's input rows (positions ``t``: tokens, or the patches a convolution sees) and ``G = E[mean_t g_t g_t^T]``
over the gradients of the loss at its output (Grosse & Martens' KFC convention for convolutions). Output
gradients come from zero "probe" tensors added after each layer output: the gradient with respect to a probe
is the gradient with respect to that output (:mod:`bq_onnx.estimators.probes`, specialised to batch 1); a layer
whose output shape stays unknown is left to the diagonal estimator. Targets are drawn as ``fisher-mc`` draws
them per loss term (labels from the model's predictive distribution for kl terms, so ``G`` is the true
Fisher's; noisy FP32 outputs for mse/smse/cosine terms).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from bq_onnx.autodiff.loss import TARGET
from bq_onnx.calibration import Calibration
from bq_onnx.estimators.base import Batch, GradientEstimator, PosteriorPart, Stage, sample_batches
from bq_onnx.estimators.loss_targets import TargetDraws
from bq_onnx.estimators.probes import ProbeSite, add_probes
from bq_onnx.graph import forward_model, weights_of
from bq_onnx.layout import WeightLayout
from bq_onnx.model_io import copy_model
from bq_onnx.posterior import SumAccumulator
from bq_onnx.runtimes.base import Session


def im2col(x: np.ndarray, weight_shape: tuple[int, ...], attrs: dict) -> np.ndarray:
    """Patches of one 2-D convolution input ``[1, C, H, W]`` -> ``(groups, positions, C/g * kh * kw)``."""
    return im2col_batch(np.asarray(x[:1], dtype=np.float64), weight_shape, attrs)[0]


def im2col_batch(x: np.ndarray, weight_shape: tuple[int, ...], attrs: dict) -> np.ndarray:
    """Patches of a batch ``[B, C, H, W]`` -> ``(B, groups, positions, C/g * kh * kw)`` in ``x``'s dtype.

    Feature order ``(c, i, j)`` matches the weight's ``(K, N)`` view (``[M, C/g, kh, kw]`` -> ``K = C/g*kh*kw``).
    """
    m, c_local, kh, kw = weight_shape
    groups = int(attrs.get("group", 1))
    strides = list(attrs.get("strides", [1, 1]))
    dilations = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID", b"NOTSET", b"VALID"):
        raise ValueError("auto_pad SAME_* is not supported by the K-FAC estimator")
    x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1
    windows = sliding_window_view(x, (span_h, span_w), axis=(2, 3))[:, :, :: strides[0], :: strides[1]]
    windows = windows[..., :: dilations[0], :: dilations[1]]  # (B, C, Ho, Wo, kh, kw)
    b, c, ho, wo = windows.shape[:4]
    per_group = windows.reshape(b, groups, c // groups, ho * wo, kh, kw)
    return per_group.transpose(0, 1, 3, 2, 4, 5).reshape(b, groups, ho * wo, c_local * kh * kw)


def input_rows(site: ProbeSite, activation: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
    """One sample's layer-input rows per group, ``(groups, R, K)``."""
    if site.op == "Conv":
        return im2col(activation, weight_shape, site.attrs)
    a = np.moveaxis(np.asarray(activation, dtype=np.float64), site.in_axis, -1)
    return a.reshape(1, -1, a.shape[-1])


def gradient_rows(site: ProbeSite, grad: np.ndarray) -> np.ndarray:
    """One sample's output-gradient rows ``(T, N)`` (positions x output channels)."""
    g = np.asarray(grad, dtype=np.float64)
    if site.op == "Conv":
        return np.moveaxis(g[0], 0, -1).reshape(-1, g.shape[1])
    return g.reshape(-1, g.shape[-1])


class KfacStats:
    """Running sums of ``sum_t a a^T`` (per group) and ``mean_t g g^T`` per weight."""

    def __init__(self) -> None:
        self.a: dict[str, np.ndarray] = {}
        self.g: dict[str, np.ndarray] = {}
        self.count = 0

    def add_inputs(self, name: str, rows: np.ndarray) -> None:
        self.a[name] = self.a.get(name, 0) + np.einsum("grk,grl->gkl", rows, rows)

    def add_gradients(self, name: str, rows: np.ndarray, weight: float = 1.0) -> None:
        self.g[name] = self.g.get(name, 0) + weight * (rows.T @ rows) / max(len(rows), 1)

    def merge(self, other: KfacStats) -> KfacStats:
        for name, value in other.a.items():
            self.a[name] = self.a.get(name, 0) + value
        for name, value in other.g.items():
            self.g[name] = self.g.get(name, 0) + value
        self.count += other.count
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {"count": np.array(self.count, dtype=np.int64), **{f"a/{k}": v for k, v in self.a.items()},
                **{f"g/{k}": v for k, v in self.g.items()}}

    @classmethod
    def restore(cls, state: Mapping[str, np.ndarray]) -> KfacStats:
        stats = cls()
        stats.count = int(state["count"])
        for key, value in state.items():
            if key.startswith(("a/", "g/")):  # a copy: a reply from Ray's object store is read-only
                getattr(stats, key[0])[key[2:]] = np.array(value, dtype=np.float64)
        return stats

    def result(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(A averaged over groups, G, diagonal of the Fisher in the (K, N) view) per sample."""
        a = self.a[name] / self.count  # (groups, K, K)
        g = self.g[name] / self.count  # (N, N)
        groups = a.shape[0]
        n = g.shape[0]
        group_of_column = np.arange(n) // (n // groups)
        diag_a = np.stack([np.diag(ag) for ag in a])  # (groups, K)
        diagonal = diag_a[group_of_column].T * np.diag(g)[None, :]
        return a.mean(axis=0), g, diagonal


class KfacSums:
    """K-FAC factor sums of the covered weights and, from the same runs, the ``fisher-mc`` squared-gradient
    sums of the others. A batch without a draw adds layer inputs (``A``), one with a draw a sample's output
    gradients against that draw's targets (``G``, each draw weighted ``1 / draws``)."""

    def __init__(self, stage: KfacStage) -> None:
        self.stage = stage
        self.stats = KfacStats()
        self.diag = SumAccumulator()

    def update(self, batch: Batch) -> None:
        s = self.stage
        feeds = s.calib.feeds(batch.rows)
        if batch.draw is None:
            acts = dict(zip(s.forward.output_names, s.forward.run(feeds)))
            for site in s.sites:
                x = acts[site.activation]
                for i in range(len(x)):
                    self.stats.add_inputs(site.weight, input_rows(site, x[i : i + 1], s.layouts[site.weight].shape))
            self.stats.count += batch.count
            return
        out = dict(zip(s.session.output_names, s.session.run({**feeds, TARGET: s.targets[batch.draw][batch.rows]})))
        for site in s.sites:
            rows = gradient_rows(site, out[s.gradients[site.probe]])
            self.stats.add_gradients(site.weight, rows, 1.0 / s.draws)
        self.diag.update({w: np.square(out[s.gradients[w]]) for w in s.wrt if w not in s.covered},
                         samples=batch.count)

    def merge(self, other: KfacSums) -> KfacSums:
        self.stats.merge(other.stats)
        self.diag.merge(other.diag)
        return self

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"kfac/{k}": v for k, v in self.stats.state().items()}, **self.diag.state("diag/")}

    def finalize(self) -> PosteriorPart:
        curvature = self.diag.mean() if self.diag.count else {}
        factors = {}
        for site in self.stage.sites:
            a, g, view_diag = self.stats.result(site.weight)
            factors[site.weight] = (a, g)
            curvature[site.weight] = self.stage.layouts[site.weight].from_view(view_diag)
        return PosteriorPart(curvature, {w: "kfac" if w in factors else "fisher-mc" for w in curvature}, factors)


@dataclasses.dataclass
class KfacStage(Stage):
    """Layer inputs from batched forward runs, then every draw's gradients one sample per run."""

    forward: Session | None  # the plain model returning the layer inputs (None without sites)
    session: Session  # the gradient graph (batch 1) with respect to the probes and the weights
    gradients: dict[str, str]
    sites: list[ProbeSite]
    wrt: list[str]
    calib: Calibration
    targets: TargetDraws
    layouts: dict[str, WeightLayout]
    draws: int
    batch_size: int
    desc: str = "kfac"

    def __post_init__(self) -> None:
        self.covered = {site.weight for site in self.sites}

    def accumulator(self) -> KfacSums:
        return KfacSums(self)

    def restore(self, state: Mapping[str, np.ndarray]) -> KfacSums:
        acc = KfacSums(self)
        acc.stats = KfacStats.restore({k[5:]: v for k, v in state.items() if k.startswith("kfac/")})
        acc.diag = SumAccumulator.restore(state, "diag/")
        return acc

    def settle(self) -> None:
        for draw in range(self.draws):
            self.targets[draw]

    def batches(self, samples: range) -> Iterator[Batch]:
        if self.sites:
            yield from sample_batches(samples, self.batch_size)
        for draw in range(self.draws):  # one sample per run (one fixed batch, for a fixed-batch model)
            yield from sample_batches(samples, self.calib.run_size(1), draw)


class Kfac(GradientEstimator):
    name = "kfac"

    def stages(self) -> Iterator[Stage]:
        p, opts = self.problem, self.problem.options
        self.reference()
        names = [w.name for w in self.weights]
        model = copy_model(p.prepared.model)
        # a weight read by several layers has a sum of Kronecker products for a Fisher: one probe would see one
        single = [w for w in weights_of(model, self.weights) if len(w.value.uses()) == 1]
        sites = add_probes(model, single, p.calib.run_shapes())
        probes = list(dict.fromkeys(site.probe for site in sites))
        if not names and not probes:
            return
        graph = self.gradient_graph(names, probes, model=model)
        wrt = [w for w in names if w in graph.gradients]
        sites = [site for site in sites if site.probe in graph.gradients]
        session = p.sessions.open(graph.model)
        forward = None
        if sites:  # A: layer inputs, from batched forward runs of the plain model
            forward = p.sessions.open(forward_model(p.prepared.model, sorted({site.activation for site in sites})))
        targets = TargetDraws("fisher-mc", self.plan, self.outputs, self.labels, p.rng)
        yield KfacStage(forward, session, dict(graph.gradients), sites, wrt, p.calib, targets, p.layouts,
                        opts.mc_samples, p.calib.run_size(opts.batch_size))
