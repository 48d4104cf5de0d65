"""Streaming at default options (issue 21: ``--bits 4``, nothing else, on one big weight): the quantize stage
encodes the weight band by band from its file on the tables' grids, the slices the tables designed leave the design
cache once they are done, and the guard's measured candidates wait on disk. A 128 MiB weight is optimized in a
subprocess whose private writable memory (``RLIMIT_DATA``: heap and anonymous mappings, not mapped files) is
limited to what a tiny model's run took plus 5.0x the weight: the code before this change needed about 5.4x there
(the whole weight read again to be encoded, candidates and cached slices held through the guard) and failed; now
about 4.5x (4.2x until session 16, when opening the tiny run's packed layers got cheaper and its own peak fell from
about 379 to 295 MiB; the big run's from 909 to 868 MiB). The limit was 4.8x until session 18, when one CI run
under load failed an allocation of the whole weight there while the sampled peak, at that code and at session 17's,
was 4.50x: a transient between two samples of ``VmData``; 5.0x still fails the 5.4x of the old code."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.hostile import REPO, external_matmul

_RUN = """
import resource, sys, threading, time
limit = int(sys.argv[1])
if limit:
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
peak = [0]
def data():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmData:"))
def sample():
    while True:
        peak[0] = max(peak[0], data())
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
from bq_onnx.cli import main
code = main(sys.argv[2:])
print("peak", max(peak[0], data()))
sys.exit(code)
"""


def _model(folder, k: int, n: int):
    w = (np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) / np.sqrt(k)).astype(np.float32)
    return external_matmul(folder, w, "b")


def _optimize(src, out, limit: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _RUN, str(limit), "optimize", os.fspath(src), "-o",
                           os.fspath(out), "-q", "--bits", "4"], capture_output=True, text=True, timeout=600,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux's /proc/self/status")
def test_a_128_mib_weight_at_default_options_fits_the_tiny_runs_memory_plus_5x(tmp_path):
    tiny = _optimize(_model(tmp_path / "tiny", 512, 1024), tmp_path / "tiny.bq.onnx", 0)
    assert tiny.returncode == 0, tiny.stderr[-2000:]
    base = int(tiny.stdout.split("peak ")[-1])
    k, n = 4096, 8192
    limit = base + int(5.0 * k * n * 4)
    done = _optimize(_model(tmp_path / "big", k, n), tmp_path / "big.bq.onnx", limit)
    assert done.returncode == 0, (base, limit, done.stderr[-2000:])
    assert (tmp_path / "big.bq.onnx").exists()
    assert int(done.stdout.split("peak ")[-1]) <= limit


_STEPS = """
import importlib, sys
def status():
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmHWM", "VmRSS"))}
steps = []
def trace(step):  # each step's resident peak: the kernel's high-water mark, reset after each step
    s = status()
    steps.append((step, s["VmHWM"], s["VmRSS"]))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
trace("start")
for name in ("bq_onnx.pipeline", "bq_onnx.verify", "bq_onnx.model_io"):
    module = importlib.import_module(name)
    module.memtrace = trace
from bq_onnx.cli import main
code = main(sys.argv[1:])
for step, hwm, rss in steps:
    print("step", hwm, rss, step)
sys.exit(code)
"""


def _steps(src, out) -> list[tuple[str, int, int]]:
    done = subprocess.run([sys.executable, "-c", _STEPS, "optimize", os.fspath(src), "-o", os.fspath(out), "-q",
                           "--bits", "4"], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line.split(" ", 3) for line in done.stdout.splitlines() if line.startswith("step ")]
    return [(step, int(hwm), int(rss)) for _, hwm, rss, step in lines]


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_the_allocations_measurement_holds_the_weight_once(tmp_path):
    """The guard's measurement of the allocation (the FP32 model's reference runs, then the candidate decoded and
    fed to it: from the last ``rewrite`` before the guard's first session to the next ``allocate``) peaks within
    3.7x the weight over what the process held before reading it. At this size onnxruntime's fixed costs and the
    FP32 session's own copy of the weight are most of that; what the change took away is what scales with the
    weight: the candidate's codes and rewritten tensors (about 0.6x) beside the float weight's pages in the
    reference runs, the heap they freed beside the decode (released while a loop variable still held the weight's
    pieces), and the codes' pages the decode and the move to disk read. Now 3.3x here, before 4.15x; at 1 GiB
    1.9x before, 1.2x now (``benchmarks/scale_single_tensor.md``)."""
    k, n = 4096, 8448
    steps = _steps(_model(tmp_path / "big", k, n), tmp_path / "big.bq.onnx")
    base = next(rss for step, _, rss in steps if step == "find weights")
    names = [step for step, _, _ in steps]
    first = next(i for i, step in enumerate(names) if step.startswith("saved m"))  # the guard's first session
    after = names.index("allocate", first)  # the next candidate's (uniform)
    peak = max(hwm for _, hwm, _ in steps[first:after + 1])
    over = (peak - base) / (k * n * 4)
    print(f"the allocation's measurement: {over:.2f}x the weight over the process before it")
    assert over <= 3.7, (over, steps)
