"""Curvature of embedding rows no calibration sample reads (``bq_onnx.estimators.unseen_rows``): the read counts
traced from the calibration inputs, the Good-Turing share, the fill, and the fallback where indices are computed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.calibration import load_calibration
from bq_onnx.estimators import estimate_posterior, prepare
from bq_onnx.estimators.unseen_rows import fill_unseen_rows, index_source, row_counts, unseen_share
from tests.conftest import make_model

V, D = 40, 6


def _lookup(cast: bool = True, computed: bool = False):
    """ids -> (Cast) -> Gather(E) -> MatMul(W): a table read by fed ids, or by ids computed in the graph (ids + 1)."""
    rng = np.random.default_rng(0)
    nodes, src = [], "ids"
    if cast:
        nodes.append(helper.make_node("Cast", ["ids"], ["ids32"], to=TensorProto.INT32))
        src = "ids32"
    if computed:
        nodes.append(helper.make_node("Add", [src, "one"], ["shifted"]))
        src = "shifted"
    nodes += [helper.make_node("Gather", ["E", src], ["e"]), helper.make_node("MatMul", ["e", "W"], ["y"])]
    inits = [numpy_helper.from_array(rng.standard_normal((V, D)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((D, 3)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array(1, dtype=np.int32 if cast else np.int64), "one")]
    return make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 5])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 5, 3])], inits)


def _ids(n: int = 8) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 12, size=(n, 5)).astype(np.int64)  # rows 12.. are never read (13.. when shifted)


def test_counts_are_traced_through_a_cast_to_the_fed_ids():
    proto, ids = _lookup(), _ids()
    prepared = prepare(ir.serde.deserialize_model(proto))
    info = next(w for w in prepared.weights if w.name == "E")
    gather = next(u.node for u in info.value.uses())
    assert index_source(gather.inputs[1]) == "ids"
    counts = row_counts(info, load_calibration({"ids": ids}, prepared.model))
    np.testing.assert_array_equal(counts, np.bincount(ids.ravel(), minlength=V))


def test_computed_indices_are_not_counted():
    proto = _lookup(computed=True)
    prepared = prepare(ir.serde.deserialize_model(proto))
    info = next(w for w in prepared.weights if w.name == "E")
    assert row_counts(info, load_calibration({"ids": _ids()}, prepared.model)) is None


def test_good_turing_share_and_fill_against_a_float64_reference():
    counts = np.array([5, 1, 1, 0, 2, 0, 0, 1])
    assert unseen_share(counts) == pytest.approx(3 / 10)  # 3 rows read once, 10 reads
    assert unseen_share(np.array([4, 2, 0])) == pytest.approx(1 / 6)  # no singleton: still one read's worth
    curv = np.abs(np.random.default_rng(2).standard_normal((8, 3)))
    curv[counts == 0] = 0
    filled, n, how = fill_unseen_rows(curv, counts)
    assert n == 3 and "Good-Turing" in how
    seen = counts > 0
    share = 3 / 10
    want = np.minimum(curv[seen].sum(0) * share / (1 - share) / 3, np.median(curv[seen], axis=0))
    np.testing.assert_allclose(filled[~seen], np.tile(want, (3, 1)), rtol=1e-12)
    np.testing.assert_array_equal(filled[seen], curv[seen])  # read rows keep what the data measured
    # the unread rows together weigh no more than the Good-Turing share says
    assert filled[~seen].sum() <= share / (1 - share) * curv[seen].sum() * (1 + 1e-12)


def test_without_counts_the_unread_rows_get_the_mean_seen_row():
    curv = np.abs(np.random.default_rng(3).standard_normal((6, 2)))
    curv[[1, 4]] = 0
    filled, n, how = fill_unseen_rows(curv, None)
    assert n == 2 and "mean" in how
    np.testing.assert_allclose(filled[[1, 4]], np.tile(curv[[0, 2, 3, 5]].mean(0), (2, 1)))
    assert fill_unseen_rows(np.ones((4, 2)), None) is None  # every row read: nothing to fill


@pytest.mark.parametrize("computed", [False, True])
def test_posterior_fills_unread_rows_by_count_or_by_mean(computed):
    """End to end: fed ids give the Good-Turing fill (and no channel floor on the table), computed ids the mean."""
    from bq_onnx.posterior import DEFAULT_PRIOR_PRECISION

    ids = _ids(16)
    post = estimate_posterior(_lookup(computed=computed), {"ids": ids}, "laplace")
    curvature = (post.weights["E"].precision - DEFAULT_PRIOR_PRECISION) / post.samples
    read = np.bincount((ids + computed).ravel(), minlength=V) > 0
    unread = curvature[~read]
    assert (unread > 0).all()
    if computed:
        np.testing.assert_allclose(unread, np.tile(unread[0], (len(unread), 1)), rtol=1e-6)  # one row, repeated
        assert any("'E'" in n and "mean curvature" in n for n in post.notes)  # (the channel floor then applies)
    else:
        assert (unread < np.median(curvature[read], axis=0) * (1 + 1e-6)).all()
        assert unread.sum() < curvature[read].sum()  # the unread rows weigh less than the read ones together
        assert any("Good-Turing" in n for n in post.notes)
        assert not any("'E'" in n and "floored" in n for n in post.notes)
