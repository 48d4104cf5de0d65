"""Which activations between layers stop onnxruntime from fusing DequantizeLinear + MatMul into MatMulNBits.

Usage:  python -m benchmarks.ort_fusion [--width 256] [--layers 3] [--out benchmarks/ort_fusion.md]

For each activation, a seeded MLP (``--layers`` MatMul + activation layers of ``--width`` squared) is written to a
temporary folder, quantized to the native format (4 bits, uniform), and the ops of onnxruntime's optimized graph
are counted: every layer fused shows as ``MatMulNBits``, a layer left over as ``DequantizeLinear`` + ``MatMul``
(the weight dequantized on every run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from benchmarks.runtime_latency import fused_ops
from bq_onnx.table import render

ACTIVATIONS = ("Relu", "Clip", "Gelu", "LeakyRelu", "Tanh", "Sigmoid", "Max", "Identity")


def mlp(path: Path, activation: str, width: int, layers: int) -> None:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.zeros((), np.float32), "zero")]
    nodes, x = [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        extra = ["zero"] if activation in ("Clip", "Max") else []  # Clip(min=0) and Max(x, 0): Relu's other forms
        nodes.append(helper.make_node(activation, [f"h{i}", *extra], [f"a{i}"]))
        x = f"a{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["b", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for activation in ACTIVATIONS:
            fp32 = Path(tmp) / f"{activation}.onnx"
            q4 = Path(tmp) / f"{activation}.native4.onnx"
            mlp(fp32, activation, args.width, args.layers)
            bq_onnx.optimize(fp32, bits=4, allocator="uniform").save(q4)
            ops = fused_ops(q4)
            fused = ops.get("MatMulNBits", 0)
            rows.append([activation, f"{fused} / {args.layers}", ops.get("DequantizeLinear", 0)])
    table = render(["activation", "layers fused", "DequantizeLinear left"], rows)
    lines = [f"# onnxruntime {ort.__version__}: DequantizeLinear + MatMul -> MatMulNBits fusion by activation", "",
             f"`python -m benchmarks.ort_fusion --width {args.width} --layers {args.layers}`", "",
             f"{args.layers} MatMul layers ({args.width}x{args.width}), each with the activation; 4-bit native.",
             "", "```", table, "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
