"""The tables scored only at the widths the budget can reach (issue 17 item 1, :mod:`bq_onnx.stages.bracket`):
the written model must be byte for byte the one every width's tables give, at several budgets, on the
selective/0-bit and ``--allowed-bits`` paths, with several designs per width, and where the bracket binds and is
widened (a bracket of the budget's width alone)."""

from __future__ import annotations

import numpy as np
import pytest

import bq_onnx
from bq_onnx.config import OptimizeConfig
from bq_onnx.context import Context, Derived
from bq_onnx.quantizers import parallel
from bq_onnx.stages import bracket
from tests.conftest import MODELS

LENET = (MODELS / "lenet.onnx", MODELS / "lenet_calib.npz")
DIGITS = (MODELS / "digits_mlp.onnx", MODELS / "digits_mlp_calib.npz")


def _run(model, calib, tmp_path, name: str, **options) -> tuple[bytes, bq_onnx.OptimizeResult]:
    result = bq_onnx.optimize(model, calib=calib, **options)
    out = tmp_path / f"{name}.onnx"
    result.save(out, verify=False)
    return out.read_bytes(), result


def _same_as_every_width(model, calib, tmp_path, **options) -> bq_onnx.OptimizeResult:
    with bracket.every_width():
        full, full_result = _run(model, calib, tmp_path, "full", **options)
    assert full_result.context.tables.widths is None
    narrow, result = _run(model, calib, tmp_path, "narrow", **options)
    assert narrow == full, options
    assert result.context.allocation.bits == full_result.context.allocation.bits
    return result


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7])
def test_lenet_budgets_write_the_bytes_of_every_width(tmp_path, bits):
    result = _same_as_every_width(*LENET, tmp_path, bits=bits)
    widths = result.context.tables.widths
    assert widths is None or len(widths) < 7  # scored fewer widths, or widened to all of them (then equal anyway)


