"""Double-quantized scales of the compact format (issues 15, 16): a uint8 code per block times an fp16 super scale
per output channel, decoded as their float32 product by numpy, onnxruntime and OpenVINO alike, and priced as stored.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import bq_onnx
from bq_onnx.qtensor import QuantizedPieces, QuantizedTensor, decode_scales, super_scales, to_fp16_exact
from bq_onnx.quantizers import quantization_error, quantize_uniform
from bq_onnx.runtimes import get_runtime
from bq_onnx.sizes import block_metadata_bits
from tests import passkit
from tests.conftest import matmul_readout
from tests.test_stage_distill import MODEL as DISTILL_MODEL
from tests.test_stage_distill import X as DISTILL_X


def _weight(k: int, n: int, seed: int = 0) -> np.ndarray:
    """Gaussian columns of very different magnitudes (what one super scale per column must cover)."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((k, n)) * np.geomspace(1e-3, 30.0, n)).astype(np.float32)


@pytest.mark.parametrize("bits", range(1, 9))
def test_numpy_decode_equals_the_float64_reference(bits):
    k, g = 70, 16  # ragged last block (70 = 4*16 + 6)
    qt = quantize_uniform(_weight(k, 9, bits), bits, g, double_scales=True)
    assert qt.double_scales and qt.scale_code.shape == (5, 9) and qt.super_scale.shape == (9,)
    np.testing.assert_array_equal(qt.super_scale, to_fp16_exact(qt.super_scale))
    scale64 = qt.scale_code.astype(np.float64) * qt.super_scale.astype(np.float64)
    np.testing.assert_array_equal(qt.scale.astype(np.float64), scale64)  # the float32 product is exact
    zp = np.repeat(qt.zero_point.astype(np.float64), g, axis=0)[:k]
    ref = (qt.codes.astype(np.float64) - zp) * np.repeat(scale64, g, axis=0)[:k]
    got = qt.dequantize().astype(np.float64)
    assert np.all(np.abs(got - ref) <= np.abs(ref) * 2.0**-24)  # one float32 rounding of the last product


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_the_range_search_loses_little_to_fp16_scales(bits):
    w = _weight(256, 32, 10 + bits)
    plain, double = quantize_uniform(w, bits, 32), quantize_uniform(w, bits, 32, double_scales=True)
    assert not plain.double_scales
    assert quantization_error(w, double) <= 1.01 * quantization_error(w, plain)
    # each column's largest min/max scale fits its grid (the super scale is rounded up, not down)
    assert (super_scales(plain.scale) * 255 >= plain.scale.max(axis=0)).all()


def _special_blocks() -> np.ndarray:
    w = _weight(64, 5, 3)  # 4 blocks of 16 rows per column
    w[0:16, 0] = 0.0  # an all-zero block beside large ones
    w[16:32, 0] = 0.7  # constant blocks, positive and negative
    w[32:48, 0] = -0.0123
    w[:, 1] = 0.0  # an all-zero column: super scale 0, every code 0
    w[:, 2] = 5.0  # a constant column
    w[48:64, 3] = 1e-4  # a tiny constant block in a large column
    return w


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_constant_and_zero_blocks_survive(bits):
    w = _special_blocks()
    qt = quantize_uniform(w, bits, 16, double_scales=True)
    d = qt.dequantize()
    assert (d[0:16, 0] == 0).all() and (d[:, 1] == 0).all()
    assert qt.super_scale[1] == 0 and (qt.scale_code[:, 1] == 0).all()
    for rows, col in ((slice(16, 32), 0), (slice(32, 48), 0), (slice(None), 2)):
        c = w[rows, col][0]  # within fp16-like precision, or half a step of the column's code grid (1 bit: j = 1)
        bound = max(2e-3 * abs(c), 0.5 * float(qt.super_scale[col]) * (1 + 1e-6))
        assert np.abs(d[rows, col] - c).max() <= bound, (rows, col)
    # a tiny block in a large column: the code grid is coarse for it (the price of one super scale per column),
    # yet it is never worse than decoding it to 0, nor than half a grid step
    err = np.abs(d[48:64, 3] - np.float32(1e-4)).max()
    assert err <= min(np.float32(1e-4), 0.5 * float(qt.super_scale[3])) * (1 + 1e-6)


def _readout(tmp_path, w, runtime, **options):
    result = bq_onnx.optimize(matmul_readout(w), format="compact", min_size=1, **options)
    path = tmp_path / f"{runtime}.onnx"
    report = result.save(path, force=True)
    decoded = get_runtime(runtime).session(path, exact=True).run({"x": np.eye(w.shape[0], dtype=np.float32)})[0]
    return result.context.quantized["W"], decoded, report, path


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_runtimes_decode_constant_and_zero_blocks_exactly(tmp_path, runtime):
    w = _special_blocks()
    qt, decoded, _, _ = _readout(tmp_path, w, runtime, bits=3, group_size=16, allocator="uniform")
    assert qt.double_scales
    np.testing.assert_array_equal(decoded, qt.dequantize())
    assert (decoded[0:16, 0] == 0).all() and (decoded[:, 1] == 0).all()


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_mixed_widths_in_pieces_decode_exactly(tmp_path, runtime):
    """Output-channel slices at different widths, each piece with its own super scales, in both runtimes."""
    w = _weight(256, 128, 5)  # large enough that the decode functions' constants leave room for wider pieces
    x = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    q, decoded, report, _ = _readout(tmp_path, w, runtime, bits=4, group_size=32, granularity="rows:8",
                                     calib={"x": x}, no_guard=True)
    assert isinstance(q, QuantizedPieces)
    widths = {p.bits for _, _, p in q.pieces}
    assert len(widths) > 1 and all(p.double_scales for _, _, p in q.pieces if p.bits > 0)
    np.testing.assert_array_equal(decoded, q.dequantize())
    assert any("Dq" in f for f in _functions(tmp_path / f"{runtime}.onnx"))


