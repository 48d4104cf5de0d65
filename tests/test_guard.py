"""The guard: the allocation is measured on held-out data against uniform, repaired or replaced where it is worse,
and the user's quality targets stop optimize before anything is written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import bq_onnx
from bq_onnx.calibration import Calibration
from bq_onnx.errors import EXIT_QUALITY, QualityError
from bq_onnx.stages.guard import ALTERNATIVES, split
from tests.conftest import MODELS

LENET = MODELS / "lenet.onnx"
CALIB = MODELS / "lenet_calib.npz"
ALL_WIDTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8)


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    return {"input": np.load(CALIB)["input"][:160]}


@pytest.fixture(scope="module")
def lying_posterior(calib):
    """A real posterior of LeNet whose fc1 (the largest layer, not a head) is said to be free: curvature and
    precision a billionth of what the data show, as the local model says of weights the data never exercise."""
    posterior = bq_onnx.estimate_posterior(LENET, calib)
    wp = posterior.weights["fc1.weight"]
    wp.curvature = wp.curvature * 1e-9
    wp.precision = wp.precision * 1e-9
    return posterior


def _optimize(**kw):
    return bq_onnx.optimize(LENET, format="compact", allowed_bits=ALL_WIDTHS, **kw)


def test_split_is_disjoint_deterministic_and_keeps_fixed_batches():
    x = np.arange(40, dtype=np.float32).reshape(40, 1)
    calib = Calibration({"x": x}, "<test>")
    fit, held = split(calib, 0.25, seed=3)
    assert held.num_samples == 10 and fit.num_samples == 30
    got = np.sort(np.concatenate([fit.arrays["x"][:, 0], held.arrays["x"][:, 0]]))
    assert np.array_equal(got, x[:, 0])
    again = split(calib, 0.25, seed=3)[1]
    assert np.array_equal(again.arrays["x"], held.arrays["x"])
    assert not np.array_equal(split(calib, 0.25, seed=4)[1].arrays["x"], held.arrays["x"])
    fixed = Calibration({"x": x}, "<test>", fixed_batch=4)
    fit, held = split(fixed, 0.25, seed=0)
    assert held.num_samples % 4 == 0 and fit.num_samples % 4 == 0
    starts = held.arrays["x"][::4, 0]
    assert np.all(starts % 4 == 0)  # whole runs of the fixed batch
    assert split(Calibration({"x": x[:1]}, "<test>"), 0.25, 0)[1] is None  # one sample: nothing to hold out
    assert split(calib, 0.0, 0)[1] is None


def test_posterior_never_sees_the_held_out_samples(calib):
    result = _optimize(bits=3, calib=calib)
    assert result.context.posterior.samples == 120
    g = result.report["guard"]
    assert g["data"] == "held-out" and g["samples"] == 40
    # tensors are probed on the fit split (twice the held-out count), never on the samples that pick the winner
    assert {k: g["probes"][k] for k in ("data", "samples")} == {"data": "fit", "samples": 80}


def test_a_sound_allocation_is_kept_and_measures_no_worse_than_uniform(calib):
    # 2.75 bits: the case the guard keeps (at 3 bits with fp16 scales it was, until the decode's constants changed
    # in session 16 and moved the budget by a few blocks: now that one is repaired)
    result = bq_onnx.optimize(LENET, bits=2.75, format="compact", calib=calib)
    g = result.report["guard"]
    assert g["result"] == "kept"
    assert g["measured_loss"] <= g["uniform"]["measured_loss"]
    assert g["stored_bits"] <= 2.75
    fid = g["fidelity"]["logits"]
    assert 0.9 < fid["agreement"] <= 1.0 and 0.9 < fid["cosine"] <= 1.0 and fid["rel_error"] > 0


def test_a_block_the_posterior_calls_free_is_caught_and_repaired(calib, lying_posterior):
    result = _optimize(bits=3, calib=calib, posterior=lying_posterior)
    g = result.report["guard"]
    first, uniform = g["first"], g["uniform"]
    assert first["measured_loss"] > uniform["measured_loss"]  # the lie hurts: fc1 went to 0 bits
    assert g["repairs"] and "fc1.weight" in g["repairs"][0]["raised"]
    # written: the repair, or a uniform (on plain grids too, filled into the budget) that measured better still
    assert g["result"] in ("repaired", "uniform", "data-free uniform", "data-free uniform, filled")
    assert g["measured_loss"] <= uniform["measured_loss"]
    fc1 = [b for name, b in result.context.allocation.bits.items() if name.startswith("fc1.weight")]
    assert min(fc1) >= uniform["width"]
    assert g["stored_bits"] <= 3.0


def test_tables_checked_tensor_by_tensor_catch_an_underpredicted_tensor_the_comparison_misses(calib):
    """fc1's curvature a thousandth of the data's: at --bits 3.75 it gets 2 bits, and the allocation can still measure
    about as well as uniform 3-bit, so the whole-model comparison alone may keep it. Measured alone, fc1 costs far
    more than its prediction relative to the other tensors: its table is scaled up, the budget spent again, fc1
    gets more bits and the written model measures several times better than the first allocation."""
    posterior = bq_onnx.estimate_posterior(LENET, calib)
    wp = posterior.weights["fc1.weight"]
    wp.curvature, wp.precision = wp.curvature * 1e-3, wp.precision * 1e-3
    # fp16 scales: with the default double-quantized scales the repair also raises fc1 (0.0077 -> 0.0045) but the
    # data-free candidate measures lower still (0.0025) and is written; this test is about the repair. Nearest
    # rounding: under GPTQ (the default with --calib) the repair measures lower held out (0.00077) but not on the fit
    # split (0.00141 against uniform's 0.00124), and the plain-grid uniform, filled, is written
    # 3.75 bits: at 4 the repair (fc1 raised) measured 0.0059 against the first allocation's 0.0066 since the
    # decode's constants changed (session 16) and the budget moved by a few blocks; here 0.0016 against 0.0068
    opts = {"bits": 3.75, "format": "compact", "calib": calib, "posterior": posterior, "scales": "fp16",
            "rounding": "nearest"}
    first = bq_onnx.optimize(LENET, **opts, no_guard=True)
    result = bq_onnx.optimize(LENET, **opts)
    g = result.report["guard"]
    step = g["repairs"][0]
    assert step["kind"] == "tables" and "fc1.weight" in step["raised"]
    assert step["excess"]["fc1.weight"] > 100  # the factor its table was scaled by, the largest
    assert step["excess"]["fc1.weight"] == max(step["excess"].values())
    repair = next(c for c in g["candidates"] if c["label"] == "repair 1")
    assert repair["measured_loss"] < g["first"]["measured_loss"] / 2
    # written: the repair, or the plain-grid uniform filled into the budget where that measured lower still
    assert g["result"] in ("repaired", "data-free uniform, filled")
    assert g["measured_loss"] <= repair["measured_loss"]

    def fc1_bits(r) -> float:
        return float(np.mean([b for n, b in r.context.allocation.bits.items() if n.startswith("fc1.weight")]))

    assert fc1_bits(result) > fc1_bits(first)
    assert g["stored_bits"] <= 4.0


def test_the_data_free_allocation_is_a_measured_candidate(calib):
    """With calibration, the allocation bq-onnx makes without it is measured too, and a measured candidate no worse
    than uniform (or uniform) is what is written: the method's best answer held out, unless the fit split turned
    down the answers below it, or an alternative (data-free, floored, rounded to nearest) that measured clearly
    better replaced it (``_confirm_on_fit``)."""
    g = bq_onnx.optimize(LENET, bits=4, format="compact", calib=calib).report["guard"]
    by = {c["label"]: c for c in g["candidates"]}
    assert {"allocation", "data-free"} <= set(by)
    assert by["data-free"]["measured_loss"] != by["allocation"]["measured_loss"]  # a different model
    written = g["measured_loss"]
    assert written <= g["uniform"]["measured_loss"]
    assert written in {c["measured_loss"] for c in g["candidates"]} | {g["uniform"]["measured_loss"]}
    answers = [c for c in g["candidates"] if c["label"] not in ALTERNATIVES]
    if g["result"] not in ALTERNATIVES and written in {c["measured_loss"] for c in answers}:
        assert all(c.get("fit_loss") is not None for c in answers if c["measured_loss"] < written)


def test_without_calibration_a_worse_allocation_falls_back_to_uniform(lying_posterior):
    result = _optimize(bits=3, posterior=lying_posterior)
    g = result.report["guard"]
    assert g["data"] == "random"
    assert g["result"] in ("uniform", "uniform, filled") and not g["repairs"]
    assert result.context.allocation.method == "uniform"
    assert any("wrote uniform" in m and "--calib" in m for m in result.report["messages"])
    if g["result"] == "uniform, filled":  # the budget uniform's width leaves, spent on whole layers, measured
        assert g["measured_loss"] <= g["uniform"]["measured_loss"]
        assert g["uniform"]["stored_bits"] < g["stored_bits"] <= 3.0


def test_no_guard_skips_the_measurement(calib, lying_posterior):
    result = _optimize(bits=3, calib=calib, posterior=lying_posterior, no_guard=True)
    assert "guard" not in result.report
    assert result.context.posterior.samples == 160  # nothing held out
    fc1 = [b for name, b in result.context.allocation.bits.items() if name.startswith("fc1.weight")]
    assert min(fc1) == 0  # what the guard would have caught


def test_quality_targets_stop_optimize(calib):
    with pytest.raises(QualityError, match="--max-loss"):
        bq_onnx.optimize(LENET, bits=3, format="compact", calib=calib, max_loss=1e-9)
    with pytest.raises(QualityError, match="--min-cosine"):
        bq_onnx.optimize(LENET, bits=3, format="compact", calib=calib, min_cosine=0.99999)
    # a target is measured even where nothing is allocated (a fixed width)
    with pytest.raises(QualityError, match="--min-agreement"):
        bq_onnx.optimize(LENET, bits=2, allocator="uniform", format="compact", calib=calib, min_agreement=0.9999)
    ok = bq_onnx.optimize(LENET, bits=3, format="compact", calib=calib, max_loss=10.0, min_cosine=0.5)
    assert ok.report["guard"]["measured_loss"] <= 10.0


def test_cli_quality_target_exits_9_and_writes_nothing(tmp_path):
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "bq_onnx", "optimize", str(LENET), "--calib", str(CALIB),
                           "--bits", "3", "--format", "compact", "--max-loss", "1e-9", "-o", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == EXIT_QUALITY, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "--max-loss" in proc.stderr


def test_cli_summary_shows_the_guard(tmp_path):
    out = tmp_path / "out.onnx"
    proc = subprocess.run([sys.executable, "-m", "bq_onnx", "optimize", str(LENET), "--calib", str(CALIB),
                           "--bits", "3", "--format", "compact", "-o", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "guard: loss measured" in proc.stdout and "uniform 2-bit" in proc.stdout
    assert "held-out fidelity of logits: agreement" in proc.stdout


def test_zero_bit_blocks_are_measured_even_without_a_uniform_reference(calib):
    """Native --bits 3 with 0 bits on request: no single width of 2+ bits fits (int4 plus fp16 scales and zero
    points is over 4.6 bits; at --bits 4 too few blocks drop to 0 bits since scales are fp16 for a repair to show),
    so the 0-bit blocks are measured tensor by tensor against the others' measured/predicted ratio; the repair
    is tried and the better measured candidate written."""
    result = bq_onnx.optimize(LENET, bits=3, calib=calib, allowed_bits=ALL_WIDTHS)
    g = result.report["guard"]
    assert g["uniform"] is None and g["predicted_loss_scaled"] is None
    assert g["repairs"] and g["repairs"][0]["to_bits"] == 2
    tried = g["repairs"][0]
    # each raised tensor had blocks below 2 bits: the floors the repair set are on exactly those blocks
    floored = {n.split("[")[0] for n, b in result.context.floors.items() if b == 2}
    assert tried["raised"] and set(tried["raised"]) <= floored
    if "measured_loss" in tried:
        assert g["measured_loss"] == min(g["first"]["measured_loss"], tried["measured_loss"])


def test_data_free_inputs_whose_fp32_outputs_are_not_finite_fall_back_to_uniform(tmp_path):
    """Random inputs on which the FP32 model gives NaN (a Log of negative values) measure nothing: the guard says
    so and writes uniform, instead of comparing NaN with NaN."""
    from onnx import TensorProto, helper, numpy_helper

    from tests.conftest import make_model

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    proto = make_model([helper.make_node("Log", ["x"], ["l"]), helper.make_node("MatMul", ["l", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 64])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 32])],
                       [numpy_helper.from_array(w, "W")])
    result = bq_onnx.optimize(proto, bits=3, format="compact", bits_payload=True)
    g = result.report["guard"]
    assert g["result"] == "uniform" and "not finite" in g["why"]
    assert result.context.allocation.method == "uniform"


def test_uniform_on_plain_grids_is_a_measured_candidate(calib):
    """Uniform on grids made without the posterior is measured too: where the posterior's weighting misleads the
    grids (a small calibration set), it can beat every posterior-made candidate and the posterior's uniform."""
    g = bq_onnx.optimize(LENET, bits=4, format="compact", calib=calib).report["guard"]
    by = {c["label"]: c for c in g["candidates"]}
    assert "data-free uniform" in by
    assert by["data-free uniform"]["stored_bits"] <= 4.0
    assert by["data-free uniform"]["measured_loss"] != g["uniform"]["measured_loss"]  # other grids, same width
    # its single width leaves budget (3.5 of 4 stored bits): measured again with whole layers raised into it
    filled = by["data-free uniform, filled"]
    assert by["data-free uniform"]["stored_bits"] < filled["stored_bits"] <= 4.0
    assert filled["measured_loss"] != by["data-free uniform"]["measured_loss"]


