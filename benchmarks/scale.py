"""Memory and time at scale: peak resident memory of ``bq-onnx optimize`` on a model with 2.5 GiB of fp32
weights in external data, and how time grows with parameters and calibration samples.

Usage:  python -m benchmarks.scale [--sizes 0.25,0.5,1,2.5] [--samples 64,256,1024] [--out benchmarks/scale.md]
        [--keep] [--calib-size 0.125] [--big-calib [--big-calib-size 1] [--big-calib-samples 64]] [--calib-only]
        python -m benchmarks.scale --single-tensor-gib 8 [--single-options "--allocator uniform"]
        [--out benchmarks/scale_single_tensor.md]

Models are generated into ``benchmarks/.cache/`` (git-ignored; deleted after the run unless ``--keep``): a stack
of transformer-MLP blocks (d_model 2048, d_ff 8192; up-projection ``MatMul`` with a ``(2048, 8192)`` weight,
``Relu``, down-projection ``Gemm(transB=1)`` with a PyTorch-Linear-shaped ``(2048, 8192)`` weight and a bias),
seeded He-initialized weights, 128 MiB per block. The generator writes one weight at a time to the external
data file, so it never holds more than one layer.

Each ``bq-onnx optimize`` runs in its own subprocess (default options: greedy allocation at 4 bits, native
format, verification on); peak memory is the child's ``ru_maxrss`` (the kernel's high-water mark of resident
memory, file-backed pages included) and is checked against the bound ``1.5 x model size + 1 GiB``. The run at
the largest size has ``BQ_ONNX_MEMTRACE=1`` so the report shows memory per pipeline step.

Calibration-sample scaling is measured on the ``--calib-size`` model (``--calib``, laplace posterior, with
``--allocator uniform``: the closed-form tables cost the same for any sample count and would hide the slope);
each run is traced, and the posterior step's own time (``find weights`` to ``posterior`` in the
trace) is reported beside the wall time. ``--big-calib`` adds one ``--calib`` run with default options on the
``--big-calib-size`` model. ``--calib-only`` skips the size series (about 35 minutes) and, with ``--out`` naming
an existing report, replaces only the part below its calibration marker.

``--single-tensor-gib`` measures instead one model holding a single fp32 weight of that size (``MatMul`` with a
``(32768, N)`` weight of seeded normal data: real values, not a sparse file of zeros that quantizes to a
degenerate code), traced, against the same bound: streaming must hold for any weight size, not only for many
small ones.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

CACHE = Path(__file__).resolve().parent / ".cache" / "scale"
D_MODEL, D_FF = 2048, 8192
BLOCK_BYTES = 2 * D_MODEL * D_FF * 4
GIB = 2**30
ALIGN = 4096  # page-aligned offsets: runtimes may memory-map aligned external tensors


def _external(name: str, shape: tuple[int, ...], location: str, offset: int, length: int) -> TensorProto:
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return t


def generate(blocks: int, seed: int = 0) -> Path:
    """``blocks`` MLP blocks (128 MiB of fp32 weights each) into the cache; reused when already there."""
    folder = CACHE / f"mlp{blocks}"
    path = folder / "model.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    data_name = "model.onnx.data"
    nodes, inits = [], []
    x = "x"
    with open(folder / data_name, "wb") as data:
        for i in range(blocks):
            rng = np.random.default_rng([seed, i])  # per block: a bigger model extends a smaller one
            for name, shape, fan_in in ((f"blocks.{i}.up.weight", (D_MODEL, D_FF), D_MODEL),
                                        (f"blocks.{i}.down.weight", (D_MODEL, D_FF), D_FF)):
                w = rng.standard_normal(shape, dtype=np.float32)
                w *= np.float32(np.sqrt(2.0 / fan_in) if "up" in name else np.sqrt(1.0 / fan_in))
                pad = -data.tell() % ALIGN
                data.write(b"\0" * pad)
                offset = data.tell()
                w.tofile(data)
                inits.append(_external(name, shape, data_name, offset, w.nbytes))
                del w
            bias = helper.make_tensor(f"blocks.{i}.down.bias", TensorProto.FLOAT, [D_MODEL],
                                      (0.01 * rng.standard_normal(D_MODEL)).astype(np.float32).tobytes(), raw=True)
            inits.append(bias)
            nodes += [
                helper.make_node("MatMul", [x, f"blocks.{i}.up.weight"], [f"h{i}"], name=f"blocks.{i}.up"),
                helper.make_node("Relu", [f"h{i}"], [f"a{i}"], name=f"blocks.{i}.act"),
                helper.make_node("Gemm", [f"a{i}", f"blocks.{i}.down.weight", f"blocks.{i}.down.bias"], [f"y{i}"],
                                 name=f"blocks.{i}.down", transB=1),
            ]
            x = f"y{i}"
    graph = helper.make_graph(nodes, "scale_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", D_MODEL])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", D_MODEL])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    tmp = folder / "model.onnx.tmp"
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path


SINGLE_ROWS = 32768


def generate_single(gib: float, seed: int = 0) -> tuple[Path, int]:
    """One ``MatMul`` with a single ``(32768, N)`` fp32 weight of ``gib`` GiB, written 64 rows at a time."""
    cols = max(1, round(gib * GIB / (4 * SINGLE_ROWS)))
    folder = CACHE / f"single{SINGLE_ROWS}x{cols}"
    path = folder / "model.onnx"
    if path.exists():
        return path, SINGLE_ROWS * cols
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    scale = np.float32(np.sqrt(1.0 / SINGLE_ROWS))
    with open(folder / "model.onnx.data", "wb") as data:
        for _ in range(0, SINGLE_ROWS, 64):
            (rng.standard_normal((64, cols), dtype=np.float32) * scale).tofile(data)
    weight = _external("weight", (SINGLE_ROWS, cols), "model.onnx.data", 0, SINGLE_ROWS * cols * 4)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "weight"], ["y"], name="proj")], "single_tensor",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", SINGLE_ROWS])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", cols])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    tmp = folder / "model.onnx.tmp"
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    return path, SINGLE_ROWS * cols


def single_tensor(args) -> list[str]:
    """``bq-onnx optimize`` of one model holding a single weight of ``--single-tensor-gib``, traced."""
    model, params = generate_single(args.single_tensor_gib)
    extra = args.single_options.split()
    model_bytes = params * 4
    result = run_optimize(model, extra, trace=True)
    options = " ".join(extra) or "default"
    lines = ["# Scale: one fp32 weight of any size", "",
             f"Command: `python -m benchmarks.scale --single-tensor-gib {args.single_tensor_gib:g}"
             + (f' --single-options "{args.single_options}"' if extra else "") + "`", "",
             f"Machine: {os.cpu_count()} cores, {_total_memory() / GIB:.0f} GiB RAM; numpy {np.__version__}, "
             f"onnx {onnx.__version__}; load average before the run {os.getloadavg()[0]:.1f}.", "",
             f"Model: one MatMul with a single ({SINGLE_ROWS}, {params // SINGLE_ROWS}) fp32 weight (seeded normal "
             "data) in external data. Peak = `ru_maxrss` of the optimize process (file-backed pages included); "
             "bound = 1.5 x model size + 1 GiB.", "",
             "| weights (GiB) | parameters | options | wall (s) | peak RSS (GiB) | bound (GiB) | within | exit "
             "| CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|",
             f"{_row(model_bytes, params, options, result, 1.5 * model_bytes + GIB)} {result['cpu']:.1f} |", "",
             "Memory per step (`BQ_ONNX_MEMTRACE=1`, MiB):", "", "```", *result["trace"], "```", ""]
    if result["rc"] != 0:
        print(result["output"][-2000:], file=sys.stderr)
    return lines


def calibration(folder: Path, samples: int, seed: int = 1) -> Path:
    path = folder / f"calib{samples}.npz"
    if not path.exists():
        x = np.random.default_rng(seed).standard_normal((samples, D_MODEL)).astype(np.float32)
        np.savez(path, x=x)
    return path


def run_optimize(model: Path, extra: list[str], trace: bool = False) -> dict:
    """One ``bq-onnx optimize`` in a fresh process: wall time, peak RSS, exit code, the memory trace lines."""
    out = model.with_name("model.bq.onnx")
    cmd = [sys.executable, "-m", "bq_onnx", "optimize", str(model), "-o", str(out), "--force", "-q", *extra]
    env = dict(os.environ)
    if trace:
        env["BQ_ONNX_MEMTRACE"] = "1"
    logs = model.parent / "optimize.log"
    with open(logs, "w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: ru_maxrss is its peak resident set
        elapsed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    logs.unlink()
    out_bytes = _model_bytes(out) if out.exists() else 0
    for f in model.parent.glob("model.bq.onnx*"):
        f.unlink()
    return {"seconds": elapsed, "cpu": usage.ru_utime + usage.ru_stime, "peak": usage.ru_maxrss * 1024,
            "rc": proc.returncode, "output": output,
            "out_bytes": out_bytes, "trace": [line for line in output.splitlines() if line.startswith("memtrace ")]}


def _model_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares line ``y = a + b x`` and the worst relative deviation of a point from it."""
    b, a = np.polyfit(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), 1)
    dev = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
    return float(a), float(b), float(dev)


