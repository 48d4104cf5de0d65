"""Target profiles, the static validator and target legalization (``optimize(target=...)``)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import MODELS, make_model
from onnx import TensorProto, helper

from bq_onnx.api import optimize
from bq_onnx.cli import main
from bq_onnx.errors import UsageError
from bq_onnx.runtimes import get_runtime
from bq_onnx.runtimes.profiles import get_profile, profile_names
from bq_onnx.samples import random_feeds
from bq_onnx.validate import validate
from tests.written import check_result

TARGETS = ("onnxruntime", "openvino", "tensorrt", "rocm")


def dq_model(
    k: int = 128,
    n: int = 16,
    dtype: int = TensorProto.INT4,
    block: int | None = 64,
    zero_point: int | None = None,
    consumer: str = "MatMul",
    axis: int = 0,
    opset: int = 21,
) -> onnx.ModelProto:
    """codes (k, n) -> DequantizeLinear (blocked on ``axis`` unless ``block`` is None) -> ``consumer``."""
    shape = [k, n]
    codes = helper.make_tensor("codes", dtype, shape, [1] * (k * n))
    if block is None:
        sshape = [n]
        dq_attrs = {"axis": 1}
    else:
        nb = -(-shape[axis] // block)
        sshape = [nb, n] if axis == 0 else [k, nb]
        dq_attrs = {"axis": axis, "block_size": block}
    count = int(np.prod(sshape))
    inits = [codes, helper.make_tensor("scale", TensorProto.FLOAT, sshape, [0.1] * count)]
    dq_inputs = ["codes", "scale"]
    if zero_point is not None:
        inits.append(helper.make_tensor("zp", dtype, sshape, [zero_point] * count))
        dq_inputs.append("zp")
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, ["w"], name="dq", **dq_attrs)]
    if consumer == "Conv":  # (k, n) -> (n, k, 1, 1) through Transpose + Reshape, as the rewrite emits
        inits.append(helper.make_tensor("shape", TensorProto.INT64, [4], [n, k, 1, 1]))
        nodes += [
            helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
            helper.make_node("Reshape", ["wt", "shape"], ["w4"]),
            helper.make_node("Conv", ["x", "w4"], ["y"], name="conv"),
        ]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k, 4, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, 4, 4])
    else:
        nodes.append(helper.make_node(consumer, ["x", "w"], ["y"], name="mm"))
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])
    return make_model(nodes, [x], [y], inits, opset=opset)


def function_model() -> onnx.ModelProto:
    """y = bq.Twice(x): one model-local function."""
    fn = helper.make_function("bq", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
                              [helper.make_opsetid("", 21)])
    graph = helper.make_graph([helper.make_node("Twice", ["x"], ["y"], domain="bq")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("bq", 1)],
                              functions=[fn])
    model.ir_version = 10
    return model


def codes(model, target) -> set[str]:
    return {v.code for v in validate(model, target)}


def test_profiles_and_unknown_name():
    assert profile_names() == ["onnxruntime", "tensorrt", "rocm", "openvino"]
    assert get_profile("trt").name == "tensorrt" and get_profile("migraphx").name == "rocm"
    assert get_profile("tensorrt").int4_ops == {"MatMul", "Gemm"}
    with pytest.raises(UsageError, match="unknown target 'cuda'"):
        get_profile("cuda")


@pytest.mark.parametrize("target", TARGETS)
def test_clean_model_passes_everywhere(target):
    assert validate(dq_model(), target) == []


@pytest.mark.parametrize(
    ("target", "model", "code"),
    [
        ("tensorrt", dq_model(zero_point=3), "zero-point"),
        ("tensorrt", dq_model(dtype=TensorProto.UINT4, zero_point=8), "container"),
        ("tensorrt", dq_model(block=32), "block-size"),
        ("tensorrt", dq_model(k=128, n=16, consumer="Conv"), "int4-consumer"),
        ("tensorrt", dq_model(n=15), "odd-last-dim"),
        ("tensorrt", dq_model(block=None), "int4-per-axis"),
        ("tensorrt", dq_model(opset=25), "opset"),
        ("rocm", function_model(), "local-function"),
        ("openvino", function_model(), "local-function"),
        ("openvino", dq_model(dtype=TensorProto.INT2), "container"),
        ("rocm", dq_model(dtype=TensorProto.INT2), "container"),
        ("openvino", dq_model(k=96, block=64), "block-divisibility"),
        ("openvino", dq_model(n=128, block=64, axis=1), "block-axis"),
    ],
)
def test_violations_are_flagged(target, model, code):
    found = validate(model, target)
    assert code in {v.code for v in found}, found
    assert all(v.name and v.message for v in found)


def test_onnxruntime_accepts_what_others_refuse():
    for model in (dq_model(zero_point=3), dq_model(block=32), dq_model(consumer="Conv"), dq_model(n=15),
                  function_model(), dq_model(k=96, block=64)):
        assert validate(model, "onnxruntime") == []
    assert codes(dq_model(zero_point=0), "tensorrt") == set()  # zero point 0 is symmetric


def test_codebook_decode_flagged_for_tensorrt(tmp_path):
    result = optimize(MODELS / "lenet.onnx", quantizer="nf", bits=4, allocator="uniform")
    assert "codebook" in codes(result.model, "tensorrt")
    assert validate(result.model, "onnxruntime") == []


def test_legalization_refusals():
    with pytest.raises(UsageError, match="cannot read"):
        optimize(MODELS / "lenet.onnx", format="compact", target="rocm")
    with pytest.raises(UsageError, match="symmetric uniform"):
        optimize(MODELS / "lenet.onnx", quantizer="lloyd", target="tensorrt")
    with pytest.raises(UsageError, match="needs --target"):
        optimize(MODELS / "lenet.onnx", strict_size=True)


def test_tensorrt_legalization_choices():
    result = optimize(MODELS / "lenet.onnx", target="tensorrt", group_size=100, quantizer="percentile",
                      strict_size=True, bits_payload=True)  # 4 stored bits leave no room for int4's scales
    config, derived = result.context.config, result.context.derived
    assert config.quantization.quantizer == "uniform-sym" and derived.group_size == 128
    assert config.allocation.allowed_bits == (4, 8)  # 0 is opt-in
    groups = dict(derived.weight_group_size)  # Conv weights, and fc2/fc3 whose 120/84 rows fit one block of 128
    assert set(groups) == {"conv1.weight", "conv2.weight", "fc2.weight", "fc3.weight"} and set(groups.values()) == {0}
    msgs = " ".join(result.report["messages"])
    assert "uniform-sym" in msgs and "100 is not accepted" in msgs and "int8 per channel" in msgs
    assert {r["bits"] for r in result.report["layers"] if r["name"].startswith("conv")} == {8}
    assert validate(result.model, "tensorrt") == []


def test_container_messages_without_strict_size():
    result = optimize(MODELS / "lenet.onnx", target="openvino", bits=3, allocator="uniform")
    assert any("3-bit weights are stored and executed in an int4 container" in m for m in result.report["messages"])


@pytest.mark.parametrize("model", ["lenet", "tiny_transformer"])
@pytest.mark.parametrize("target", TARGETS)
def test_optimize_for_target(tmp_path, model, target):
    # TensorRT: 4 payload bits, so every int4 weight stays int4 (4 stored bits leave no room for its fp32 scales);
    # the others: 6 stored bits (int4 plus scales stores over 5)
    result = optimize(MODELS / f"{model}.onnx", target=target, bits_payload=target == "tensorrt",
                      bits=4 if target == "tensorrt" else 6)
    path = tmp_path / f"{model}.{target}.onnx"
    report = result.save(path)  # verified in onnxruntime CPU against the numpy reference
    check_result(result, path, report)
    assert validate(path, target) == []
    if target == "tensorrt" and model == "lenet":  # fc1 (400 rows) stays int4, blocked by 64, symmetric
        dqs = [n for n in onnx.load(path).graph.node if n.op_type == "DequantizeLinear"]
        blocked = [n for n in dqs if any(a.name == "block_size" and a.i == 64 for a in n.attribute)]
        assert blocked and all(len(n.input) == 2 for n in dqs)
    if target == "tensorrt" and model == "tiny_transformer":  # 64-row weights: one whole block, still int4 blocked
        proto = onnx.load(path)
        int4 = {t.name for t in proto.graph.initializer if t.data_type == TensorProto.INT4}
        dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4]
        assert len(dqs) >= 12, "every attention and MLP weight stays int4"
        assert all(any(a.name == "block_size" and a.i == 64 for a in n.attribute) for n in dqs)
    feeds = random_feeds(result.model, seed=1)
    ort_out = get_runtime("onnxruntime").session(path).run(feeds)
    assert all(np.isfinite(o).all() for o in ort_out)
    if target == "openvino":
        ov_out = get_runtime("openvino").session(path).run(feeds)
        for a, b in zip(ort_out, ov_out, strict=True):
            assert np.linalg.norm(a - b) <= 1e-4 * max(np.linalg.norm(a), 1e-12)


def test_cli_validate(tmp_path, capsys):
    good = tmp_path / "good.onnx"
    bad = tmp_path / "bad.onnx"
    onnx.save(dq_model(), good)
    onnx.save(dq_model(block=32, zero_point=3), bad)
    assert main(["validate", str(good), "--target", "tensorrt"]) == 0
    capsys.readouterr()
    assert main(["validate", str(bad), "--target", "trt", "--json"]) == 4
    out = json.loads(capsys.readouterr().out)
    assert out["target"] == "tensorrt" and not out["passed"]
    assert {v["code"] for v in out["violations"]} == {"block-size", "zero-point"}
    assert main(["validate", str(good), "--target", "nope"]) == 2


def test_cli_optimize_target(tmp_path, capsys):
    out = tmp_path / "lenet.trt.onnx"
    rc = main(["optimize", str(MODELS / "lenet.onnx"), "-o", str(out), "--target", "tensorrt", "--strict-size",
               "--bits-payload", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["settings"]["target"]["target"] == "tensorrt"
    assert main(["validate", str(out), "--target", "tensorrt", "-q"]) == 0
