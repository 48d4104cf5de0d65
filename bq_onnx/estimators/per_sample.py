"""Per-sample squared gradients of layer weights from one batched run, not one run per sample.

The empirical Fisher diagonal needs ``sum_n g_n^2`` for every weight, where ``g_n`` is the gradient of sample
``n``'s loss. A batched gradient graph only gives ``sum_n g_n``. For a weight read by one MatMul, Gemm or Conv,
``g_n`` factors exactly into the layer input ``a_n`` and the output gradient ``d_n`` of that sample:
``g_n = a_n^T d_n`` summed over the sample's rows (tokens, or the patches a convolution sees). So a batched run
of the gradient graph with respect to zero "probes" after each layer output (:mod:`bq_onnx.estimators.probes`)
gives every ``d_n`` at once (the loss is a sum over samples, so each sample's rows only see its own loss), the same
run returns the inputs ``a_n``, and one batched matrix product per layer forms the ``g_n``. Backward skips the
weight gradients, so a per-sample gradient costs about what a batched forward and input-gradient pass costs.

Embedding lookups (Gather) are covered too: their per-sample gradient is the output gradient added into the
rows of the tokens the sample reads. Weights this does not cover (shared by several nodes, other consumers,
unknown output shapes) are left to the caller's one-sample-per-run loop.

The maths is numpy, except that small convolution products run as a cached one-node-chain onnxruntime graph
(:func:`_product_session`), which is faster there than numpy's BLAS.
"""

from __future__ import annotations

import numpy as np

from bq_onnx.estimators.probes import ProbeSite

#: Largest block of convolution patches (float32 elements) gathered at once; bigger batches are split.
MAX_PATCH_ELEMENTS = 1 << 23

#: A convolution's batched patch products of at most this many multiply-adds run as one single-threaded
#: onnxruntime MatMul (its MLAS kernels: 1.5-2.4x faster than numpy's OpenBLAS on LeNet's per-sample products,
#: which are too small for threads to help; LeNet's batched per-sample gradient 57-62 instead of 64-70 us);
#: bigger ones stay in numpy, whose BLAS may use several threads. MatMul/Gemm sites stay in numpy: on the tiny
#: transformer the sessions gained nothing and added 17 MiB of peak memory.
SMALL_PRODUCT_MACS = 1 << 25

_SESSIONS: dict[tuple, object] = {}


def covers(site: ProbeSite, uses: int) -> bool:
    """Whether ``site``'s weight gradient is exactly the per-row product of its input and output gradient (or,
    for an embedding lookup, the scatter of its output gradient into the looked-up rows)."""
    if uses != 1:
        return False
    if site.op == "Conv":
        attrs = site.attrs
        return attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID", b"NOTSET", b"VALID")
    return True