MARKER = "<!-- calibration: everything below is written by --calib-only -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0.25,0.5,1,2.5", help="model sizes in GiB of fp32 weights (multiples of 1/8)")
    p.add_argument("--samples", default="64,256,1024", help="calibration sample counts for the --calib runs")
    p.add_argument("--calib-size", type=float, default=0.125, help="model size (GiB) of the calibration-count runs")
    p.add_argument("--big-calib", action="store_true", help="also run --calib (default options) on a big model")
    p.add_argument("--big-calib-size", type=float, help="model size (GiB) of the --big-calib run (default: the "
                   "largest of --sizes)")
    p.add_argument("--big-calib-samples", type=int, default=64, help="calibration samples of the --big-calib run")
    p.add_argument("--calib-only", action="store_true", help="skip the size series: run the calibration series "
                   "(and --big-calib); with --out, replace the calibration part of an existing report")
    p.add_argument("--out", type=Path, help="write the results as markdown here")
    p.add_argument("--keep", action="store_true", help="keep the generated models in benchmarks/.cache/scale")
    p.add_argument("--single-tensor-gib", type=float, help="instead of the series: one model holding a single "
                   "fp32 weight of this many GiB")
    p.add_argument("--single-options", default="", help="optimize options of the --single-tensor-gib run")
    args = p.parse_args(argv)
    if args.single_tensor_gib is not None:
        try:
            text = "\n".join(single_tensor(args))
        finally:
            if not args.keep:
                shutil.rmtree(CACHE, ignore_errors=True)
        print(text)
        if args.out:
            args.out.write_text(text)
        return 0

    sizes = [float(s) for s in args.sizes.split(",")]
    counts = [int(s) for s in args.samples.split(",")]
    big_size = args.big_calib_size if args.big_calib_size is not None else max(sizes)
    lines: list[str] = []
    try:
        if not args.calib_only:
            lines += size_series(args, sizes, big_size)
        lines += [MARKER, ""] + calibration_series(args, counts, big_size)
    finally:
        if not args.keep:
            shutil.rmtree(CACHE, ignore_errors=True)
    if args.calib_only and args.out is not None and args.out.exists() and MARKER in args.out.read_text():
        head = args.out.read_text().split(MARKER)[0]
        lines = [head.rstrip("\n"), "", *lines]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text)
    return 0


