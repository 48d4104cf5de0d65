"""Wall time per stage and peak memory per worker of ``bq-onnx posterior --workers N`` and of the expected-loss
tables of ``bq-onnx optimize --workers N``, and the per-worker memory bound for a bigger model (issue 19).

Usage:  python -m benchmarks.distributed [--sizes 0.25,1] [--samples 512] [--workers 1,2] [--method laplace]
        [--out benchmarks/distributed.md] [--keep]

Models are :mod:`benchmarks.scale`'s generated MLPs (blocks of MatMul 2048x8192 + Relu + Gemm(transB) 8192->2048,
128 MiB of fp32 weights per block, external data) with ``--samples`` seeded Gaussian calibration inputs. Two
commands per size and worker count, each in a fresh process: the posterior stage, ``bq-onnx posterior MODEL --calib
CALIB --workers N``, and the tables stage, ``bq-onnx optimize MODEL --posterior P --workers N --no-verify`` (default
options otherwise: greedy at 4 bits over widths 2..8; ``P`` the 1-worker posterior, so only the tables' workers run)
with ``BQ_ONNX_MEMTRACE=1``, whose trace gives the tables' own time (the ``posterior`` step, here the file loaded,
to the ``tables`` step) and the quantize stage's (each ``allocate`` step to the ``quantize`` step after it, added up
over the stored-budget loop's rounds) beside the command's wall time. For every size the runs alternate between the
worker counts (so a load change on the machine hits each alike), and the posteriors and the optimized models must be
the same bytes. Peaks are ``ru_maxrss`` (resident high-water mark, file-backed pages included) of the main process
(``getrusage(RUSAGE_SELF)``) and of the largest spawned worker (``RUSAGE_CHILDREN`` once the pool is gone).
``BQ_ONNX_SHARD_SAMPLES`` is set to ``ceil(samples / max workers)`` for every run, so that the shards divide evenly
(256, the default, at 512 samples and 2 workers).

The bound: a process's peak is fitted as ``a + c * M`` over the model sizes ``M`` measured (least squares; two
sizes fix it), so a model ``N`` times larger needs about ``a + c * N * M`` per worker; memory does not grow with
the number of workers (each holds the whole model and its sessions) nor with the samples beyond one batch's
activations (capped by ``BQ_ONNX_ACTIVATION_BUDGET_MB``, 1 GiB by default) and one shard's sums.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.scale import BLOCK_BYTES, CACHE, GIB, calibration, generate


def child(argv: list[str]) -> int:
    """In the measured process: the CLI, then this process's and its largest worker's peak memory as JSON."""
    from bq_onnx.cli import main as cli

    start = time.perf_counter()
    code = cli(argv)
    seconds = time.perf_counter() - start
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print("RESULT " + json.dumps({"rc": code, "seconds": seconds, "main": own, "worker": workers}), flush=True)
    return code


def run(argv: list[str], workers: int, shard: int, trace: bool = False) -> dict:
    """One measured CLI command in a fresh process with ``--workers``: its result, wall time and memory trace."""
    cmd = [sys.executable, "-m", "benchmarks.distributed", "--child", *argv, "--force", "-q", "--workers",
           str(workers)]
    env = dict(os.environ, BQ_ONNX_SHARD_SAMPLES=str(shard))
    if trace:
        env["BQ_ONNX_MEMTRACE"] = "1"
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"run failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-600:]}")
    trace_lines = [line for line in proc.stderr.splitlines() if line.startswith("memtrace ")]
    return {**json.loads(lines[-1][len("RESULT "):]), "wall": wall, "trace": trace_lines}


def _steps(trace: list[str]) -> dict[str, tuple[float, float]]:
    """Each step of a memory trace (its first word; the last line of each): (seconds, resident high-water mark in
    bytes)."""
    at = {}
    for line in trace:
        _, seconds, step, rest = line.split(" ", 3)
        hwm = next(float(f[4:]) for f in rest.split() if f.startswith("hwm="))
        at[step] = (float(seconds.rstrip("s")), hwm * 2**20)
    return at


def step_time(trace: list[str], start: str, stop: str) -> tuple[float, float]:
    """Seconds from the trace's ``start`` step to its ``stop`` step, and the high-water mark at ``stop``."""
    at = _steps(trace)
    if start not in at or stop not in at:
        raise SystemExit(f"the memory trace has no '{start}' or '{stop}' step")
    return at[stop][0] - at[start][0], at[stop][1]


def rounds(trace: list[str], start: str, stop: str) -> tuple[float, int]:
    """Seconds from each ``start`` step to the ``stop`` step right after it, added up, and how many (the
    stored-budget loop allocates and quantizes again)."""
    total, count, since = 0.0, 0, None
    for line in trace:
        _, seconds, step, _ = line.split(" ", 3)
        if step == start:
            since = float(seconds.rstrip("s"))
        elif step == stop and since is not None:
            total, count, since = total + float(seconds.rstrip("s")) - since, count + 1, None
    return total, count