class _FitProbe:
    """A stand-in for the guard's fit-split measure: each model's loss on the fit samples, looked up."""

    def __init__(self, losses: dict[str, float], samples: int = 24) -> None:
        from types import SimpleNamespace

        self.losses, self.measured, self.held = losses, [], SimpleNamespace(samples=samples)

    def runs(self, spent):
        self.measured.append(spent.out)
        return spent.out

    def loss(self, out) -> float:
        return self.losses[out]


def _try(label: str, loss: float):
    from bq_onnx.stages.guard import Spent, _Try

    return _Try(label, Spent(label, None, {}, None, [], None), loss, {}, None)


def _measure(probe: _FitProbe, held: int = 8):
    from types import SimpleNamespace

    return SimpleNamespace(probe=probe, held=SimpleNamespace(samples=held))


def test_a_held_out_win_the_fit_split_does_not_confirm_writes_uniform():
    """A candidate better than uniform on a few held-out samples is written only if it is no worse than uniform
    on the fit samples too (where posterior-made candidates have the in-sample advantage): else uniform, and the
    best confirmed one where there is one."""
    from bq_onnx.stages.guard import _confirm_on_fit

    uniform = _try("uniform", 1.0)
    lucky, sound, worse = _try("lucky", 0.5), _try("sound", 0.8), _try("worse", 1.2)
    probe = _FitProbe({"uniform": 1.0, "lucky": 1.5, "sound": 0.9, "worse": 0.1})
    chosen, unconfirmed = _confirm_on_fit([worse, lucky, sound], uniform, _measure(probe))
    assert chosen is sound and unconfirmed is None
    assert "worse" not in probe.measured  # worse than uniform held out: never a candidate, not measured
    assert (lucky.fit_loss, sound.fit_loss, uniform.fit_loss) == (1.5, 0.9, 1.0)
    probe = _FitProbe({"uniform": 1.0, "lucky": 1.5})
    chosen, unconfirmed = _confirm_on_fit([_try("lucky", 0.5)], _try("uniform", 1.0), _measure(probe))
    assert chosen.label == "uniform" and unconfirmed.label == "lucky"


