"""Work done once instead of twice, with the same bytes (issue 17): the squared-gradient sums skip all-zero rows
(:func:`bq_onnx.estimators.squared_gradients.add_squares`), the design cache hashes large arrays by pieces, the
temporary sessions are shared by file content and write each big weight once, as a file named by its bytes
(:class:`bq_onnx.runtimes.sessions.TempSessions`), verify reads
the source once for both references, the measuring sessions' idle threads sleep instead of spinning
(:func:`bq_onnx.runtimes.ort.no_spinning`), weight views are kept per run (:func:`bq_onnx.quantizers.cache.kept`)
and the guard decodes each design once (``guard._Decoded``). Each is checked against the way it was done before,
bit for bit."""

from __future__ import annotations

import gc
import hashlib
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import bq_onnx
from bq_onnx.estimators import squared_gradients
from bq_onnx.posterior import SumAccumulator
from bq_onnx.quantizers import cache, parallel
from bq_onnx.runtimes import sessions
from tests.conftest import MODELS


def _sparse_gradient(rng: np.random.Generator, rows: int, cols: int, touched: int) -> np.ndarray:
    g = np.zeros((rows, cols), dtype=np.float32)
    hit = rng.choice(rows, touched, replace=False)
    g[hit] = rng.standard_normal((touched, cols)).astype(np.float32) * 1e-3
    g[hit[0], :3] = -0.0  # negative zeros inside a touched row, and a row of them alone
    g[(hit[1] + 1) % rows] = -0.0
    return g


def test_add_squares_gives_the_sums_update_gives_bit_for_bit() -> None:
    rng = np.random.default_rng(0)
    old, new = SumAccumulator(), SumAccumulator()
    for _ in range(6):
        grads = {
            "table": _sparse_gradient(rng, 400, 24, 7),  # sparse: the row-by-row path
            "dense": rng.standard_normal((16, 9)).astype(np.float32),  # every row: the dense path
            "vector": rng.standard_normal(11).astype(np.float32),  # 1-D: through update
            "half": _sparse_gradient(rng, 40, 5, 30),  # over SPARSE_SHARE of its rows: dense
            "double": rng.standard_normal((5, 4)),  # float64: through update
        }
        old.update({name: np.square(g) for name, g in grads.items()}, samples=2)
        squared_gradients.add_squares(new, grads, samples=2)
    assert old.count == new.count == 12
    assert old.sums.keys() == new.sums.keys()
    for name in old.sums:
        assert old.sums[name].dtype == new.sums[name].dtype == np.float64
        assert old.sums[name].tobytes() == new.sums[name].tobytes(), name
    assert (new.sums["table"] == 0).sum() > 0  # rows no sample touched stayed exactly zero


def test_add_squares_takes_the_row_path_on_a_sparse_gradient(monkeypatch) -> None:
    rng = np.random.default_rng(1)
    sums = SumAccumulator()
    squared_gradients.add_squares(sums, {"t": _sparse_gradient(rng, 100, 8, 3)}, samples=1)
    monkeypatch.setattr(np, "add", None)  # the dense path would call it: the sparse one must not
    squared_gradients.add_squares(sums, {"t": _sparse_gradient(rng, 100, 8, 3)}, samples=1)
    assert sums.count == 2


def test_digest_by_pieces_does_not_depend_on_threads(monkeypatch) -> None:
    monkeypatch.setattr(cache, "HASH_PIECE", 1000)
    a = np.random.default_rng(2).standard_normal((300, 7))  # 16,800 bytes: 17 pieces
    keys = []
    for threads in (1, 2, 3):
        parallel.set_threads(threads)
        cache._recent.clear()
        keys.append(cache.digest(a))
    parallel.set_threads(None)
    assert keys[0] == keys[1] == keys[2]
    b = a.copy()
    b.reshape(-1)[-1] = np.nextafter(b.reshape(-1)[-1], 1)  # one bit in the last piece
    cache._recent.clear()
    assert cache.digest(b) != keys[0]
    small = np.arange(10, dtype=np.float32)
    assert cache.digest(small)[2] == hashlib.sha256(small.tobytes()).digest()[:16]