def size_series(args, sizes: list[float], big_size: float) -> list[str]:
    """Default options at each size (memory traced at the largest); the report's first part."""
    lines = ["# Scale: peak memory and time of `bq-onnx optimize`", "",
             f"Command: `python -m benchmarks.scale --sizes {args.sizes} --samples {args.samples}"
             f"{' --big-calib' if args.big_calib else ''} --out benchmarks/scale.md`", "",
             f"Machine: {os.cpu_count()} cores, {_total_memory() / GIB:.0f} GiB RAM; numpy {np.__version__}, "
             f"onnx {onnx.__version__}.", "",
             "Model: stacked MLP blocks (MatMul 2048x8192 + Relu + Gemm(transB) 8192->2048 with bias), fp32 "
             "weights in external data. Default options (greedy allocation, 4 bits, native format, verification "
             "in onnxruntime). Peak = the process's high-water mark of resident memory (`ru_maxrss`, file-backed "
             "pages included). Bound = 1.5 x model size + 1 GiB.", "",
             "| weights (GiB) | parameters | options | wall (s) | peak RSS (GiB) | bound (GiB) | within | exit |",
             "|---|---|---|---|---|---|---|---|"]
    rows: list[tuple[float, int, float]] = []
    trace: list[str] = []
    for size in sizes:
        model, params = _model(size)
        model_bytes = params * 4
        big = size == max(sizes)
        result = run_optimize(model, [], trace=big)
        if big:
            trace = result["trace"]
        rows.append((size, params, result["seconds"]))
        lines.append(_row(model_bytes, params, "default", result, 1.5 * model_bytes + GIB))
        print(lines[-1], flush=True)
    a, b, dev = fit([r[1] for r in rows], [r[2] for r in rows])
    lines += ["", f"Time vs parameters: least-squares fit t = {a:.1f} s + {b * 1e9:.1f} s per 1e9 parameters; "
              f"worst point {dev:.0%} off the line; time per 1e9 parameters at each size: "
              + ", ".join(f"{r[0]:g} GiB {r[2] / r[1] * 1e9:.1f} s" for r in rows) + "."]
    print(lines[-1], flush=True)
    if trace:
        lines += ["", f"Memory per step at {max(sizes):g} GiB (`BQ_ONNX_MEMTRACE=1`, MiB; anon = heap, file = "
                  "memory-mapped model data):", "", "```", *trace, "```"]
    return lines + [""]


