"""``--rounding auto`` (the default): GPTQ where ``--calib`` leaves enough samples for its compensation, nearest
elsewhere, and the guard measures the allocation rounded to nearest beside GPTQ's."""

from __future__ import annotations

import numpy as np
import pytest

import bq_onnx
from bq_onnx.stages.guard import DATA_FREE, NEAREST
from bq_onnx.stages.tables import AUTO_SAMPLES
from tests.conftest import MODELS

LENET = MODELS / "lenet.onnx"
CALIB = MODELS / "lenet_calib.npz"


@pytest.fixture(scope="module")
def calib() -> dict[str, np.ndarray]:
    return {"input": np.load(CALIB)["input"][:96]}


@pytest.fixture(scope="module")
def auto(calib):
    return bq_onnx.optimize(LENET, bits=3, calib=calib)


def test_auto_is_gptq_with_calibration_and_the_guard_measures_nearest_beside_it(auto):
    """72 fit samples: GPTQ. The guard's candidates include the same allocation rounded to nearest, a different
    model (other codes), and whichever is written is the rounding the report's settings name."""
    ctx = auto.context
    assert ctx.rounding_auto
    g = auto.report["guard"]
    by = {c["label"]: c for c in g["candidates"]}
    assert NEAREST in by and "allocation" in by
    assert by[NEAREST]["measured_loss"] != by["allocation"]["measured_loss"]
    assert by[NEAREST]["stored_bits"] == pytest.approx(by["allocation"]["stored_bits"], abs=1e-9)
    written = ctx.config.quantization.rounding
    # the data-free candidates are rounded to nearest, as bq-onnx rounds without --calib
    assert written == ("nearest" if g["result"] in (NEAREST, *DATA_FREE) else "gptq")
    assert auto.report["settings"]["quantization"]["rounding"] == written


def test_auto_codes_are_gptqs_unless_the_guard_chose_nearest(auto, calib):
    """The written codes equal those of an explicit ``--rounding gptq`` run (or ``nearest``, where the guard
    chose it), and differ from the other rounding's on at least one weight."""
    written = auto.context.config.quantization.rounding
    other = "nearest" if written == "gptq" else "gptq"

    def codes(result) -> dict[str, bytes]:
        return {name: np.asarray(q.dequantize()).tobytes() for name, q in result.context.quantized.items()}

    same = bq_onnx.optimize(LENET, bits=3, calib=calib, rounding=written, no_guard=True)
    differ = bq_onnx.optimize(LENET, bits=3, calib=calib, rounding=other, no_guard=True)
    if auto.report["guard"]["result"] in ("kept", NEAREST):  # the first allocation, not a repair or a fallback
        assert codes(auto) == codes(same)
    assert codes(auto) != codes(differ)


def test_auto_stays_nearest_with_few_samples_and_says_why(calib):
    n = AUTO_SAMPLES  # the guard holds a quarter out: fewer than AUTO_SAMPLES are left
    result = bq_onnx.optimize(LENET, bits=3, calib={"input": calib["input"][:n]})
    assert result.context.config.quantization.rounding == "nearest" and not result.context.rounding_auto
    assert any(m.startswith("--rounding auto: nearest") for m in result.context.messages)
    assert NEAREST not in {c["label"] for c in result.report["guard"]["candidates"]}


def test_auto_without_calibration_is_nearest_and_an_explicit_gptq_is_not_second_guessed(calib):
    free = bq_onnx.optimize(LENET, bits=3)
    assert free.context.config.quantization.rounding == "nearest"
    assert not any("--rounding" in m for m in free.context.messages)
    explicit = bq_onnx.optimize(LENET, bits=3, calib=calib, rounding="gptq")
    assert not explicit.context.rounding_auto
    assert NEAREST not in {c["label"] for c in explicit.report["guard"]["candidates"]}


def test_no_nearest_candidate_where_no_weight_was_gptq_rounded():
    """Without any layer-input moments every code is nearest's already: the candidate would be a copy of an
    answer standing in the alternatives' ranking for a better alternative, so none is made (nothing spent)."""
    from types import SimpleNamespace

    from bq_onnx.stages.guard import _nearest

    def spend(method):
        raise AssertionError("nothing is spent")

    assert _nearest(SimpleNamespace(moments={}, config=None), spend, measure=None) is None


def test_auto_notes_name_the_default_not_a_flag_the_user_never_gave(auto):
    """Under the default the GPTQ notes say so; an explicit ``--rounding gptq`` keeps its flag's name."""
    notes = auto.report["messages"]
    assert any(m.startswith("GPTQ rounding (the default, --rounding auto): rounding chosen by measurement")
               for m in notes), notes
    assert not any(m.startswith("--rounding gptq") for m in notes), notes
