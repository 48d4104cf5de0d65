"""``--group-size auto``: the tables choose the block size per tensor and width; the output stays exact."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import bq_onnx
from bq_onnx.cli import main
from bq_onnx.config import AUTO_GROUPS, parse_group_size
from bq_onnx.context import Derived
from bq_onnx.errors import UsageError
from bq_onnx.estimators import estimate_posterior
from bq_onnx.quantizers import Spec, candidates
from tests.conftest import MODELS

TINY = MODELS / "tiny_transformer.onnx"


@pytest.fixture(scope="module")
def posterior():
    return estimate_posterior(TINY, MODELS / "tiny_transformer_calib.npz", "activations")


def test_candidates_offer_each_design_at_each_block_reference_first():
    specs = candidates("uniform", 0.0, 4, 4096, blocks=(32, 64, 128))
    assert specs == [Spec("uniform", block=32), Spec("uniform", block=64), Spec("uniform", block=128)]
    auto = candidates("uniform", "auto", 3, 4096, blocks=(32, 128))
    assert len(auto) == 2 * len(candidates("uniform", "auto", 3, 4096)) and auto[0] == Spec("uniform", block=32)
    assert candidates("uniform", 0.0, 0, 4096, blocks=(32, 64)) == [Spec("uniform")]  # the mean has no blocks
    assert candidates("uniform", 0.0, 4, 4096) == [Spec("uniform")]


def test_block_choices_drop_sizes_that_mean_the_same_and_legalized_weights():
    s = Derived(group_size=64, group_choices=AUTO_GROUPS)
    assert s.block_choices_for("w", 384) == (32, 64, 128)
    assert s.block_choices_for("w", 100) == (32, 64, 128)  # 128 >= 100 rows: one block per column
    assert s.block_choices_for("w", 50) == (32, 64)  # 64 and 128 both mean one block: the smaller stays
    assert s.block_choices_for("w", 20) == ()  # every size is one block per column
    legal = Derived(group_size=64, group_choices=AUTO_GROUPS, weight_group_size=(("w", 128),))
    assert legal.block_choices_for("w", 384) == () and legal.block_choices_for("v", 384) == (32, 64, 128)
    assert Derived().block_choices_for("w", 384) == ()


def test_parse_group_size():
    assert parse_group_size("auto") == (64, AUTO_GROUPS)
    assert parse_group_size(0) == (0, ()) and parse_group_size("128") == (128, ())
    for bad in ("big", 1.5, True):
        with pytest.raises(UsageError, match="--group-size"):
            parse_group_size(bad)


@pytest.mark.parametrize("fmt", ["native", "compact"])
def test_auto_groups_hold_the_budget_and_decode_exactly(posterior, fmt, tmp_path):
    budget = 5.5 if fmt == "native" else 3.0  # native at group 32: int4 plus scales is over 5 bits
    # the allocations themselves (--no-guard): the guard could write uniform instead of either
    fixed = bq_onnx.optimize(TINY, bits=budget, posterior=posterior, format=fmt, group_size=32, no_guard=True)
    auto = bq_onnx.optimize(TINY, bits=budget, posterior=posterior, format=fmt, group_size="auto", no_guard=True)
    blocks = {layer["block_size"] for layer in auto.report["layers"]}
    assert blocks <= set(AUTO_GROUPS) and blocks - {32}, blocks  # the 64x64 tensors take larger blocks
    assert auto.report["totals"]["bits_per_weight_with_metadata"] <= budget + 1e-9
    # the choice is by expected loss against stored bits: at the same budget it is no worse than its reference
    assert auto.report["allocation"]["expected_loss"] <= fixed.report["allocation"]["expected_loss"]
    out = tmp_path / f"auto_{fmt}.onnx"
    auto.save(out)  # the post-write check runs the file in onnxruntime against the quantized weights
    model = onnx.load(str(out))
    feeds = auto.sample_feeds()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.isfinite(got).all() and len(model.graph.node) > 0


def test_cli_accepts_auto_and_rejects_garbage(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code = main(["optimize", str(TINY), "-o", str(out), "--group-size", "auto", "--bits", "4.5"])
    assert code == 0 and out.exists()
    capsys.readouterr()
    bad = tmp_path / "bad.onnx"
    code = main(["optimize", str(TINY), "-o", str(bad), "--group-size", "lots"])
    err = capsys.readouterr().err
    assert code != 0 and "--group-size" in err and "Traceback" not in err and not bad.exists()
