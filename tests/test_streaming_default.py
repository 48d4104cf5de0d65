"""Streaming at default options (issue 21: ``--bits 4``, nothing else, on one big weight): the quantize stage
encodes the weight band by band from its file on the tables' grids, the slices the tables designed leave the design
cache once they are done, and the guard's measured candidates wait on disk. A 128 MiB weight is optimized in a
subprocess whose private writable memory (``RLIMIT_DATA``: heap and anonymous mappings, not mapped files) is
limited to what a tiny model's run took plus 4.8x the weight: the code before this change needed about 5.4x there
(the whole weight read again to be encoded, candidates and cached slices held through the guard) and failed; now
about 4.2x."""

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
def test_a_128_mib_weight_at_default_options_fits_the_tiny_runs_memory_plus_4_8x(tmp_path):
    tiny = _optimize(_model(tmp_path / "tiny", 512, 1024), tmp_path / "tiny.bq.onnx", 0)
    assert tiny.returncode == 0, tiny.stderr[-2000:]
    base = int(tiny.stdout.split("peak ")[-1])
    k, n = 4096, 8192
    limit = base + int(4.8 * k * n * 4)
    done = _optimize(_model(tmp_path / "big", k, n), tmp_path / "big.bq.onnx", limit)
    assert done.returncode == 0, (base, limit, done.stderr[-2000:])
    assert (tmp_path / "big.bq.onnx").exists()
    assert int(done.stdout.split("peak ")[-1]) <= limit