@pytest.mark.parametrize("options", [
    {"bits": 3}, {"bits": 4.5}, {"bits": 6},
    {"bits": 5, "format": "compact"},
    {"bits": 3, "allocator": "selective"},
    {"bits": 2, "allocator": "selective", "format": "compact"},
    {"bits": 4, "allowed_bits": (0, 2, 4, 8)},
    {"bits": 6, "allowed_bits": (2, 3, 4, 5, 6, 7, 8, 16)},
    {"bits": 5, "group_size": "auto", "format": "compact"},
    {"bits": 7, "min_bits": (("fc3*", 8),)},
    {"bits": 4, "format": "compact", "min_bits": (("fc3*", 7),)},  # a floor above the bracket
    {"bits": 3.5, "allocator": "uniform", "format": "compact", "bits_payload": True},
    {"size_mb": 0.05},
    {"bits": 4, "bits_payload": True},  # the cost is the grid's width: no container stands for another
    {"bits": 3.5, "target": "onnxruntime"},  # int2 containers
    {"bits": 5, "target": "tensorrt", "bits_payload": True},
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_digits_mlp_paths_write_the_bytes_of_every_width(tmp_path, options):
    _same_as_every_width(*DIGITS, tmp_path, **options)


@pytest.mark.parametrize("span", [0, 1])
@pytest.mark.parametrize("bits", [3, 5])
def test_a_binding_bracket_is_widened_to_the_same_bytes(tmp_path, monkeypatch, span, bits):
    """A bracket of the budget's width alone (or one each side) binds at once; widening must end where every
    width's tables do."""
    monkeypatch.setattr(bracket, "SPAN", span)
    result = _same_as_every_width(*LENET, tmp_path, bits=bits, format="compact")
    widths = result.context.tables.widths
    assert widths is None or len(widths) > 2 * span + 1  # it was widened


def test_bracketed_tables_are_deterministic_whatever_the_thread_count(tmp_path):
    before = parallel._count  # noqa: SLF001
    try:
        parallel.set_threads(1)
        one, _ = _run(*LENET, tmp_path, "one", bits=5)
        parallel.set_threads(2)
        two, _ = _run(*LENET, tmp_path, "two", bits=5)
        again, _ = _run(*LENET, tmp_path, "again", bits=5)
    finally:
        parallel.set_threads(before)
    assert one == two == again


def _ctx(**options) -> Context:
    config = OptimizeConfig().replace(**options)
    return Context(config, Derived.from_config(config), weights=[])


def test_the_bracket_holds_the_widths_around_the_budget():
    # native: 5..7 bits store in int8 containers at the cost of 8 (and 2..3 in int4 as 4): the widest stands for them
    assert bracket.bracket(None, _ctx(bits=6)) == (4, 8)
    assert bracket.bracket(None, _ctx(bits=6, format="compact")) == (4, 5, 6, 7, 8)
    assert bracket.bracket(None, _ctx(bits=4.5, format="compact")) == (2, 3, 4, 5, 6, 7)
    assert bracket.bracket(None, _ctx(bits=3, allocator="selective", format="compact")) == (0, 2, 3, 4, 5)
    assert bracket.bracket(None, _ctx(bits=6, quantizer="lloyd")) == (4, 5, 6, 7, 8)  # codebooks grow per width
    assert bracket.bracket(None, _ctx(bits=6, allocator="dp")) is None  # the exact optimum reads every width
    assert bracket.bracket(None, _ctx(bits=6, rounding="gptq")) == (4, 8)  # GPTQ prices the scored widths
    with bracket.every_width():
        assert bracket.bracket(None, _ctx(bits=6)) is None


def test_widen_and_binding():
    allowed = (0, 2, 3, 4, 5, 6, 7, 8)
    compact = _ctx(bits=5, format="compact")
    assert bracket.widen(compact, allowed, (0, 4, 5, 6, 7, 8), True, False) is None
    assert bracket.widen(compact, allowed, (0, 5, 6, 7), True, False) == (0, 3, 4, 5, 6, 7)
    assert bracket.widen(compact, allowed, (3, 4, 5), False, True) == (3, 4, 5, 6, 7)
    native = _ctx(bits=7)
    assert bracket.widen(native, allowed[1:], (8,), True, False) == (4, 8)  # past the int8 widths to int4's
    scored = {"a": (3, 4, 5, 6, 7), "b": (3, 4, 5, 6, 7)}
    exact: dict = {}
    assert bracket.binding(compact, allowed, scored, {"a": 4, "b": 6}, {}, exact) == (False, False, False)
    assert bracket.binding(compact, allowed, scored, {"a": 3, "b": 6}, {}, exact) == (True, False, False)
    assert bracket.binding(compact, allowed, scored, {"a": 4, "b": 7}, {}, exact) == (False, True, False)
    assert bracket.binding(compact, allowed, scored, {"a": 3, "b": 4}, {"a": 3}, exact) == (False, False, False)
    assert bracket.binding(compact, allowed, scored, {"a": 3, "b": 4}, {}, exact, lower=False) == (False, False,
                                                                                                   False)
    scored = {"a": (0, 4, 8)}
    assert bracket.binding(native, allowed, scored, {"a": 4}, {}, exact) == (False, False, False)
    assert bracket.binding(native, allowed, scored, {"a": 8}, {}, exact) == (False, False, False)
    # a block stored exactly ties the narrower widths of its cost, which the allocator prefers: every width
    assert bracket.binding(native, allowed, scored, {"a": 4}, {}, {"a": True}) == (False, False, True)


def test_bracketed_tables_hold_fewer_designs(tmp_path):
    """Not vacuous: at 6 bits LeNet's tables were scored at 2 widths (int4's widest and int8's), not 7."""
    _, result = _run(*LENET, tmp_path, "six", bits=6)
    tables = result.context.tables
    assert tables.widths == (4, 8)
    assert all(t.bits == (4, 8) for t in tables.blocks)
    assert np.isfinite(np.concatenate([t.loss for t in tables.blocks])).all()
