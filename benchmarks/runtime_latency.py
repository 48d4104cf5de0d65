"""Native- and compact-format latency against FP32 in onnxruntime and OpenVINO, and how many MatMuls onnxruntime fuses.

Usage:  python -m benchmarks.runtime_latency [--width 2048] [--layers 4] [--activation gelu,relu] [--out FILE.md]

A MatMul-heavy model (``--layers`` MatMul+activation layers of ``--width`` squared, seeded weights) is generated into
``benchmarks/.cache/`` (not committed), quantized to native 4 bits (uniform) and to a mixed 3-bit allocation,
the same two in the compact format, and benchmarked with ``bq-onnx bench``'s machinery at batch 1 and 8 (fast
runtime settings). The script also saves onnxruntime's optimized graph and counts the ``MatMulNBits`` nodes its
DequantizeLinear+MatMul fusion made.
The ``ort4``/``ort3`` models are the same with ``--target onnxruntime`` (MatMulNBits written directly).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

import bq_onnx
from bq_onnx.bench import benchmark
from bq_onnx.table import render

CACHE = Path(__file__).resolve().parent / ".cache"
ACTIVATIONS = {"gelu": "Gelu", "relu": "Relu"}


def mlp(width: int, layers: int, activation: str) -> Path:
    path = CACHE / f"mlp_{layers}x{width}_{activation}.onnx"
    if path.exists():
        return path
    CACHE.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"layer{i}.weight"))
        nodes += [helper.make_node("MatMul", [x, f"layer{i}.weight"], [f"h{i}"], name=f"matmul{i}"),
                  helper.make_node(ACTIVATIONS[activation], [f"h{i}"], [f"r{i}"], name=f"act{i}")]
        x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def fused_ops(path: Path) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return dict(collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=2048)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--activation", default="gelu,relu", help="comma-separated: gelu (transformer MLP), relu")
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--out")
    args = p.parse_args(argv)
    lines = [f"# Native- and compact-format latency ({args.layers} MatMul layers of {args.width}x{args.width})", "",
             f"`python -m benchmarks.runtime_latency --width {args.width} --layers {args.layers} "
             f"--activation {args.activation}`", "",
             f"onnxruntime {ort.__version__}, OpenVINO {_openvino_version()}; fast runtime settings; "
             f"{args.iterations} timed runs; each configuration in a fresh process.", ""]
    for activation in args.activation.split(","):
        lines += _one(args, activation.strip())
    lines += ["What each format costs:", "",
              "- native (`DequantizeLinear`, opset 21): the runtime keeps the codes compressed in memory. OpenVINO "
              "runs them as compressed layers. onnxruntime fuses DequantizeLinear+MatMul into MatMulNBits, except "
              "a MatMul whose only consumer is a Relu or Clip feeding another node (its QDQ selectors' 'redundant "
              "clip' rule): the default layout (passes/fast_layout.py) writes that Relu/Clip as Max/Min, and every "
              "decode onnxruntime does not fuse as constant-foldable arithmetic (benchmarks/output_speed.py); "
              "see the ops above.",
              "- `--target onnxruntime`: MatMulNBits written directly (2/4/8-bit containers), every layer runs "
              "on compressed weights in onnxruntime; onnxruntime-only (a com.microsoft op).",
              "- compact (`bq` local functions): the smallest file (exact b-bit codes, codebooks); onnxruntime "
              "constant-folds the decode at session creation, so memory and latency are FP32's and session "
              "creation pays the decode; OpenVINO inlines the functions and folds them the same way.",
              ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


def _openvino_version() -> str:
    try:
        import openvino

        return openvino.__version__
    except ImportError:
        return "not installed"


def _one(args, activation: str) -> list[str]:
    fp32 = mlp(args.width, args.layers, activation)
    q4 = CACHE / f"{fp32.stem}.native4.onnx"
    q3 = CACHE / f"{fp32.stem}.mixed3.onnx"
    o4 = CACHE / f"{fp32.stem}.ort4.onnx"
    o3 = CACHE / f"{fp32.stem}.ort3.onnx"
    c4 = CACHE / f"{fp32.stem}.compact4.onnx"
    c3 = CACHE / f"{fp32.stem}.compact3.onnx"
    bq_onnx.optimize(fp32, bits=4, allocator="uniform").save(q4, force=True)
    bq_onnx.optimize(fp32, bits=3).save(q3, force=True)
    bq_onnx.optimize(fp32, bits=4, allocator="uniform", target="onnxruntime").save(o4, force=True)
    bq_onnx.optimize(fp32, bits=3, target="onnxruntime").save(o3, force=True)
    bq_onnx.optimize(fp32, bits=4, allocator="uniform", format="compact").save(c4, force=True)
    bq_onnx.optimize(fp32, bits=3, format="compact").save(c3, force=True)
    report = benchmark([fp32, q4, q3, c4, c3], runtimes=("onnxruntime", "openvino"), batches=(1, 8),
                       iterations=args.iterations, warmup=5)
    report["results"] += [r for r in benchmark([fp32, o4, o3], runtimes=("onnxruntime",), batches=(1, 8),
                                               iterations=args.iterations, warmup=5)["results"]
                          if Path(r["model"]).name != fp32.name]
    rows = []
    for r in report["results"]:
        if r.get("status", "ok") != "ok":
            continue
        mib = Path(r["model"]).stat().st_size / 2**20
        rows.append([Path(r["model"]).name, f"{mib:.1f}", r["runtime"], r["batch"], f"{r['latency_ms']['p50']:.3f}",
                     f"{r.get('latency_ratio') or float('nan'):.2f}", f"{r['session_create_s']:.3f}",
                     f"{r['peak_rss_mib']:.0f}"])
    table = render(["model", "file MiB", "runtime", "batch", "p50 ms", "p50 / fp32", "session s", "peak RSS MiB"],
                   rows)
    fusion = {path.name: fused_ops(path) for path in (q4, q3, o4, o3)}
    lines = [f"## MatMul + {ACTIVATIONS[activation]}", "", "```", table, "```", "",
             "Ops in onnxruntime's optimized graph (DequantizeLinear + MatMul -> MatMulNBits fusion):", ""]
    lines += [f"- {name}: {ops}" for name, ops in fusion.items()]
    lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
