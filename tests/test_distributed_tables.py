"""The expected-loss tables by weight on worker processes (issue 19 item 2): ``--workers`` shares the weights out
(each worker rebuilds the tables' run from files and sends back each weight's tables and chosen designs) and the
master takes them in in its weights' order, so the tables are compared with ``array_equal`` and the optimized model
byte for byte. With ``--posterior`` given, the tables' are the only workers of a run, so the fault injection
(``BQ_ONNX_WORKER_FAULT``) kills one of theirs."""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx import distributed as dist
from bq_onnx.calibration import load_calibration
from bq_onnx.cli import main
from bq_onnx.context import WeightInfo
from bq_onnx.errors import LimitError
from bq_onnx.stages.tables import expected_loss_tables
from tests.conftest import MODELS
from tests.test_one_scale import _calib, _estimated, asinh_model

MODEL, CALIB = MODELS / "lenet.onnx", MODELS / "lenet_calib.npz"


@pytest.fixture(scope="module")
def posterior(tmp_path_factory):
    path = tmp_path_factory.mktemp("posterior") / "lenet.npz"
    dist.estimate_posterior(MODEL, CALIB, calib_samples=32, seed=0).save(path)
    return path


def _optimize(capsys, out, *argv) -> bytes:
    code = main([str(a) for a in ["optimize", MODEL, *argv, "--no-verify", "-q", "-o", out]])
    text = capsys.readouterr()
    assert code == 0, text.out + text.err
    return out.read_bytes()


@pytest.mark.parametrize(("options", "kill"), [([], True), (["--quantizer", "auto", "--allowed-bits", "3,4"], False)],
                         ids=["default", "quantizer-auto"])
def test_tables_on_two_workers_give_the_same_bytes(tmp_path, capsys, monkeypatch, posterior, options, kill):
    """Default options: the spawned worker is killed once after its weights' tables, and they run again."""
    one = _optimize(capsys, tmp_path / "one.onnx", "--posterior", posterior, *options)
    marker = tmp_path / "killed"
    if kill:
        monkeypatch.setenv(dist.FAULT_ENV, str(marker))
    two = _optimize(capsys, tmp_path / "two.onnx", "--posterior", posterior, "--workers", "2", *options)
    assert one == two
    assert marker.exists() == kill
    assert not list(tmp_path.glob(".bq-tmp-*"))


def test_a_tables_worker_that_keeps_dying_fails_the_run_and_writes_nothing(tmp_path, capsys, monkeypatch, posterior):
    monkeypatch.setenv(dist.FAULT_ENV, "always")
    out = tmp_path / "out.onnx"
    code = main([str(a) for a in ["optimize", MODEL, "--posterior", posterior, "--workers", "2", "-o", out]])
    text = capsys.readouterr().err
    assert code == LimitError.exit_code, text
    assert "the worker of the tables of" in text and f"died {dist.RETRIES + 1} times" in text, text
    assert len(text.strip().splitlines()) == 1, text
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_measured_tables_on_workers_are_the_one_process_tables(rounding):
    """What spans weights travels too: ``W1`` (behind an op without a gradient rule) is measured on calibration data
    and calibrated on the gradient-covered ``W2``/``W3`` (the anchors: their ratios come back from whichever process
    measured them, in the weights' order); under ``--rounding gptq`` the input moments go to the workers and the
    (weight, width) pairs where GPTQ measured worse come back, with the notes."""
    calib = _calib()
    settings = {"bits": 4, "allowed_bits": [2, 3, 4], "granularity": "tensor", "rounding": rounding}
    runs = []
    for workers in (1, 2):
        model, ctx = _estimated(asinh_model(False), calib, **settings)
        with dist.distributed(workers):
            tables = expected_loss_tables(model, ctx, load_calibration(calib, model))
        runs.append((tables, ctx))
    (one, ctx1), (two, ctx2) = runs
    assert [t.name for t in one.blocks] == [t.name for t in two.blocks]
    for a, b in zip(one.blocks, two.blocks):
        for field in ("loss", "cost", "payload", "metadata", "stored"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), (a.name, field)
    assert one.designs == two.designs
    assert ctx1.messages == ctx2.messages
    assert any("without gradients got loss tables measured" in m and "calibrated on" in m for m in ctx1.messages)
    nearest = sorted(k for k in ctx1.rounded if k[0] == "nearest")
    assert nearest == sorted(k for k in ctx2.rounded if k[0] == "nearest")
    if rounding == "gptq":
        assert any("rounding chosen by measurement" in m for m in ctx1.messages), ctx1.messages


def test_weights_are_shared_out_by_element_count_in_a_fixed_way():
    def info(name: str, k: int, n: int) -> WeightInfo:
        from types import SimpleNamespace

        return WeightInfo(name, None, SimpleNamespace(view_shape=(k, n)), ())

    weights = [info("a", 10, 10), info("b", 50, 10), info("c", 30, 10), info("d", 20, 10), info("e", 5, 2)]
    parts = dist.balanced(weights, 2)
    assert parts == [["a", "b"], ["c", "d", "e"]]  # 600 and 510 elements; each part in the weights' order
    assert dist.balanced(weights, 2) == parts
    assert sorted(n for p in dist.balanced(weights, 3) for n in p) == list("abcde")
    assert len(dist.balanced(weights, 9)) == 5  # no empty parts
