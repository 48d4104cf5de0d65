"""A small transformer encoder classifier built directly with onnx.helper (no torch), seeded weights.

Why: a MatMul-heavy model with the ops transformers export (Gather embedding, LayerNormalization, multi-head
Softmax attention, Erf GELU, residual Adds, mean pooling) for allocation, runtime and autodiff checks. Its
weights are random (seed 0) with a trained-like scale, so "accuracy" is agreement with its own FP32 output:
``tiny_transformer_data.npz`` labels are the FP32 top-1 classes.

Run from the repository root: ``python models/build_tiny_transformer.py`` (needs onnx, numpy, onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
VOCAB, TOKENS, D, HEADS, HIDDEN, LAYERS, CLASSES = 256, 16, 64, 4, 256, 2, 10


def build(seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int, scale: float | None = None) -> str:
        std = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * std).astype(np.float32), name))
        return name

    def const(name: str, value) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(op_type: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output

    heads = const("heads_shape", np.array([0, 0, HEADS, D // HEADS], np.int64))
    merge = const("merge_shape", np.array([0, 0, D], np.int64))
    scale = const("attn_scale", np.array(1 / np.sqrt(D // HEADS), np.float32))
    half, one = const("half", np.array(0.5, np.float32)), const("one", np.array(1.0, np.float32))
    rsqrt2 = const("rsqrt2", np.array(np.sqrt(0.5), np.float32))
    x = op("Add", [op("Gather", [weight("embed.weight", VOCAB, D, scale=0.5), "ids"], "emb"),
                   weight("pos.weight", TOKENS, D, scale=0.1)], "x0")
    for layer in range(LAYERS):
        p = f"layer{layer}"
        ln1 = op("LayerNormalization", [x, const(f"{p}.ln1.scale", np.ones(D, np.float32)),
                                         const(f"{p}.ln1.bias", np.zeros(D, np.float32))], f"{p}/ln1", axis=-1)

        def heads_of(name: str, perm: list[int], p: str = p, ln1: str = ln1) -> str:
            proj = op("MatMul", [ln1, weight(f"{p}.attn.{name}.weight", D, D)], f"{p}/{name}")
            return op("Transpose", [op("Reshape", [proj, heads], f"{p}/{name}4")], f"{p}/{name}h", perm=perm)

        q, k, v = heads_of("q", [0, 2, 1, 3]), heads_of("k", [0, 2, 3, 1]), heads_of("v", [0, 2, 1, 3])
        att = op("Softmax", [op("Mul", [op("MatMul", [q, k], f"{p}/scores"), scale], f"{p}/scaled")],
                 f"{p}/att", axis=-1)
        ctx = op("Reshape", [op("Transpose", [op("MatMul", [att, v], f"{p}/ctx")], f"{p}/ctxT", perm=[0, 2, 1, 3]),
                             merge], f"{p}/ctxm")
        x = op("Add", [x, op("MatMul", [ctx, weight(f"{p}.attn.o.weight", D, D)], f"{p}/o")], f"{p}/x1")
        ln2 = op("LayerNormalization", [x, const(f"{p}.ln2.scale", np.ones(D, np.float32)),
                                         const(f"{p}.ln2.bias", np.zeros(D, np.float32))], f"{p}/ln2", axis=-1)
        h = op("Add", [op("MatMul", [ln2, weight(f"{p}.mlp.fc1.weight", D, HIDDEN)], f"{p}/fc1"),
                       const(f"{p}.mlp.fc1.bias", np.zeros(HIDDEN, np.float32))], f"{p}/fc1b")
        gelu = op("Mul", [op("Mul", [h, half], f"{p}/hh"),
                          op("Add", [one, op("Erf", [op("Mul", [h, rsqrt2], f"{p}/hs")], f"{p}/erf")], f"{p}/1erf")],
                  f"{p}/gelu")
        x = op("Add", [x, op("MatMul", [gelu, weight(f"{p}.mlp.fc2.weight", HIDDEN, D)], f"{p}/fc2")], f"{p}/x2")
    pooled = op("ReduceMean", [x, const("token_axis", np.array([1], np.int64))], "pooled", keepdims=0)
    op("MatMul", [pooled, weight("classifier.weight", D, CLASSES)], "logits")
    graph = helper.make_graph(
        nodes, "tiny_transformer",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", TOKENS])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], producer_name="bq-onnx models")
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    import onnxruntime as ort

    model = build()
    path = HERE / "tiny_transformer.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    calib = rng.integers(0, VOCAB, size=(256, TOKENS), dtype=np.int64)
    test = rng.integers(0, VOCAB, size=(512, TOKENS), dtype=np.int64)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    labels = {name: session.run(None, {"ids": x})[0].argmax(1) for name, x in (("calib", calib), ("test", test))}
    np.savez(HERE / "tiny_transformer_calib.npz", ids=calib)
    np.savez(HERE / "tiny_transformer_data.npz", calib_input=calib, calib_labels=labels["calib"],
             test_input=test, test_labels=labels["test"])
    record = json.loads((HERE / "accuracy.json").read_text())
    record["tiny_transformer"] = {
        "fp32_test_accuracy": 1.0,
        "note": "random seeded weights; labels are the FP32 model's own top-1 classes",
        "parameters": int(sum(np.prod(t.dims) for t in model.graph.initializer)),
        "test_samples": len(test),
        "calib_samples": len(calib),
        "classes_in_test_labels": int(len(np.unique(labels["test"]))),
    }
    (HERE / "accuracy.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes), {record['tiny_transformer']}")


if __name__ == "__main__":
    main()
