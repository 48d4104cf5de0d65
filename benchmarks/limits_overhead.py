"""Per-run overhead of the run limits (bq_onnx/limits.py) on models/lenet.onnx at batch 1, one thread:
``OrtSession.run`` (limits: deadline + address-space cap) against the raw onnxruntime session, best of 5 blocks.

    python benchmarks/limits_overhead.py
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bq_onnx import limits
from bq_onnx.runtimes import get_runtime

ROOT = Path(__file__).resolve().parents[1]


def best_us(f, n: int = 3000) -> float:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            f()
        times.append((time.perf_counter() - start) / n)
    return min(times) * 1e6


def main() -> None:
    session = get_runtime("onnxruntime").session(ROOT / "models" / "lenet.onnx", exact=True, threads=1)
    feeds = {session.input_names[0]: np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)}
    raw = session._session
    for _ in range(200):
        session.run(feeds)

    def empty() -> None:
        with limits.limited("x"):
            pass

    plain = best_us(lambda: raw.run(None, feeds))
    limited = best_us(lambda: session.run(feeds))
    print(f"lenet batch 1: raw {plain:.1f} us/run, with limits {limited:.1f} us/run "
          f"(+{limited - plain:.1f} us); an empty limited block {best_us(empty, 20000):.1f} us")


if __name__ == "__main__":
    main()