def _paired(label: str, per_sample: list[float]):
    t = _try(label, float(np.mean(per_sample)))
    t.per_sample = np.asarray(per_sample)
    return t


def test_a_data_free_candidate_replaces_the_posteriors_only_when_clearly_better():
    """Where the posterior's best candidate (the allocation or a repair) is no worse than uniform on both splits, a
    data-free one that measured lower on the held-out samples replaces it only when its per-sample lead is over one
    standard error of the paired difference: a lead carried by one sample of eight is chance. Among data-free
    candidates (which saw neither split) the lowest loss over both splits, weighted by samples, is the best."""
    from bq_onnx.stages.guard import DATA_FREE_FILLED, DATA_FREE_UNIFORM, _clearly_better, _confirm_on_fit

    lucky_losses = [1.4, 1.2, 1.3, 1.1, 1.2, 1.3, 1.2, -3.0]  # lower mean (0.71), by one sample
    steady_losses = [0.9, 0.85, 0.92, 0.88, 0.9, 0.86, 0.91, 0.89]
    fit = {"uniform": 2.0, "allocation": 1.0, "repair 2": 1.0, "data-free": 1.1, DATA_FREE_UNIFORM: 0.95,
           DATA_FREE_FILLED: 1.0}

    def run(tries, **fit_losses):
        return _confirm_on_fit(tries, _try("uniform", 2.0), _measure(_FitProbe({**fit, **fit_losses})))[0]

    allocation, lucky = _paired("allocation", [1.0] * 8), _paired("data-free", lucky_losses)
    d = lucky.per_sample - allocation.per_sample
    assert np.mean(d) + np.std(d, ddof=1) / np.sqrt(8) > 0 and not _clearly_better(lucky, allocation)
    assert run([allocation, lucky]) is allocation
    steady = _paired(DATA_FREE_UNIFORM, steady_losses)
    assert run([_paired("allocation", [1.0] * 8), _paired("data-free", lucky_losses), steady]) is steady
    # data-free candidates ranked over both splits (8 held-out, 24 fit samples): the lucky one's held-out lead
    # (0.71 against 0.89) is outweighed by its fit loss (1.1 against 0.7)
    lucky, steady = _paired("data-free", lucky_losses), _paired(DATA_FREE_UNIFORM, steady_losses)
    assert run([lucky, steady], allocation=3.0, **{DATA_FREE_UNIFORM: 0.7}) is steady
    # an allocation the fit split does not confirm is no default: the best confirmed one is written
    lucky = _paired("data-free", lucky_losses)
    assert run([_paired("allocation", [1.0] * 8), lucky], allocation=3.0) is lucky
    # a confirmed repair is the posterior's best as the allocation is
    repair = _paired("repair 2", [1.0] * 8)
    assert run([_paired("allocation", [5.0] * 8), repair, _paired("data-free", lucky_losses)]) is repair


