"""Unrolled against by-the-body Loop gradients (bq_onnx/autodiff/vjp_control.py, vjp_loop.py): whether unrolling
loops of up to ``MAX_UNROLL`` steps is worth keeping.

The model: ``y = Loop(T: h <- tanh(h @ W1) @ W2 + h) @ Wout`` (hidden 64, batch 1, float32; two MatMuls per
step). The same model is differentiated twice: with ``T`` a constant (unrolled where ``T <= MAX_UNROLL``) and
with ``T`` fed as an input (by the body: a saved forward Loop and a reverse Loop). Per ``T``: the time to build
the gradient model, its node count (all subgraphs), and the time of one onnxruntime run (one thread, best of 5
blocks, the two forms interleaved) - ratios within one run only.

    python benchmarks/loop_gradients.py [--steps 4,16,64] [--out benchmarks/loop_gradients.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bq_onnx.autodiff.gradient import build_gradient_model
from bq_onnx.autodiff.vjp_control import MAX_UNROLL

HIDDEN = 64


def loop_model(steps: int, as_input: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    h = [1, HIDDEN]
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W1"], ["a"]), helper.make_node("Tanh", ["a"], ["t"]),
         helper.make_node("MatMul", ["t", "W2"], ["b"]), helper.make_node("Add", ["b", "h_in"], ["h_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("h_in", TensorProto.FLOAT, h)],
        [helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("h_out", TensorProto.FLOAT, h)])
    inits = [w("W1", HIDDEN, HIDDEN), w("W2", HIDDEN, HIDDEN), w("Wout", HIDDEN, 8)]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, h)]
    if as_input:
        inputs.append(helper.make_tensor_value_info("T", TensorProto.INT64, []))
    else:
        inits.append(numpy_helper.from_array(np.array(steps, np.int64), "T"))
    graph = helper.make_graph(
        [helper.make_node("Loop", ["T", "", "x"], ["hf"], body=body),
         helper.make_node("MatMul", ["hf", "Wout"], ["y"])],
        "loop", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto


def nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


def min_block(run, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        run()
    return (time.perf_counter() - start) / n * 1e3


def measure(steps: int) -> dict:
    row = {"steps": steps}
    runs = {}
    for form, as_input in (("unrolled", False), ("body", True)):
        proto = loop_model(steps, as_input)
        start = time.perf_counter()
        grad = build_gradient_model(ir.from_proto(proto), "y", ["W1", "W2", "Wout"])
        row[f"{form}_build_s"] = time.perf_counter() - start
        assert not grad.unsupported, grad.unsupported
        row[f"{form}_nodes"] = nodes(grad.model)
        row[f"{form}_loops"] = sum(1 for n in ir.traversal.RecursiveGraphIterator(grad.model.graph)
                                   if n.op_type == "Loop")
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(ir.to_proto(grad.model).SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        feeds = {"x": np.random.default_rng(1).standard_normal((1, HIDDEN)).astype(np.float32)}
        if as_input:
            feeds["T"] = np.array(steps, np.int64)
        runs[form] = (session, feeds)
        row[f"{form}_grads"] = session.run(None, feeds)[1:]
    times = {form: [] for form in runs}
    for _ in range(5):  # interleaved blocks
        for form, (session, feeds) in runs.items():
            times[form].append(min_block(lambda s=session, f=feeds: s.run(None, f), 20))
    for form in runs:
        row[f"{form}_run_ms"] = min(times[form])
    row["max_rel_diff"] = max(float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))
                              for a, b in zip(row.pop("unrolled_grads"), row.pop("body_grads")))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="4,16,64")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [measure(int(s)) for s in args.steps.split(",")]
    lines = [
        "# Loop gradients: unrolled against by the body",
        "",
        f"Produced by `python benchmarks/loop_gradients.py --steps {args.steps}` on {platform.machine()}, "
        f"onnxruntime {ort.__version__}, one thread; the unroll limit is {MAX_UNROLL} steps. Hidden {HIDDEN}, batch "
        "1, float32, two MatMuls per step; `rel diff`: the largest difference between the two forms' gradients "
        "relative to the largest gradient.",
        "",
        "| steps | unrolled nodes | body nodes (Loops) | build s unrolled / body | run ms unrolled | run ms body | "
        "body / unrolled run | rel diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['steps']} | {r['unrolled_nodes']} | {r['body_nodes']} ({r['body_loops']}) | "
            f"{r['unrolled_build_s']:.2f} / {r['body_build_s']:.2f} | {r['unrolled_run_ms']:.3f} | "
            f"{r['body_run_ms']:.3f} | {r['body_run_ms'] / r['unrolled_run_ms']:.2f}x | {r['max_rel_diff']:.1e} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
