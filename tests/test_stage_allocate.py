"""The allocation inside optimize: budgets held, floors honoured, size targets, distillation."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

import bq_onnx
from bq_onnx.counting import count
from bq_onnx.errors import UnsupportedError, UsageError
from bq_onnx.estimators import estimate_posterior
from tests.conftest import MODELS
from tests.written import check_result

LENET = MODELS / "lenet.onnx"


@pytest.fixture(scope="module")
def posterior():
    return estimate_posterior(LENET, MODELS / "lenet_calib.npz", "activations")


@pytest.mark.parametrize("allocator", ["greedy", "dp", "quantile-inform", "random-bits", "selective"])
@pytest.mark.parametrize("budget", [5.75, 6.5])  # native: widths 2..8 store >= 5.4 bits at rows:1
def test_budget_is_never_exceeded_and_used_up(posterior, allocator, budget):
    result = bq_onnx.optimize(LENET, bits=budget, allocator=allocator, posterior=posterior, granularity="rows:1",
                              allocator_options={"steps": 100} if allocator == "random-bits" else None)
    al = result.report["allocation"]
    achieved = al["achieved_bits"]  # stored bits per weight, what --bits bounds
    assert budget - 0.05 <= achieved <= budget
    assert count(ir.serde.serialize_model(result.model), LENET).bits_per_weight == pytest.approx(achieved)
    assert result.report["totals"]["bits_per_weight"] == pytest.approx(al["achieved_payload_bits"])


def test_greedy_beats_uniform_on_expected_loss(posterior):
    greedy = bq_onnx.optimize(LENET, bits=3, posterior=posterior, bits_payload=True)
    uniform = bq_onnx.optimize(LENET, bits=3, allocator="uniform", posterior=posterior, granularity="tensor",
                               min_bits=["nothing=1"], bits_payload=True)  # a floor: the table path for uniform too
    assert greedy.report["allocation"]["expected_loss"] < uniform.report["allocation"]["expected_loss"]


def test_min_bits_and_allowed_bits_are_honoured(posterior):
    result = bq_onnx.optimize(LENET, bits=3, posterior=posterior, min_bits=["fc2*=6"], allowed_bits=[2, 4, 6, 8],
                              bits_payload=True)
    for layer in result.report["layers"]:
        assert all(b in (2, 4, 6, 8) for _, _, b in layer["pieces"])
        if layer["name"] == "fc2.weight":
            assert all(b >= 6 for _, _, b in layer["pieces"])


def test_metadata_budget_and_size_target(tmp_path, posterior):
    payload = bq_onnx.optimize(LENET, bits=3.5, posterior=posterior, bits_payload=True)
    assert 3.48 <= payload.report["totals"]["bits_per_weight"] <= 3.5
    alias = bq_onnx.optimize(LENET, bits=5.5, posterior=posterior, bits_include_metadata=True)
    assert 5.45 <= alias.report["allocation"]["achieved_bits"] <= 5.5  # the old flag: stored bits, the default
    sized = bq_onnx.optimize(LENET, bits=8, posterior=posterior, size_mb=0.04, format="compact")
    t = sized.report["totals"]
    other = sum(v.const_value.nbytes for v in sized.model.graph.initializers.values() if v.const_value is not None)
    assert (t["payload_bits"] + t["metadata_bits"]) / 8 <= 0.04e6
    assert other <= 0.04e6 * 1.05  # everything stored, constants and all, stays at the target


def test_allocators_that_need_a_posterior_say_so():
    with pytest.raises(UnsupportedError, match="needs a posterior"):
        bq_onnx.optimize(LENET, bits=3, allocator="quantile-inform")
    with pytest.raises(UsageError, match="--allocator must be one of"):
        bq_onnx.optimize(LENET, bits=3, allocator="magic")


def test_distillation_lowers_held_out_kl_and_verifies(tmp_path):
    result = bq_onnx.optimize(LENET, bits=5.5, calib=MODELS / "lenet_calib.npz", distill_steps=15,
                              posterior_options={"method": "activations", "calib_samples": 200})
    d = result.report["distillation"]
    assert d["kl_after"] <= d["kl_before"] and d["held_out_samples"] == 40
    report = result.save(tmp_path / "d.onnx")
    check_result(result, tmp_path / "d.onnx", report, ops=["Cast", "Sub", "Mul"])  # fast layout (Conv/Gemm)
    # the stored metadata stays fp16-representable
    for q in result.context.quantized.values():
        for _, _, qt in getattr(q, "pieces", [(0, 0, q)]):
            if qt.scale is not None:
                np.testing.assert_array_equal(qt.scale, qt.scale.astype(np.float16).astype(np.float32))


def test_same_input_and_seed_give_identical_bytes_through_the_bayesian_path(tmp_path):
    """Posterior (hutchinson probes), allocation and distillation are all seeded: two runs write the same file."""
    paths = []
    for name in ("a.onnx", "b.onnx"):
        result = bq_onnx.optimize(LENET, bits=5.5, calib=MODELS / "lenet_calib.npz", seed=7, distill_steps=3,
                                  posterior_options={"method": "hutchinson", "calib_samples": 64, "probes": 2})
        result.save(tmp_path / name)
        paths.append(tmp_path / name)
    assert paths[0].read_bytes() == paths[1].read_bytes()


@pytest.mark.parametrize("budget", [2.5, 3.0, 4.0])
def test_compact_stored_bits_never_exceed_the_budget(budget, tmp_path):
    """Every stored bit a decoder reads (codes, scales, zero points, the compact format's int64 layout vectors and
    its decode functions) fits the budget; the digits MLP is small enough for the layouts to matter."""
    model = MODELS / "digits_mlp.onnx"
    post = estimate_posterior(model, MODELS / "digits_mlp_calib.npz", "activations")
    result = bq_onnx.optimize(model, bits=budget, posterior=post, format="compact", group_size="auto",
                              no_guard=True)  # the allocation itself, not the guard's choice
    out = tmp_path / "m.onnx"
    result.save(out)
    counted = count(out, model).bits_per_weight  # every stored tensor, decode functions' constants included
    assert budget - 0.15 <= counted <= budget  # and the budget is still used
