"""K-FAC statistics: layer inputs and output gradients of MatMul, Gemm and Conv weights.

The Fisher of a layer ``y = a W`` is approximated by ``A (x) G`` with ``A = E[sum_t a_t a_t^T]`` over the
layer's input rows (positions ``t``: tokens, or the patches a convolution sees) and ``G = E[mean_t g_t g_t^T]``
over the gradients of the loss at its output (Grosse & Martens' KFC convention for convolutions). Output
gradients come from zero "probe" tensors added after each layer output: the gradient with respect to a probe
is the gradient with respect to that output. Probes need static output shapes, so the model is specialised
to one calibration sample's input shapes (batch 1) and shape-inferred; a layer whose output shape stays
unknown is left to the diagonal estimator.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view

from bq_onnx.context import WeightInfo

PROBE_SUFFIX = ".bq_probe"


@dataclasses.dataclass
class KfacSite:
    """Where one weight's K-FAC statistics come from."""

    weight: str
    op: str
    activation: str  # value name of the layer input
    probe: str  # probe initializer name (its gradient = dL/d output)
    attrs: dict
    in_axis: int  # channel/feature axis of the activation (MatMul/Gemm)


def _static_shape(value: ir.Value) -> tuple[int, ...] | None:
    if value.shape is None or any(not isinstance(d, int) for d in value.shape):
        return None
    return tuple(int(d) for d in value.shape)


def add_probes(model: ir.Model, weights: list[WeightInfo], sample: dict[str, np.ndarray],
               gather: bool = False) -> list[KfacSite]:
    """Specialise ``model`` (in place) to ``sample``'s shapes and add a zero probe after each K-FAC layer
    (and, with ``gather``, after each embedding lookup: its site's activation is the index tensor)."""
    from bq_onnx.estimate import specialise

    specialise(model, sample)
    sites = []
    for info in weights:
        use = next(iter(info.value.uses()), None)
        if use is None:
            continue
        node, idx = use.node, use.idx
        attrs = {k: a.value for k, a in node.attributes.items()}
        if node.op_type == "MatMul" and idx == 1 and len(info.layout.shape) == 2:
            axis = -1
        elif node.op_type == "Gemm" and idx == 1:
            axis = 0 if attrs.get("transA", 0) else 1
        elif node.op_type == "Conv" and idx == 1 and len(info.layout.shape) == 4:
            axis = 1
        elif gather and node.op_type == "Gather" and idx == 0 and int(attrs.get("axis", 0)) == 0:
            axis = 0
        else:
            continue
        out = node.outputs[0]
        shape = _static_shape(out)
        reads = node.inputs[1] if node.op_type == "Gather" else node.inputs[0]
        if shape is None or reads is None or reads.name is None:
            continue
        probe = ir.Value(name=info.name + PROBE_SUFFIX, const_value=ir.tensor(np.zeros(shape, np.float32)))
        model.graph.register_initializer(probe)
        add = ir.Node("", "Add", [out, probe], num_outputs=1, name=info.name + ".bq_probe_add")
        probed = add.outputs[0]
        probed.name = out.name + PROBE_SUFFIX
        probed.shape, probed.type = out.shape, out.type
        model.graph.insert_after(node, add)
        was_output = out.is_graph_output()
        out.replace_all_uses_with(probed, replace_graph_outputs=True)
        add.replace_input_with(0, out)
        if was_output:  # keep the graph's output name
            old_name = out.name
            out.name, probed.name = old_name + ".bq_raw", old_name
        sites.append(KfacSite(info.name, node.op_type, reads.name, probe.name, attrs, axis))
    return sites


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


def input_rows(site: KfacSite, activation: np.ndarray, weight_shape: tuple[int, ...]) -> np.ndarray:
    """One sample's layer-input rows per group, ``(groups, R, K)``."""
    if site.op == "Conv":
        return im2col(activation, weight_shape, site.attrs)
    a = np.moveaxis(np.asarray(activation, dtype=np.float64), site.in_axis, -1)
    return a.reshape(1, -1, a.shape[-1])


def gradient_rows(site: KfacSite, grad: np.ndarray) -> np.ndarray:
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
        for name in other.a:
            self.a[name] = self.a.get(name, 0) + other.a[name]
            self.g[name] = self.g.get(name, 0) + other.g[name]
        self.count += other.count
        return self

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