def _functions(path) -> list[str]:
    return [f.name for f in onnx.load(str(path)).functions]


def test_size_accounting_equals_the_written_bytes(tmp_path):
    k, n, g, bits = 128, 16, 32, 4  # 4 blocks per column; 4 * 16 zero points of 4 bits = 32 whole bytes
    w = _weight(k, n, 7)
    qt, _, report, path = _readout(tmp_path, w, "onnxruntime", bits=bits, group_size=g, allocator="uniform")
    stored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
    code, sup, zero = (stored[f"W.bq_{s}"] for s in ("scale_code", "super_scale", "zero"))
    assert code.dtype == np.uint8 and code.shape == (4, n) and sup.dtype == np.float16 and sup.shape == (n,)
    np.testing.assert_array_equal(decode_scales(code, sup.astype(np.float32)), qt.scale)
    (layer,) = report["layers"]
    assert layer["metadata_bits"] == 8 * (code.nbytes + sup.nbytes + zero.nbytes) == 8 * 4 * n + 16 * n + 4 * 4 * n
    assert layer["stored_bytes"] == sum(a.nbytes for name, a in stored.items() if name.startswith("W.bq_"))
    fp16 = dataclass_without_double(qt)
    assert block_metadata_bits(fp16, "compact") - layer["metadata_bits"] == 8 * 4 * n - 16 * n


def dataclass_without_double(qt: QuantizedTensor) -> QuantizedTensor:
    """The same tensor with its scales stored as fp16 (what ``--scales fp16`` prices)."""
    import dataclasses

    return dataclasses.replace(qt, scale=to_fp16_exact(qt.scale), scale_code=None, super_scale=None)


def test_scales_fp16_and_few_blocks_keep_one_fp16_scale_per_block(tmp_path):
    w = _weight(128, 8, 2)
    qt, decoded, _, path = _readout(tmp_path, w, "onnxruntime", bits=4, group_size=32, allocator="uniform",
                                    scales="fp16")
    assert not qt.double_scales and not any("Dq" in f for f in _functions(path))
    np.testing.assert_array_equal(decoded, qt.dequantize())
    qt, _, _, _ = _readout(tmp_path, w[:64], "onnxruntime", bits=4, group_size=32, allocator="uniform")
    assert not qt.double_scales  # 2 blocks per column: 16 + 2 * 8 bits would not be fewer than 2 * 16
    qt, _, _, _ = _readout(tmp_path, w[:96], "onnxruntime", bits=4, group_size=32, allocator="uniform")
    assert qt.double_scales


def test_the_quantized_form_checks_its_scale_codes():
    qt = quantize_uniform(_weight(64, 4), 3, 16, double_scales=True)
    with pytest.raises(ValueError, match="scale must equal"):
        QuantizedTensor("uniform", 3, qt.shape, 16, codes=qt.codes, scale=qt.scale * 1.5, zero_point=qt.zero_point,
                        scale_code=qt.scale_code, super_scale=qt.super_scale)
    with pytest.raises(ValueError, match="go together"):
        QuantizedTensor("uniform", 3, qt.shape, 16, codes=qt.codes, scale=qt.scale, zero_point=qt.zero_point,
                        scale_code=qt.scale_code)
    moved = qt.with_scale(qt.scale * 1.01)  # back on the grid of the same super scales
    np.testing.assert_array_equal(moved.super_scale, qt.super_scale)
    np.testing.assert_array_equal(moved.scale, decode_scales(moved.scale_code, qt.super_scale))


def test_distillation_keeps_tuned_scales_on_the_code_grid():
    model, ctx = passkit.quantized_model(DISTILL_MODEL, bits=2, group_size=4, min_size=64, format="compact")
    before = copy.deepcopy(passkit.quantized(ctx))
    assert all(q.double_scales for q in before.values())
    passkit.distill(model, ctx, {"x": DISTILL_X}, steps=8, lr=0.01, batch_size=16)
    after = passkit.quantized(ctx)
    for name, q in after.items():
        np.testing.assert_array_equal(q.codes, before[name].codes)
        np.testing.assert_array_equal(q.super_scale, before[name].super_scale)
        np.testing.assert_array_equal(q.scale, decode_scales(q.scale_code, q.super_scale))
    assert any(not np.array_equal(after[n].scale_code, before[n].scale_code) for n in after)
    report = passkit.distillation(ctx)
    assert report["kl_after"] < report["kl_before"]