def squared_gradient_sum(site: ProbeSite, weight_shape: tuple[int, ...], view_shape: tuple[int, int],
                         activation: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """``sum_n (a_n^T d_n)^2`` in the weight's ``(K, N)`` view, float64, for a batch of samples."""
    if site.op == "Gather":
        table = _gather(weight_shape, np.asarray(activation), np.asarray(grad, dtype=np.float32))
        return table if table.shape == tuple(view_shape) else table.T  # (K, N) view of a 2-D table
    a = np.asarray(activation, dtype=np.float32)
    d = np.asarray(grad, dtype=np.float32)
    if site.op == "Conv":
        return _conv(site.attrs, weight_shape, a, d)
    k, n = view_shape
    b = a.shape[0]
    x = np.moveaxis(a, site.in_axis, -1).reshape(b, -1, k)  # (B, R, K)
    out = d.reshape(b, -1, n)  # (B, R, N)
    if x.shape[1] == 1:  # one row per sample: g_n = a_n d_n^T, so sum_n g_n^2 = (a^2)^T (d^2)
        return (np.square(x[:, 0]).T @ np.square(out[:, 0])).astype(np.float64)
    grads = np.matmul(x.transpose(0, 2, 1), out)  # (B, K, N)
    np.square(grads, out=grads)
    return grads.sum(axis=0).astype(np.float64)


def _conv(attrs: dict, weight_shape: tuple[int, ...], x: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``sum_n g_n^2`` of a Conv weight in its ``(K, N)`` view: patches of the padded input, one batched float32
    product with the output gradient per group, squared and summed over the samples (float64 across chunks).

    With unit column stride the patches are gathered on the padded width: the patch of kernel offset ``(i, j)``
    is then a slice of each flattened input channel (whole rows, one contiguous copy per offset instead of one
    short row at a time), and the output gradient gets zero columns there, so the extra positions add nothing.
    """
    m, c_local, kh, kw = weight_shape
    groups = int(attrs.get("group", 1))
    sh, sw = list(attrs.get("strides", [1, 1]))
    dh, dw = list(attrs.get("dilations", [1, 1]))
    pads = list(attrs.get("pads", [0, 0, 0, 0]))
    b, c, h, w = x.shape
    ho, wo = d.shape[2], d.shape[3]
    wp = w + pads[1] + pads[3]
    k = c_local * kh * kw
    rows = sw == 1 and wp <= 2 * wo  # contiguous patch rows, at most twice the products
    length = ho * wp if rows else ho * wo  # patch positions per sample (rows: every padded column)
    step = max(1, min(b, MAX_PATCH_ELEMENTS // max(c * kh * kw * length, 1)))
    total = np.zeros((groups, k, m // groups), dtype=np.float64)
    if rows:
        d = _widen(d, wp)  # zero gradient at the extra columns: their patches add nothing
        flat = _flat_padded(x, pads, (kh - 1) * dh * wp + (kw - 1) * dw + ho * sh * wp)
    else:
        flat = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    out = d.reshape(b, groups, m // groups, length)
    for start in range(0, b, step):
        xs = flat[start : start + step]
        n = len(xs)
        patches = np.empty((n, c, kh, kw, length), dtype=np.float32)
        for i in range(kh):
            for j in range(kw):
                if rows:  # the patch of offset (i, j) is one slice of the flattened padded input (per output row)
                    offset = i * dh * wp + j * dw
                    window = xs[:, :, offset : offset + ho * sh * wp]
                    patches[:, :, i, j] = window if sh == 1 else window.reshape(n, c, ho, sh * wp)[..., :wp].reshape(
                        n, c, length)
                else:
                    top, left = i * dh, j * dw
                    patches[:, :, i, j] = xs[:, :, top : top + sh * (ho - 1) + 1 : sh,
                                             left : left + sw * (wo - 1) + 1 : sw].reshape(n, c, length)
        cols = patches.reshape(n, groups, k, length)  # (B, G, K, L), K in (c, i, j) order
        total += _square_sum(cols, out[start : start + step])  # (G, K, M/G)
    return total.transpose(1, 0, 2).reshape(k, m)


def _square_sum(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``sum_n (a_n @ b_n^T)^2`` for float32 ``a`` ``(B, G, K, L)`` and ``b`` ``(B, G, M, L)``: float32 products
    and sum, returned as float64 ``(G, K, M)``."""
    if a.shape[0] * a.shape[1] * a.shape[2] * a.shape[3] * b.shape[2] <= SMALL_PRODUCT_MACS:
        a, b = np.ascontiguousarray(a, dtype=np.float32), np.ascontiguousarray(b, dtype=np.float32)
        return _product_session(a.shape[1:], b.shape[1:]).run(None, {"a": a, "b": b})[0].astype(np.float64)
    products = np.matmul(a, b.swapaxes(2, 3))
    np.square(products, out=products)
    return products.sum(axis=0).astype(np.float64)


def _product_session(a_shape: tuple[int, ...], b_shape: tuple[int, ...]):
    """A cached one-thread onnxruntime session computing :func:`_square_sum` for any number of samples."""
    key = (a_shape, b_shape)
    if key not in _SESSIONS:
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper

        nodes = [
            helper.make_node("Transpose", ["b"], ["bt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["a", "bt"], ["p"]),
            helper.make_node("Mul", ["p", "p"], ["sq"]),
            helper.make_node("ReduceSum", ["sq", "axis"], ["sum"], keepdims=0),
        ]
        graph = helper.make_graph(
            nodes,
            "bq_square_sum",
            [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", *a_shape]),
             helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", *b_shape])],
            [helper.make_tensor_value_info("sum", TensorProto.FLOAT, None)],
            initializer=[numpy_helper.from_array(np.array([0], dtype=np.int64), "axis")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        model.ir_version = 10
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 4
        _SESSIONS[key] = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


def _widen(d: np.ndarray, width: int) -> np.ndarray:
    """The output gradient ``[B, M, Ho, Wo]`` with zero columns up to ``width``."""
    wide = np.zeros((*d.shape[:3], width), dtype=np.float32)
    wide[..., : d.shape[3]] = d
    return wide


def _flat_padded(x: np.ndarray, pads: list[int], length: int) -> np.ndarray:
    """The zero-padded input, each channel flattened to ``length`` elements (zeros past the padded image)."""
    b, c, h, w = x.shape
    hp, wp = h + pads[0] + pads[2], w + pads[1] + pads[3]
    flat = np.zeros((b, c, max(length, hp * wp)), dtype=np.float32)
    flat[:, :, : hp * wp].reshape(b, c, hp, wp)[:, :, pads[0] : pads[0] + h, pads[1] : pads[1] + w] = x
    return flat


def _gather(table_shape: tuple[int, ...], ids: np.ndarray, d: np.ndarray) -> np.ndarray:
    """An embedding table's per-sample gradient adds the output gradients of a sample's positions into the rows
    of the tokens there: sum them per (sample, token), square, and add per token (no (samples x vocabulary)
    array, only one row per distinct pair). Both sums run over sorted segments (``np.add.reduceat``; ``np.add.at``
    on rows is ~6x slower), in float64."""
    rows, width = table_shape[0], int(np.prod(table_shape[1:]))
    b = d.shape[0]
    if ids.shape[0] == 1 and b > 1:  # one row of indices shared by every sample (the lookup broadcast by an Add)
        ids = np.broadcast_to(ids, (b, *ids.shape[1:]))
    index = np.asarray(ids, dtype=np.int64).reshape(b, -1)
    index = np.where(index < 0, index + rows, index)  # Gather's negative indices count from the end
    key = (np.arange(b)[:, None] * rows + index).reshape(-1)
    order = np.argsort(key, kind="stable")
    key = key[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sums = np.add.reduceat(d.reshape(-1, width)[order].astype(np.float64), first, axis=0)  # per (sample, token)
    tokens = key[first] % rows
    order = np.argsort(tokens, kind="stable")
    tokens = tokens[order]
    first = np.flatnonzero(np.r_[True, tokens[1:] != tokens[:-1]])
    out = np.zeros((rows, width), dtype=np.float64)
    out[tokens[first]] = np.add.reduceat(np.square(sums)[order], first, axis=0)
    return out
