"""Probe runs from a cut (bq_onnx/cuts.py): the same outputs as the whole model with the weight swapped, the
weights before the first cut and the small graphs run whole, and optimize gives the same measurements either way."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx import cuts
from bq_onnx.cuts import Cuts
from bq_onnx.graph import forward_model
from bq_onnx.runtimes.sessions import TempSessions


def _chain(layers: int = 36, width: int = 16, branch_at: int | None = None, seed: int = 0) -> onnx.ModelProto:
    """``layers`` x (MatMul, Add residual, Tanh): 3 nodes per layer; ``branch_at``: an If on a scalar input before
    that layer, both branches the identity of the running value read from the outer scope."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "x"
    for i in range(layers):
        if branch_at == i:
            then_g = helper.make_graph([helper.make_node("Identity", [x], ["t_out"])], "then", [],
                                       [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
            else_g = helper.make_graph([helper.make_node("Neg", [x], ["e_out"])], "else", [],
                                       [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
            nodes.append(helper.make_node("If", ["flag"], ["branched"], then_branch=then_g, else_branch=else_g))
            x = "branched"
        w = rng.normal(0, 0.3, (width, width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [x, f"m{i}"], [f"a{i}"]),
                  helper.make_node("Tanh", [f"a{i}"], [f"h{i}"])]
        x = f"h{i}"
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", width])]
    if branch_at is not None:
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    output = helper.make_tensor_value_info(x, TensorProto.FLOAT, ["n", width])
    graph = helper.make_graph(nodes, "chain", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _runs(width: int = 16, flag: bool | None = None) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    extra = {} if flag is None else {"flag": np.array(flag)}
    return [{"x": rng.normal(size=(5, width)).astype(np.float32), **extra} for _ in range(3)]


def _whole(model: ir.Model, names, runs, weights):
    copy = forward_model(model, names)
    for w in weights:
        copy.graph.inputs.append(copy.graph.initializers[w])
    session = TempSessions().open(copy)
    return lambda w, v: [session.run({**feeds, w: v}) for feeds in runs]


@pytest.mark.parametrize("branch_at", [None, 10])
def test_cut_runs_equal_the_whole_model_with_the_weight_swapped(branch_at):
    model = ir.serde.deserialize_model(_chain(branch_at=branch_at))
    names = [v.name for v in model.graph.outputs]
    runs = _runs(flag=None if branch_at is None else True)
    weights = [f"w{i}" for i in range(36)]
    whole = _whole(model, names, runs, weights)
    c = Cuts(model, names, runs, weights)
    rng = np.random.default_rng(2)
    for w in weights:
        value = rng.normal(0, 0.3, (16, 16)).astype(np.float32)
        got = c.runs_for(w, value, lambda w=w, value=value: whole(w, value))
        want = whole(w, value)
        for g, r in zip(got, want):
            np.testing.assert_allclose(g[0], r[0], rtol=1e-5, atol=1e-6)
    nodes = list(model.graph)
    first_reader = {w: min(i for i, n in enumerate(nodes) if w in [v.name for v in n.inputs if v is not None])
                    for w in weights}
    assert c.cut_of, "no weight was cut"
    for w, cut in c.cut_of.items():
        assert 0 < cut <= first_reader[w]  # a cut never skips a reader of the swapped weight
    early = [w for w in weights if first_reader[w] < len(nodes) // cuts.CUTS]
    assert early and not any(w in c.cut_of for w in early)  # before the first cut: the whole model
    if branch_at is not None:  # no part holds the If (its branches read the running value from the outer scope)
        at = next(i for i, n in enumerate(nodes) if n.op_type == "If")
        assert all(cut > at for cut in c.cut_of.values())
    c.close()


def test_small_graphs_run_whole():
    model = ir.serde.deserialize_model(_chain(layers=5))
    assert len(model.graph) < cuts.MIN_NODES
    names = [v.name for v in model.graph.outputs]
    calls = []
    c = Cuts(model, names, _runs(), ["w3"])
    c.runs_for("w3", np.zeros((16, 16), np.float32), lambda: calls.append(1) or [])
    assert calls and not c.cut_of


def test_optimize_measures_the_same_with_and_without_cuts(monkeypatch, tmp_path):
    """The guard's probes and the measured rounding choice from cuts give the measurements the whole model gives (to
    float rounding), and the same bytes, on a chain deep enough to be cut (the spy counts the cut runs)."""
    path = tmp_path / "chain.onnx"
    onnx.save(_chain(layers=30, width=32), path)
    rng = np.random.default_rng(3)
    calib = {"x": rng.normal(size=(96, 32)).astype(np.float32)}
    options = dict(bits=3, calib=calib)  # 72 fit samples: GPTQ with its measured choice, and the guard's probes
    used = []
    real = Cuts.runs_for

    def spy(self, weight, value, whole, which=None):
        used.append(weight in self.cut_of)
        return real(self, weight, value, whole, which)

    monkeypatch.setattr(Cuts, "runs_for", spy)
    with_cuts = bq_onnx.optimize(path, **options)
    assert any(used)
    monkeypatch.setattr(cuts, "MIN_NODES", 10**9)
    without = bq_onnx.optimize(path, **options)
    a, b = with_cuts.report["guard"], without.report["guard"]
    assert [c["label"] for c in a["candidates"]] == [c["label"] for c in b["candidates"]]
    for x, y in zip(a["candidates"], b["candidates"]):
        assert x["measured_loss"] == pytest.approx(y["measured_loss"], rel=1e-4)
    with_cuts.save(tmp_path / "a.onnx")
    without.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