def _same(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def _same_model(a: Path, b: Path) -> bool:
    """The model files and their external data, byte for byte (the data file's name is the model's)."""
    if a.read_bytes().replace(a.name.encode(), b"") != b.read_bytes().replace(b.name.encode(), b""):
        return False
    data = [(Path(f"{p}.data"), p) for p in (a, b)]
    exists = [d.exists() for d, _ in data]
    return exists[0] == exists[1] and (not exists[0] or data[0][0].read_bytes() == data[1][0].read_bytes())


def fit(sizes: list[float], peaks: list[float]) -> tuple[float, float]:
    """Least-squares ``peak = a + c * size`` (one size: ``a = 0``)."""
    if len(set(sizes)) < 2:
        return 0.0, peaks[0] / sizes[0]
    c, a = np.polyfit(sizes, peaks, 1)
    return float(a), float(c)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="0.25,1", help="model sizes in GiB of fp32 weights (comma-separated)")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--method", default="laplace")
    p.add_argument("--out", type=Path)
    p.add_argument("--keep", action="store_true", help="keep the generated models in benchmarks/.cache/")
    args = p.parse_args(argv)
    sizes = [float(s) for s in args.sizes.split(",")]
    counts = [int(w) for w in args.workers.split(",")]
    shard = -(-args.samples // max(counts))
    rows, measured = [], {}  # (stage, what, workers) -> (sizes, peaks)
    args.load = [os.getloadavg()[0]]
    try:
        for size in sizes:
            blocks = max(1, round(size * GIB / BLOCK_BYTES))
            model = generate(blocks)
            calib = calibration(model.parent, args.samples)
            model_bytes = blocks * BLOCK_BYTES
            posts, outs = {}, {}
            for w in counts:
                posts[w] = model.parent / f"posterior-w{w}.npz"
                r = run(["posterior", str(model), "--calib", str(calib), "--method", args.method, "-o",
                         str(posts[w])], w, shard)
                r["stage"], r["main_stage"] = r["wall"], r["main"]
                _note(rows, measured, "posterior", model_bytes, w, r)
            for w in counts:
                outs[w] = model.parent / f"model-w{w}.bq.onnx"
                r = run(["optimize", str(model), "--posterior", str(posts[counts[0]]), "--no-verify", "-o",
                         str(outs[w])], w, shard, trace=True)
                r["stage"], r["main_stage"] = step_time(r["trace"], "posterior", "tables")
                r["quantize"], r["rounds"] = rounds(r["trace"], "allocate", "quantize")
                _note(rows, measured, "tables", model_bytes, w, r)
            same = {"posterior": all(_same(posts[counts[0]], posts[w]) for w in counts[1:]),
                    "model": all(_same_model(outs[counts[0]], outs[w]) for w in counts[1:])}
            rows.append((model_bytes, "same", same))
            if not all(same.values()):
                raise SystemExit(f"{size} GiB: the outputs of {counts} workers differ ({same})")
    finally:
        if not args.keep:
            shutil.rmtree(CACHE, ignore_errors=True)
    args.load.append(os.getloadavg()[0])
    text = report(args, rows, measured, shard)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def _note(rows: list, measured: dict, stage: str, model_bytes: int, w: int, r: dict) -> None:
    print(f"{stage}: {model_bytes / GIB:.2f} GiB, {w} worker(s): stage {r['stage']:.1f} s (command {r['wall']:.1f} "
          f"s), main {r['main_stage'] / GIB:.2f} GiB in the stage ({r['main'] / GIB:.2f} GiB in the command), "
          f"worker {r['worker'] / GIB:.2f} GiB", flush=True)
    whats = ["main_stage", *(["main"] if stage == "tables" else []), *(["worker"] if w > 1 else [])]
    for what in whats:
        sizes_, peaks = measured.setdefault((stage, what, w), ([], []))
        sizes_.append(model_bytes / GIB)
        peaks.append(r[what] / GIB)
    rows.append((model_bytes, (stage, w), r))


def report(args, rows: list, measured: dict, shard: int) -> str:
    lines = [
        "# The posterior and the tables over worker processes",
        "",
        f"Command: `python -m benchmarks.distributed --sizes {args.sizes} --samples {args.samples} --workers "
        f"{args.workers} --method {args.method}{' --out ' + str(args.out) if args.out else ''}` "
        f"(`BQ_ONNX_SHARD_SAMPLES={shard}`). Machine: {os.cpu_count()} CPUs, load average "
        f"{args.load[0]:.1f} at the start and {args.load[1]:.1f} at the end (other work shares them).",
        "",
        "Model: benchmarks/scale.py's generated MLP (MatMul 2048x8192 + Relu + Gemm(transB) 8192->2048 per 128 MiB "
        "block, fp32 weights in external data); Gaussian calibration inputs. Per size and worker count, in fresh "
        "processes, the worker counts alternating: the posterior stage is `bq-onnx posterior --workers N` (its "
        "wall time), the tables stage `bq-onnx optimize --posterior P --workers N --no-verify` (default options; "
        "its own time from the memory trace, the command's wall time beside it: loading, allocation, quantization "
        "and writing run in the main process; the quantize stage's time from the trace too). Peak = `ru_maxrss` "
        "(file-backed pages included) of the main process "
        "and of the largest spawned worker of that command; for the tables also the main process's high-water mark "
        "when the stage ended (the trace's `hwm` at its `tables` step): the command's peak is then that of "
        "quantizing and writing, the same with and without workers, and fitted on its own below.",
        "",
        "| stage | model (GiB) | workers | stage wall (s) | quantize stage (s) (rounds) | command wall (s) | main "
        "process peak, stage (GiB) | main process peak, command (GiB) | largest worker peak (GiB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    reduced = [f"the model sizes ({args.sizes} GiB, not 0.25,1)" if 1.0 not in [float(x) for x in
                                                                             args.sizes.split(",")] else "",
               f"the samples ({args.samples}, not 512)" if args.samples != 512 else ""]
    if any(reduced):
        lines[4:4] = [f"**A reduced run** ({' and '.join(r for r in reduced if r)}): the issue's measurement is the "
                      "1 GiB model with 512 samples (the script's defaults, `--sizes 0.25,1 --samples 512`); this "
                      "one is smaller because the machine it ran on was shared (the tables of the 1 GiB model take "
                      "minutes per run there). Fewer samples shorten only the posterior, whose wall time is then "
                      "mostly start-up (each worker builds the gradient graph and sessions and runs the FP32 model on "
                      "every sample); the tables do not depend on the samples. Memory depends little on the samples "
                      "on this model (512 samples of 2048 floats are 4 MiB, and the batched Fisher keeps each "
                      "batch's layer inputs and output gradients on disk); the fits over model sizes extrapolate to "
                      "the 1 GiB model as to any other.", ""]
    same = []
    for model_bytes, key, r in rows:
        if key == "same":
            same.append(f"{model_bytes / GIB:.2f} GiB: posterior {'yes' if r['posterior'] else 'NO'}, optimized "
                        f"model {'yes' if r['model'] else 'NO'}")
            continue
        stage, w = key
        worker = f"{r['worker'] / GIB:.2f}" if w > 1 else "-"
        command = f"{r['wall']:.1f}" if stage == "tables" else "-"
        quantize = f"{r['quantize']:.1f} ({r['rounds']})" if "quantize" in r else "-"
        lines.append(f"| {stage} | {model_bytes / GIB:.2f} | {w} | {r['stage']:.1f} | {quantize} | {command} | "
                     f"{r['main_stage'] / GIB:.2f} | {r['main'] / GIB:.2f} | {worker} |")
    lines += ["", f"Byte-identical across worker counts: {'; '.join(same)}.", ""]
    for (stage, what, w), (sizes, peaks) in measured.items():
        a, c = fit(sizes, peaks)
        biggest = max(sizes)
        who = {"main_stage": "the main process" + (" in the stage" if stage == "tables" else ""),
               "main": "the main process in the whole command (quantizing and writing)"}.get(what, "a spawned worker")
        lines.append(f"- {stage}, {w} worker(s), {who}: peak = {a:.2f} GiB + {c:.2f} x model GiB (fitted over "
                     f"{', '.join(f'{s:.2f}' for s in sizes)} GiB). For a model N times the {biggest:.2f} GiB one: "
                     f"about {a:.2f} + {c * biggest:.2f} N GiB (N = 10: {a + c * biggest * 10:.1f} GiB).")
    lines += [
        "",
        "Posterior: the main process also computes shards (0, N, 2N, ...) and then reads the others' replies and "
        "finalizes the posterior; size a machine by the larger of the two fits. Every worker holds the whole model "
        "and its gradient sessions, so the per-worker bound grows with the model, not with the number of workers; "
        "more workers divide the samples (time), not the memory. The samples add one batch's activations (capped "
        "by `BQ_ONNX_ACTIVATION_BUDGET_MB`, 1 GiB by default) and, where a layer's float64 sum is bigger than its "
        "batches' inputs and output gradients, those instead.",
        "",
        "Tables: the weights are split by element count (the main process takes the first list, each spawned "
        "worker one other); a worker reads the model (external data, read lazily) and the posterior arrays of its "
        "own weights, and computes and drops one weight at a time (its design cache too), so its peak is about one "
        "weight's designs and float64 temporaries (the precision, the errors) over its start-up: it follows the "
        "largest weight (64 MiB of fp32 on this model, at every size) more than the model, and a fit over model "
        "sizes overstates it. The main process then allocates, quantizes and writes as in one process; the "
        "workers send back each chosen design's grid (scales, zero points, codebooks, outliers: "
        "`bq_onnx/quantizers/grids.py`), so the quantize stage only chooses the codes again, without the design "
        "search, for every weight.",
        "",
        "Time: one process already runs the quantizers on one thread per core (at most 8, "
        "`bq_onnx/quantizers/parallel.py`), and N workers get 1/N of those threads each, so on this 2-core machine "
        "two workers have no core to add and their extra work (the workers' files written, a process started, the "
        "model read again) is a cost; the other load on the machine moves these times by tens of percent between "
        "runs. Workers pay off where they add cores: more cores than the thread pool uses, or other machines "
        "(`--ray`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2:]))
    sys.exit(main())