def _matmul_model(w: np.ndarray) -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, w.shape[0]]))
    weight = ir.Value(name="w", const_value=ir.tensor(w, name="w"), type=ir.TensorType(ir.DataType.FLOAT),
                      shape=ir.Shape(list(w.shape)))
    node = ir.node("MatMul", [x, weight], outputs=[ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT),
                                                           shape=ir.Shape([1, w.shape[1]]))])
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_sessions_are_shared_by_content_while_a_holder_is_open() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    feeds = {"x": rng.standard_normal((1, 6)).astype(np.float32)}
    first, second = sessions.TempSessions(), sessions.TempSessions()
    a = first.open(_matmul_model(w))
    b = second.open(_matmul_model(w.copy()))  # another model object, the same bytes
    c = second.open(_matmul_model(w + 1))
    assert a is b and c is not a
    alone = sessions.TempSessions()
    alone.close()
    fresh = sessions.get_runtime("onnxruntime").session(_save(_matmul_model(w)), exact=True)
    np.testing.assert_array_equal(b.run(feeds)[0], fresh.run(feeds)[0])
    np.testing.assert_allclose(b.run(feeds)[0], feeds["x"] @ w, rtol=1e-6)
    first.close()
    second.close()
    del a, b, c
    gc.collect()
    assert len(sessions._shared) == 0  # nothing outlives its holders


def _save(model: ir.Model):
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="bq-test-")) / "m.onnx"
    ir.save(model, path)
    return path


def test_big_models_keep_their_own_sessions(monkeypatch) -> None:
    monkeypatch.setattr(sessions, "SHARED_SESSION_BYTES", 8)
    w = np.ones((6, 4), dtype=np.float32)
    holder = sessions.TempSessions()
    try:
        assert holder.open(_matmul_model(w)) is not holder.open(_matmul_model(w))
    finally:
        holder.close()