def test_an_alternative_that_ranks_first_but_is_not_clearly_better_hides_no_other():
    """The alternatives are ranked among those clearly better than the method's answer: one that ranks first over
    both splits but only ties the answer held out (a copy of it, as the nearest-rounded candidate can be) leaves
    the one that is clearly better to be written."""
    from bq_onnx.stages.guard import DATA_FREE_FILLED, NEAREST, _confirm_on_fit

    answer = _paired("repair 1", [1.0] * 8)
    tie = _paired(NEAREST, [1.0] * 8)  # the answer's model again: its fit loss ranks it first
    better = _paired(DATA_FREE_FILLED, [0.5, 0.45, 0.52, 0.48, 0.5, 0.47, 0.51, 0.49])
    probe = _FitProbe({"uniform": 2.0, "repair 1": 0.2, NEAREST: 0.2, DATA_FREE_FILLED: 1.5})
    chosen, _ = _confirm_on_fit([answer, tie, better], _try("uniform", 2.0), _measure(probe))
    assert chosen is better
    probe = _FitProbe({"uniform": 2.0, "repair 1": 0.2, NEAREST: 0.2})
    answer, tie = _paired("repair 1", [1.0] * 8), _paired(NEAREST, [1.0] * 8)
    assert _confirm_on_fit([answer, tie], _try("uniform", 2.0), _measure(probe))[0] is answer


