"""Peak memory of one big weight: ``bq-onnx inspect`` and ``bq-onnx optimize`` of a model whose single fp32
weight is 1 GiB (2^28 elements) or 8 GiB (2^31), against the bound of issue 21: 1.5 x model + 1 GiB.

Usage:  python -m benchmarks.streaming_memory [--gib 1] [--optimize "--bits 4"] [--out benchmarks/streaming_memory.md]
        [--keep]

The model is :func:`benchmarks.scale.generate_single`'s: one ``MatMul`` with a ``(32768, N)`` weight of seeded
normal values (real values, not a sparse file of zeros that quantizes to a degenerate code) in external data,
written 64 rows at a time into ``benchmarks/.cache/scale/`` (git-ignored; deleted after the run unless
``--keep``). Each command runs in its own process; its peak is that process's ``ru_maxrss`` from ``wait4`` (the
kernel's high-water mark of resident memory, file-backed pages included: a weight memory-mapped and read counts
as much as one copied). ``optimize`` runs without calibration, with ``BQ_ONNX_MEMTRACE=1``, so the report shows
resident memory after each step and where the peak was reached.
"""

from __future__ import annotations

import argparse
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from benchmarks.scale import CACHE, GIB, SINGLE_ROWS, _total_memory, generate_single


def bound(model_bytes: int) -> float:
    """Issue 21's bound on the peak resident memory of any command on a model of ``model_bytes``."""
    return 1.5 * model_bytes + GIB


def run(argv: list[str], trace: bool, cap: int) -> dict:
    """One ``python -m bq_onnx`` command in a fresh process: wall and CPU seconds, peak RSS, exit code, output.
    ``cap``: the child's address-space limit (bytes): a blow-up fails the command instead of taking the machine."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = dict(os.environ, BQ_ONNX_MEMTRACE="1") if trace else dict(os.environ)
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "bq_onnx", *argv], stdout=log, stderr=subprocess.STDOUT,
                                text=True, env=env, preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage: ru_maxrss is its peak resident set
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "peak": usage.ru_maxrss * 1024,
            "rc": proc.returncode, "output": output,
            "trace": [line for line in output.splitlines() if line.startswith("memtrace ")]}


def measure(gib: float, optimize: list[str], cap_factor: float) -> tuple[list[str], list[str]]:
    """Table rows and trace lines of inspect and optimize on one model of ``gib`` GiB."""
    t0 = time.perf_counter()
    model, params = generate_single(gib)
    model_bytes = params * 4
    print(f"{gib:g} GiB model ({params} elements) ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    out = model.with_name("model.bq.onnx")
    rows, traces, errors = [], [], []
    for name, argv in (("inspect", ["inspect", str(model)]),
                       (f"optimize {' '.join(optimize)}", ["optimize", str(model), "-o", str(out), "--force", "-q",
                                                          *optimize])):
        r = run(argv, trace=name.startswith("optimize"), cap=int(cap_factor * bound(model_bytes)))
        for f in model.parent.glob("model.bq.onnx*"):
            f.unlink()
        limit = bound(model_bytes)
        ok = "yes" if r["peak"] <= limit else "**no**"
        rows.append(f"| {model_bytes / GIB:g} | 2^{params.bit_length() - 1} | `{name}` | {r['seconds']:.1f} | "
                    f"{r['cpu']:.1f} | {r['peak'] / GIB:.2f} | {r['peak'] / model_bytes:.2f} | {limit / GIB:.2f} | "
                    f"{ok} | {r['rc']} |")
        print(rows[-1], file=sys.stderr, flush=True)
        if r["rc"] != 0:
            print(r["output"][-2000:], file=sys.stderr)
            errors.append(f"{model_bytes / GIB:g} GiB, `{name}`: exit {r['rc']}: "
                          + next((line for line in reversed(r["output"].splitlines())
                                  if line.strip() and not line.startswith("memtrace ")), ""))
        if r["trace"]:
            traces += [f"{model_bytes / GIB:g} GiB, `{name}`:", "", "```", *r["trace"], "```", ""]
    return rows, traces + errors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", default="1", help="comma-separated sizes of the single weight in GiB (1 = 2^28 fp32)")
    p.add_argument("--optimize", default="--bits 4", help="options of the optimize run")
    p.add_argument("--out", type=Path, help="write the markdown report here")
    p.add_argument("--cap", type=float, default=3.0, help="each command's address-space limit, as a multiple of "
                   "the bound (a blow-up fails the command instead of taking the machine)")
    p.add_argument("--keep", action="store_true", help="keep the generated models in benchmarks/.cache/scale")
    args = p.parse_args(argv)
    sizes = [float(s) for s in args.gib.split(",")]
    optimize = shlex.split(args.optimize)
    load = os.getloadavg()[0]
    rows, traces = [], []
    try:
        for gib in sizes:
            r, t = measure(gib, optimize, args.cap)
            rows += r
            traces += t
    finally:
        if not args.keep:
            shutil.rmtree(CACHE, ignore_errors=True)
    command = f"python -m benchmarks.streaming_memory --gib {args.gib}" + \
        (f' --optimize "{args.optimize}"' if args.optimize != "--bits 4" else "") + \
        (f" --cap {args.cap:g}" if args.cap != 3.0 else "") + \
        (f" --out {args.out}" if args.out else "")
    lines = ["# Streaming: peak memory of one big weight", "",
             f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} cores, {_total_memory() / GIB:.0f} GiB RAM; numpy {np.__version__}, "
             f"onnx {onnx.__version__}; load average {load:.1f} when the run started, "
             f"{os.getloadavg()[0]:.1f} when it ended.", "",
             f"Model: one MatMul with a single ({SINGLE_ROWS}, N) fp32 weight of seeded normal values in external "
             "data. Peak = `ru_maxrss` of the command's process (file-backed pages included); bound = 1.5 x model "
             "+ 1 GiB; CPU = user + system seconds of that process. Each command runs with its address space limited "
             f"to {args.cap:g} x the bound (`RLIMIT_AS`): an allocation past it fails (exit 10 inside a runtime "
             "session, else a memory error) instead of reaching the kernel's OOM killer.", "",
             "| weight (GiB) | elements | command | wall s | CPU s | peak RSS (GiB) | peak / model | bound (GiB) "
             "| within | exit |",
             "|---|---|---|---|---|---|---|---|---|---|", *rows, "",
             "Resident memory after each step (`BQ_ONNX_MEMTRACE=1`, MiB; hwm = the peak so far):", "", *traces]
    text = "\n".join(lines).rstrip("\n") + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