def test_session_weights_are_written_once_by_content_and_read_as_inline() -> None:
    """A temporary session's big initializers go to files named by their bytes, written once per holder: two
    models with the same weight write one file, neither model file holds the weight, the model objects keep their
    own tensors, and the sessions compute what a session of the model saved whole computes, bit for bit, also
    after the holder's files are gone."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 48)).astype(np.float32)  # 12 KiB: over STORED_TENSOR_BYTES
    assert w.nbytes >= sessions.STORED_TENSOR_BYTES
    feeds = {"x": rng.standard_normal((1, 64)).astype(np.float32)}
    fresh = sessions.get_runtime("onnxruntime").session(_save(_matmul_model(w)), exact=True)
    holder = sessions.TempSessions()
    first, second = _matmul_model(w), _matmul_model(w.copy())
    second.graph.outputs[0].name = "z"  # another graph, the same weight
    tensor = first.graph.initializers["w"].const_value
    a, b = holder.open(first), holder.open(second)
    assert a is not b
    assert first.graph.initializers["w"].const_value is tensor  # the model is left as it was
    folder = Path(holder._tmp.name)
    stored = sorted(folder.glob("*.bin"))
    assert [f.name for f in stored] == [hashlib.sha256(w.tobytes()).hexdigest() + ".bin"]
    assert all(f.stat().st_size < w.nbytes for f in folder.glob("m*.onnx"))
    expected = fresh.run(feeds)[0]
    holder.close()
    assert not folder.exists()
    for session in (a, b):
        assert session.run(feeds)[0].tobytes() == expected.tobytes()


def _as_before(monkeypatch) -> None:
    """Every reuse of this file off: dense sums through ``update``, no shared sessions, verify reading twice,
    spinning threads, views made and decoded weights decoded every time."""
    from bq_onnx import verify
    from bq_onnx.runtimes import ort
    from bq_onnx.stages import guard

    def add_squares(sums, gradients, samples):
        sums.update({name: np.square(g) for name, g in gradients.items()}, samples=samples)

    monkeypatch.setattr(squared_gradients, "add_squares", add_squares)
    monkeypatch.setattr(sessions, "SHARED_SESSION_BYTES", -1)
    monkeypatch.setattr(ort, "no_spinning", lambda options: None)
    monkeypatch.setattr(cache, "MAX_KEPT_BYTES", -1)
    monkeypatch.setattr(guard, "DECODED_BYTES", -1)
    monkeypatch.setattr(verify, "prepared_reference",
                        lambda source, ctx: verify.PreparedReference(
                            verify.run_passes(verify.load_model(source),
                                              [*verify.prepare_passes(ctx.config.weights),
                                               verify.TopologicalSortPass()])))


@pytest.mark.parametrize("name", ["tiny_transformer", "lenet"])  # a Gather table (sparse gradients); a CNN
def test_outputs_are_the_bytes_of_the_work_done_twice(tmp_path, monkeypatch, name) -> None:
    model, calib = MODELS / f"{name}.onnx", MODELS / f"{name}_calib.npz"
    outs = {}
    for label in ("now", "before"):
        if label == "before":
            _as_before(monkeypatch)
        result = bq_onnx.optimize(model, calib=calib, bits=4)
        out = tmp_path / f"{label}.onnx"
        result.save(out)  # verified, as the CLI does
        guard = json.dumps(result.context.guard, sort_keys=True, default=repr)  # every candidate's measured loss
        outs[label] = (out.read_bytes(), guard, result.context.posterior.weights)
    now, before = outs["now"], outs["before"]
    assert now[0] == before[0]
    assert now[1] == before[1]
    for w, post in now[2].items():
        assert post.precision.tobytes() == before[2][w].precision.tobytes(), w


def test_the_blocks_extremes_read_once_give_the_same_search() -> None:
    """quantize_uniform hands its blocks' minima and maxima to the constant-block candidate and their largest
    magnitude to the range search: the same values the two computed for themselves."""
    from bq_onnx.quantizers.blocked import _prepare
    from bq_onnx.quantizers.uniform import _add_constant_candidate, _Search, _uniform_meta

    rng = np.random.default_rng(4)
    w = rng.standard_normal((70, 9)).astype(np.float32)
    w[:32, 0] = 0.5  # a constant block
    w[:, 1] = 0.0
    w[:32, 2] = -0.0
    bl = _prepare(w, 3, 32, rng.gamma(0.5, 1.0, w.shape))
    xmin, xmax = bl.x.min(axis=1), bl.x.max(axis=1)
    rows = slice(0, bl.nrows)
    own, given = _Search(bl, rows), _Search(bl, rows, np.maximum(-xmin, xmax))
    assert own.norm.tobytes() == given.norm.tobytes()
    lo, hi = np.minimum(xmin, 0).astype(np.float64), np.maximum(xmax, 0).astype(np.float64)
    cands = [_uniform_meta(lo, hi, 8)]
    for a, b in zip(_add_constant_candidate(bl, cands, 8, False), _add_constant_candidate(bl, cands, 8, False,
                                                                                         extremes=(xmin, xmax))):
        assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert len(_add_constant_candidate(bl, cands, 8, False)) == 2  # the constant block's candidate is there


def test_views_are_kept_per_run_read_only_and_dropped_after() -> None:
    """The quantize stage asks for every weight's view and importance once per spending of the budget: inside a
    run the same (read-only) arrays come back; outside one, and after it, fresh ones."""
    from bq_onnx import weights
    from bq_onnx.context import Context, WeightInfo
    from bq_onnx.layout import WeightLayout
    from bq_onnx.posterior import Posterior, WeightPosterior

    rng = np.random.default_rng(5)
    w = rng.standard_normal((8, 6)).astype(np.float32)
    value = ir.Value(name="w", const_value=ir.tensor(w, name="w"))
    info = WeightInfo("w", value, WeightLayout((8, 6), (1,)), ("Gemm:n",))  # transposed: a copy each time
    ctx = Context()
    assert weights.weight_view(ctx, info)[0] is not weights.weight_view(ctx, info)[0]  # no run: not kept
    with cache.scope():
        first, none = weights.weight_view(ctx, info)
        again, _ = weights.weight_view(ctx, info)
        assert none is None and first is again and not first.flags.writeable
        np.testing.assert_array_equal(first, w.T)
        wp = WeightPosterior(w, rng.gamma(1.0, 1.0, w.shape), np.ones_like(w), "test")
        ctx.posterior = Posterior("laplace", 1, 1.0, {"w": wp})
        view, importance = weights.weight_view(ctx, info)
        assert view is not first and weights.weight_view(ctx, info)[1] is importance  # keyed by the posterior
        np.testing.assert_array_equal(importance, ctx.posterior.weights["w"].precision.T)
        with pytest.raises(ValueError):
            view[0, 0] = 1.0  # shared: nobody may write it
        hashed = []
        real = cache._content_hash
        cache._content_hash = lambda data: hashed.append(data.size) or real(data)
        try:
            keys = [cache.digest(view) for _ in range(3)]
            for i in range(9):  # more arrays than digest's recent memo holds
                cache.digest(np.full(3, i, np.float32))
            keys.append(cache.digest(view))
        finally:
            cache._content_hash = real
        assert keys[0] == keys[-1] and len(hashed) == 1 + 9  # the kept view hashed once
    assert not cache._kept and not cache._kept_keys and cache._kept_bytes[0] == 0
    with cache.scope():
        assert weights.weight_view(ctx, info)[0] is not view


def test_a_big_weights_view_and_importance_are_kept_on_disk_the_models_own_array_where_it_is(monkeypatch) -> None:
    """Issue 21: a weight's view and importance of ``SPILL_BYTES`` or more are kept in a mapped temporary file (the
    same values, read-only, not counted against the memory cap, pages dropped after each weight) while the temporary
    folder keeps ``DISK_RESERVE_BYTES`` free; the model's own initializer (an untransposed view) is not copied; with
    no room or no disk they are kept in memory as before."""
    import mmap

    from bq_onnx import idle, weights
    from bq_onnx.context import Context, WeightInfo
    from bq_onnx.layout import WeightLayout
    from bq_onnx.posterior import Posterior, WeightPosterior

    def mapped(a: np.ndarray) -> bool:
        while isinstance(a, np.ndarray):
            a = a.base
        return isinstance(a, memoryview) and isinstance(a.obj, mmap.mmap)

    monkeypatch.setattr(cache, "SPILL_BYTES", 1 << 16)
    monkeypatch.setattr(idle, "IDLE_BYTES", 1 << 16)
    rng = np.random.default_rng(6)
    w = rng.standard_normal((160, 128)).astype(np.float32)
    precision = rng.gamma(1.0, 1.0, w.shape)
    for dims, transposed in (((160, 128), (0,)), ((128, 160), (1,))):
        array = w if dims == (160, 128) else np.ascontiguousarray(w.T)
        value = ir.Value(name="w", const_value=ir.tensor(array, name="w"))
        info = WeightInfo("w", value, WeightLayout(dims, transposed), ("MatMul:b",) if dims == (160, 128)
                          else ("Gemm:n",))
        ctx = Context()
        wp = WeightPosterior(value.const_value.numpy(), precision if dims == (160, 128) else precision.T.copy(),
                             np.ones_like(array), "test")
        ctx.posterior = Posterior("laplace", 1, 1.0, {"w": wp})
        with cache.scope():
            view, importance = weights.weight_view(ctx, info)
            assert weights.weight_view(ctx, info)[1] is importance and cache._kept_bytes[0] == 0
            assert cache._kept_bytes[1] == view.nbytes + importance.nbytes
            np.testing.assert_array_equal(view, w)
            np.testing.assert_array_equal(importance, precision)
            assert mapped(importance) and not importance.flags.writeable
            assert mapped(view) == (dims != (160, 128))  # the model's own array stays the model's
            idle.drop_pages()
            np.testing.assert_array_equal(importance, precision)  # read back after its pages were dropped
        assert cache._kept_bytes == [0, 0]
    monkeypatch.setattr(cache, "_disk_free", lambda: cache.DISK_RESERVE_BYTES + (1 << 16))  # would leave too little
    with cache.scope():
        view, importance = weights.weight_view(ctx, info)
        assert not mapped(importance) and cache._kept_bytes == [view.nbytes + importance.nbytes, 0]
    monkeypatch.undo()
    monkeypatch.setattr(cache, "SPILL_BYTES", 1 << 16)
    monkeypatch.setattr(idle, "IDLE_BYTES", 1 << 16)
    monkeypatch.setattr(weights, "arrays_to_disk", lambda arrays: arrays)  # no disk: in memory, as before
    with cache.scope():
        view, importance = weights.weight_view(ctx, info)
        assert not mapped(importance) and cache._kept_bytes == [view.nbytes + importance.nbytes, 0]
        assert weights.weight_view(ctx, info)[1] is importance


def test_designs_kept_for_the_next_spend_wait_on_disk_with_the_same_values(monkeypatch) -> None:
    """Issue 21: inside a scope given :func:`bq_onnx.idle.design_to_disk`, a design of ``SPILL_BYTES`` or more is
    kept as read-only views of a mapped file (the same values as computed outside any scope; a hit hands back that
    object), a smaller one in memory; no disk: in memory."""
    from bq_onnx import idle
    from bq_onnx.quantizers import Spec, quantize_spec

    monkeypatch.setattr(cache, "SPILL_BYTES", 1 << 16)
    monkeypatch.setattr(idle, "IDLE_BYTES", 1 << 16)
    rng = np.random.default_rng(7)
    big, small = rng.standard_normal((512, 384)).astype(np.float32), rng.standard_normal((64, 32)).astype(np.float32)
    plain = {w.shape: quantize_spec(w, 4, Spec("uniform"), 32) for w in (big, small)}
    with cache.scope(idle.design_to_disk):
        for w in (big, small):
            qt = quantize_spec(w, 4, Spec("uniform"), 32)
            assert quantize_spec(w, 4, Spec("uniform"), 32) is qt
            assert np.array_equal(qt.codes, plain[w.shape].codes) and np.array_equal(qt.scale, plain[w.shape].scale)
            assert qt.codes.flags.writeable == (w is small)  # the big one's codes are mapped, read-only
            idle.drop_pages()
            assert np.array_equal(qt.codes, plain[w.shape].codes)
    assert cache._spill == [None]
    monkeypatch.setattr(idle, "_mapped", lambda arrays: {})  # no disk
    with cache.scope(idle.design_to_disk):
        assert quantize_spec(big, 4, Spec("uniform"), 32).codes.flags.writeable


def test_the_guard_decodes_a_design_once_and_keeps_at_most_its_bytes(monkeypatch) -> None:
    from bq_onnx.context import WeightInfo
    from bq_onnx.layout import WeightLayout
    from bq_onnx.quantizers.uniform import quantize_uniform
    from bq_onnx.stages import guard

    rng = np.random.default_rng(6)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    info = WeightInfo("w", ir.Value(name="w", const_value=ir.tensor(w.T.copy(), name="w"),
                                    type=ir.TensorType(ir.DataType.FLOAT)), WeightLayout((16, 64), (1,)), ("Gemm:n",))
    a, b = quantize_uniform(w, 4), quantize_uniform(w, 3)
    decoded = guard._Decoded()
    first = decoded.get(info, a)
    assert decoded.get(info, a) is first and decoded.get(info, b) is not first
    np.testing.assert_array_equal(first, info.layout.from_view(a.dequantize()).astype(np.float32))
    assert first.dtype == np.float32 and first.shape == (16, 64)
    monkeypatch.setattr(guard, "DECODED_BYTES", first.nbytes)  # room for one: the older one goes
    decoded.get(info, b)
    assert decoded.get(info, a) is not first


def _binding_block_by_block(ctx, allowed, block_bits, chosen, floors, exact, lower=True):
    """bracket.binding as it was: every block's answer worked out again."""
    from bq_onnx.stages.bracket import _costs_the_same, _representatives

    up = down = every = False
    for name, scored in block_bits.items():
        width = chosen.get(name)
        if width is None:
            continue
        floor = floors.get(name, 0)
        above = [w for w in allowed if w > width]
        if above and _representatives(ctx, allowed, above[:1])[0] not in scored:
            up = True
        if not lower:
            continue
        below = [w for w in allowed if floor <= w < width]
        if exact.get(name) and any(w not in scored for w in below):
            every = True
        cheaper = [w for w in below if not _costs_the_same(ctx, w, width)]
        if cheaper and _representatives(ctx, allowed, cheaper[-1:])[0] not in scored:
            down = True
    return down, up, every