def test_only_the_fit_losses_that_decide_are_measured():
    """The fit split is run for uniform, the answers up to the first one it confirms and the alternatives clearly
    better than that answer held out: a later repair and an alternative that only ties the answer are not run
    (each is a whole-model run of the fit split), and the choice is the one every fit loss gives."""
    from bq_onnx.stages.guard import DATA_FREE_FILLED, NEAREST, _confirm_on_fit

    answer, later = _paired("repair 1", [1.0] * 8), _paired("repair 2", [1.1] * 8)
    tie = _paired(NEAREST, [1.0] * 8)
    better = _paired(DATA_FREE_FILLED, [0.5, 0.45, 0.52, 0.48, 0.5, 0.47, 0.51, 0.49])
    probe = _FitProbe({"uniform": 2.0, "repair 1": 0.2, "repair 2": 0.1, NEAREST: 0.2, DATA_FREE_FILLED: 1.5})
    chosen, _ = _confirm_on_fit([later, tie, answer, better], _try("uniform", 2.0), _measure(probe))
    assert chosen is better
    assert sorted(probe.measured) == sorted(["uniform", "repair 1", DATA_FREE_FILLED])
    assert later.fit_loss is None and tie.fit_loss is None
    # an answer the fit split does not confirm: the next one is measured, and every alternative where none is
    probe = _FitProbe({"uniform": 2.0, "repair 1": 3.0, "repair 2": 3.0, NEAREST: 0.2, DATA_FREE_FILLED: 1.5})
    answers = [_paired("repair 1", [1.0] * 8), _paired("repair 2", [1.1] * 8), _paired(NEAREST, [1.0] * 8)]
    chosen, _ = _confirm_on_fit(answers, _try("uniform", 2.0), _measure(probe))
    assert chosen.label == NEAREST and sorted(probe.measured) == sorted(["uniform", "repair 1", "repair 2", NEAREST])


def test_probes_left_on_their_first_run_change_nothing(monkeypatch, tmp_path):
    """The tables' check measures every tensor on the fit split's first run and the rest only where the value
    decides something (clear of the median and the repair line by 3 standard errors it does not): the same
    measurements of every candidate and the same bytes as with every probe on every run, with fewer runs."""
    from bq_onnx.stages import guard

    path, calib = MODELS / "tiny_transformer.onnx", str(MODELS / "tiny_transformer_calib.npz")
    staged = bq_onnx.optimize(path, calib=calib)
    monkeypatch.setattr(guard, "SETTLED_ERRORS", float("inf"))  # no probe is ever settled: every run measured
    every = bq_onnx.optimize(path, calib=calib)
    a, b = staged.report["guard"], every.report["guard"]
    assert a["probes"]["first_runs_only"] > 0 and b["probes"]["first_runs_only"] == 0
    assert [(c["label"], c["measured_loss"]) for c in a["candidates"]] == \
        [(c["label"], c["measured_loss"]) for c in b["candidates"]]
    assert a["repairs"] == b["repairs"]
    staged.save(tmp_path / "a.onnx")
    every.save(tmp_path / "b.onnx")
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
