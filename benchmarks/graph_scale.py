"""Time and memory against graph size: every path that walks a graph must be linear in its nodes.

Usage:  python -m benchmarks.graph_scale [--nodes 100000,1000000] [--repeat 3] [--out benchmarks/graph_scale.md]
        python -m benchmarks.graph_scale --nodes 20000,40000 --steps "optimize --no-verify" --profile

The graph (:func:`chain`) is one ``MatMul`` with a 64x64 weight (something to quantize) followed by a chain of
``Add`` (a 64-element weight each: below ``--min-size``, so a weight the finder must look at and skip) and
``Relu`` nodes, ``nodes`` in all. Each step runs in its own subprocess (``ru_maxrss`` is its peak resident
memory): loading and validation (:func:`bq_onnx.model_io.load_model`), ``bq-onnx inspect``, ``bq-onnx validate
--target onnxruntime`` and ``bq-onnx optimize --no-verify`` (verification runs the graph in onnxruntime, whose
own session build is not ours to measure here). The report gives seconds and MiB per step and size, and the
ratio of the largest size to the smallest against the node ratio: linear means a CPU-time ratio near the node
ratio (the issue's bar: 1e6 nodes in at most 10x the time of 1e5).

``--profile`` runs each step under cProfile instead (times are then the profiler's, not the report's) and
prints, per step, the functions whose own time grows faster than the node count between the smallest and the
largest size: where a superlinear cost hides.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent

STEPS = {
    "load + validate": ["python", "-c", "import sys; from bq_onnx.model_io import load_model; load_model(sys.argv[1])"],
    "inspect": ["bq", "inspect", "{model}", "--json"],
    "validate": ["bq", "validate", "{model}", "--target", "onnxruntime", "--json"],
    "optimize --no-verify": ["bq", "optimize", "{model}", "-o", "{out}", "--no-verify", "-q", "--bits", "8",
                             "--allocator", "uniform", "--force"],
    "optimize (verify)": ["bq", "optimize", "{model}", "-o", "{out}", "-q", "--bits", "8", "--allocator", "uniform",
                          "--force"],
}
#: Steps run unless ``--steps`` names others; verification builds onnxruntime sessions of the whole graph.
DEFAULT_STEPS = ["load + validate", "inspect", "validate", "optimize --no-verify"]


def chain(nodes: int) -> onnx.ModelProto:
    """MatMul(x, W[64, 64]) then ``nodes - 1`` alternating Add(h, b_i[64]) / Relu nodes (shapes [n, 64]); the
    64-element biases are below the default ``--min-size``: weights the finder looks at and skips."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "W")]
    graph_nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"], name="mm")]
    bias = rng.standard_normal(64).astype(np.float32)
    for i in range(1, nodes):
        src, dst = f"h{i - 1}", f"h{i}" if i < nodes - 1 else "y"
        if i % 2:
            inits.append(numpy_helper.from_array(bias, f"b{i}"))
            graph_nodes.append(helper.make_node("Add", [src, f"b{i}"], [dst], name=f"add{i}"))
        else:
            graph_nodes.append(helper.make_node("Relu", [src], [dst], name=f"relu{i}"))
    graph = helper.make_graph(graph_nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model


PROFILED = ("import cProfile, runpy, sys; out, mode, target = sys.argv[1:4]; sys.argv = [target, *sys.argv[4:]]; "
            "prof = cProfile.Profile(); run = (lambda: runpy.run_module(target, run_name='__main__', "
            "alter_sys=True)) if mode == '-m' else (lambda: exec(target, {'__name__': '__main__'}))\n"
            "try:\n    prof.runcall(run)\nexcept SystemExit:\n    pass\nprof.dump_stats(out)")


def measure(step: str, model: Path, out: Path, profile: Path | None = None) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak MiB, exit code) of one step in a fresh subprocess. CPU time (user +
    system) is what the step costs; wall time also counts waiting for a core on a shared machine. With
    ``profile``, the step runs under cProfile and its statistics go to that file."""
    argv = [a.format(model=model, out=out) for a in STEPS[step]]
    bq = argv[0] == "bq"
    argv = [sys.executable, "-m", "bq_onnx", *argv[1:]] if bq else [sys.executable, *argv[1:], str(model)]
    if profile is not None:
        argv = [sys.executable, "-c", PROFILED, str(profile), *argv[1:]]
    probe = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
             "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
             "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
             "print(json.dumps([time.perf_counter() - t, u.ru_utime + u.ru_stime, "
             "u.ru_maxrss, r.returncode, r.stderr.decode()[-300:]]))")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, check=True)
    seconds, cpu, maxrss, code, err = json.loads(done.stdout)
    if code != 0:
        print(f"  {step}: exit {code}: {err.strip()}", file=sys.stderr)
    return seconds, cpu, maxrss / 1024, code


def superlinear(small: Path, large: Path, node_ratio: float, top: int = 25) -> list[str]:
    """Functions whose own (not cumulative) time grows faster than ``node_ratio`` from the ``small`` profile
    to the ``large`` one, costliest first: each line says own seconds at both sizes, their ratio and calls."""
    a, b = pstats.Stats(str(small)).stats, pstats.Stats(str(large)).stats  # type: ignore[attr-defined]
    rows = []
    for func, (_, calls, own, _, _) in b.items():
        before = a.get(func, (0, 0, 0.0, 0, None))[2]
        if own > 0.05 and own > 1.5 * node_ratio * max(before, 1e-3):
            rows.append((own, before, calls, func))
    rows.sort(reverse=True)
    return [f"{own:8.2f} s (was {before:.2f} s, x{own / max(before, 1e-3):.0f}) {calls:>9} calls  "
            f"{Path(func[0]).name}:{func[1]} {func[2]}" for own, before, calls, func in rows[:top]]


def top_own(profile: Path, top: int = 15) -> list[str]:
    """The ``top`` functions by own time in one profile."""
    stats = pstats.Stats(str(profile)).stats  # type: ignore[attr-defined]
    rows = sorted(((own, calls, func) for func, (_, calls, own, _, _) in stats.items()), reverse=True)[:top]
    return [f"{own:8.2f} s {calls:>9} calls  {Path(func[0]).name}:{func[1]} {func[2]}" for own, calls, func in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nodes", default="100000,1000000", help="comma-separated graph sizes (nodes)")
    p.add_argument("--steps", default=",".join(DEFAULT_STEPS), help="comma-separated steps to run, of: "
                   + ", ".join(STEPS))
    p.add_argument("--out", help="write the markdown report here")
    p.add_argument("--repeat", type=int, default=1, help="measure every size this many times, sizes interleaved, "
                   "and report each step's run with the least CPU time (a shared machine inflates CPU time too)")
    p.add_argument("--profile", action="store_true", help="run each step under cProfile and print the functions "
                   "whose own time grows faster than the node count (no report)")
    args = p.parse_args(argv)
    sizes = [int(float(s)) for s in args.nodes.split(",")]
    steps = args.steps.split(",")
    rows: dict[str, dict[int, tuple[float, float, float, int]]] = {s: {} for s in steps}
    with tempfile.TemporaryDirectory(prefix="bq-graph-scale-") as tmp:
        for rep in range(args.repeat):
            for n in sizes:  # sizes interleaved across repeats: a busy spell of the machine hits both
                model = Path(tmp) / f"chain{n}.onnx"
                if not model.exists():
                    t0 = time.perf_counter()
                    onnx.save(chain(n), str(model))
                    print(f"{n} nodes: built in {time.perf_counter() - t0:.1f} s, "
                          f"{model.stat().st_size / 2**20:.1f} MiB", file=sys.stderr)
                for step in steps:
                    prof = Path(tmp) / f"{steps.index(step)}-{n}.prof" if args.profile else None
                    got = measure(step, model, Path(tmp) / "out.onnx", prof)
                    if step not in rows or n not in rows[step] or got[1] < rows[step][n][1]:
                        rows[step][n] = got  # the least CPU time of the repeats: the least disturbed
                    s, cpu, mib, code = got
                    print(f"  {step} ({n:,} nodes, run {rep + 1}): {s:.2f} s, CPU {cpu:.2f} s, {mib:.0f} MiB, "
                          f"exit {code}", file=sys.stderr)
                if rep == args.repeat - 1:
                    model.unlink()
        if args.profile:
            for i, step in enumerate(steps):
                lo_prof, hi_prof = Path(tmp) / f"{i}-{sizes[0]}.prof", Path(tmp) / f"{i}-{sizes[-1]}.prof"
                print(f"\n## {step}: own time at {sizes[-1]:,} nodes, top functions")
                print("\n".join(top_own(hi_prof)))
                print(f"\n## {step}: own time growing faster than the nodes ({sizes[0]:,} -> {sizes[-1]:,})")
                print("\n".join(superlinear(lo_prof, hi_prof, sizes[-1] / sizes[0])) or "(none)")
            return 0
    lo, hi = sizes[0], sizes[-1]
    lines = ["# Time and memory against graph size", "",
             f"`python -m benchmarks.graph_scale --nodes {args.nodes}"
             + (f' --steps "{args.steps}"' if steps != DEFAULT_STEPS else "")
             + (f" --repeat {args.repeat}" if args.repeat != 1 else "")
             + "` (`benchmarks/graph_scale.py`: one MatMul, "
             "then a chain of Add (64-element weights) and Relu nodes; each step a fresh subprocess: wall seconds, "
             "CPU seconds (user + system: what the step costs, whatever else the machine runs) and peak resident "
             "MiB, interpreter start and imports included"
             + (f"; each size measured {args.repeat} times, sizes interleaved, each cell the run with the least CPU "
                "time" if args.repeat != 1 else "") + "). The ratios are the largest size's CPU time and memory "
             f"over the smallest's, for {hi / lo:g}x the nodes.", "",
             "| step | " + " | ".join(f"{n:,} nodes: wall s / CPU s / MiB" for n in sizes)
             + " | CPU ratio | memory ratio |",
             "|---|" + "---|" * (len(sizes) + 2)]
    for step in steps:
        cells = [f"{rows[step][n][0]:.1f} / {rows[step][n][1]:.1f} / {rows[step][n][2]:.0f}"
                 + ("" if rows[step][n][3] == 0 else f" (exit {rows[step][n][3]})") for n in sizes]
        ratio_t = rows[step][hi][1] / max(rows[step][lo][1], 1e-9)
        ratio_m = rows[step][hi][2] / max(rows[step][lo][2], 1e-9)
        lines.append(f"| {step} | " + " | ".join(cells) + f" | {ratio_t:.1f} | {ratio_m:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