def calibration_series(args, counts: list[int], big_size: float) -> list[str]:
    """``--calib`` at several sample counts on a small model, and (``--big-calib``) once on a big one."""
    model, params = _model(args.calib_size)
    bound = 1.5 * params * 4 + GIB
    command = (f"python -m benchmarks.scale --calib-only --calib-size {args.calib_size:g} --samples {args.samples}"
               + (f" --big-calib --big-calib-size {big_size:g} --big-calib-samples {args.big_calib_samples}"
                  if args.big_calib else "") + " --out benchmarks/scale.md")
    separate = " (a separate --calib-only run)" if args.calib_only else ""
    lines = ["## Calibration", "", f"Command: `{command}`{separate}", "",
             f"Machine: {os.cpu_count()} cores, {_total_memory() / GIB:.0f} GiB RAM; numpy {np.__version__}, "
             f"onnx {onnx.__version__}.", "",
             f"Calibration samples (`--calib`, laplace posterior, `--allocator uniform` so the closed-form tables, "
             f"which do not depend on the samples, do not hide the per-sample cost; {args.calib_size:g} GiB model, "
             f"{params / 1e6:.0f} M parameters, bound {bound / GIB:.2f} GiB). `posterior` = the posterior step "
             "alone (from the memory trace: forward outputs, per-sample gradients, curvature).", "",
             "| samples | wall (s) | posterior (s) | peak RSS (GiB) | within bound | exit |",
             "|---|---|---|---|---|---|"]
    base = run_optimize(model, ["--allocator", "uniform"])
    srows = []
    for n in counts:
        result = run_optimize(model, ["--allocator", "uniform", "--calib", str(calibration(model.parent, n))],
                              trace=True)
        step = _between(result["trace"], "find weights", "posterior")
        srows.append((n, result["seconds"], step))
        ok = "yes" if result["peak"] < bound else "**no**"
        lines.append(f"| {n} | {result['seconds']:.1f} | {step:.1f} | {result['peak'] / GIB:.2f} | {ok} | "
                     f"{result['rc']} |")
        print(lines[-1], flush=True)
        if result["rc"] != 0:
            print(result["output"][-2000:], file=sys.stderr)
    a, b, dev = fit([r[0] for r in srows], [r[1] for r in srows])
    pa, pb, pdev = fit([r[0] for r in srows], [r[2] for r in srows])
    lines += ["", f"Time vs samples: wall t = {a:.1f} s + {b * 1000:.1f} ms per sample (worst point {dev:.0%} off "
              f"the line; same model without --calib: {base['seconds']:.1f} s); posterior step t = {pa:.1f} s + "
              f"{pb * 1000:.1f} ms per sample (worst point {pdev:.0%} off the line)."]
    print(lines[-1], flush=True)
    if args.big_calib:
        model, params = _model(big_size)
        model_bytes = params * 4
        n = args.big_calib_samples
        result = run_optimize(model, ["--calib", str(calibration(model.parent, n))], trace=True)
        lines += ["", f"`--calib` with default options (greedy allocation over the closed-form tables) on the "
                  f"{big_size:g} GiB model, {n} samples:", "",
                  "| weights (GiB) | parameters | options | wall (s) | peak RSS (GiB) | bound (GiB) | within | exit |",
                  "|---|---|---|---|---|---|---|---|",
                  _row(model_bytes, params, f"--calib ({n} samples)", result, 1.5 * model_bytes + GIB)]
        print(lines[-1], flush=True)
        lines += ["", "Memory per step of that run (`BQ_ONNX_MEMTRACE=1`, MiB):", "", "```", *result["trace"], "```"]
    return lines


def _model(size: float) -> tuple[Path, int]:
    blocks = max(1, round(size * GIB / BLOCK_BYTES))
    return generate(blocks), blocks * 2 * D_MODEL * D_FF


def _between(trace: list[str], start: str, stop: str) -> float:
    """Seconds from the memory-trace line of step ``start`` to that of step ``stop``."""
    times = {}
    for line in trace:  # "memtrace 1.66s find weights rss=161 ...": the step's name may have spaces
        found = re.match(r"memtrace ([0-9.]+)s (.*?) rss=", line)
        if found:
            times.setdefault(found.group(2), float(found.group(1)))
    return times[stop] - times[start] if start in times and stop in times else float("nan")


def _row(model_bytes: int, params: int, options: str, result: dict, bound: float) -> str:
    ok = "yes" if result["peak"] < bound else "**no**"
    return (f"| {model_bytes / GIB:.2f} | {params / 1e6:.0f} M | {options} | {result['seconds']:.1f} | "
            f"{result['peak'] / GIB:.2f} | {bound / GIB:.2f} | {ok} | {result['rc']} |")


def _total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