@pytest.mark.parametrize("fmt", ["native", "compact"])
def test_binding_answers_per_kind_of_block_as_block_by_block(fmt) -> None:
    from bq_onnx.config import OptimizeConfig
    from bq_onnx.context import Context
    from bq_onnx.stages.bracket import binding

    ctx = Context(OptimizeConfig.from_options(format=fmt))
    allowed = [0, 2, 3, 4, 5, 6, 7, 8]
    rng = np.random.default_rng(7)
    seen = set()
    for _ in range(300):
        n = int(rng.integers(1, 6))
        block_bits = {f"b{i}": tuple(sorted(rng.choice(allowed, int(rng.integers(1, 5)), replace=False).tolist()))
                      for i in range(n)}
        chosen = {b: int(rng.choice(bits)) for b, bits in block_bits.items() if rng.random() < 0.9}
        floors = {b: int(rng.choice([0, 2, 4])) for b in block_bits if rng.random() < 0.5}
        exact = {b: bool(rng.random() < 0.2) for b in block_bits}
        for lower in (True, False):
            got = binding(ctx, allowed, block_bits, chosen, floors, exact, lower)
            assert got == _binding_block_by_block(ctx, allowed, block_bits, chosen, floors, exact, lower)
            seen.add(got)
    assert len(seen) >= 4  # the cases cover bound and unbound answers alike


def test_a_candidates_many_small_pieces_wait_on_disk_too():
    """Issue 21: a big weight's codes are cut into thousands of pieces of a few KiB (one per slice of columns and
    width), and the guard keeps every candidate it measured; pieces under 64 KiB stayed in memory. Now they share
    the candidate's file, the same values."""
    from bq_onnx import idle

    rng = np.random.default_rng(0)
    pieces = {f"p{i}": rng.integers(0, 16, 6000, dtype=np.uint8) for i in range(3000)}  # 17 MiB in all
    moved = idle.arrays_to_disk(pieces)
    assert moved is not pieces
    assert all(not a.flags.writeable for a in moved.values())  # views of the mapped file
    assert all(np.array_equal(moved[k], v) for k, v in pieces.items())
    assert all(a.ctypes.data % 64 == 0 for a in moved.values())
