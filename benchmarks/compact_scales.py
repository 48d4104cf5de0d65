"""LeNet in the compact format with fp16 scales against double-quantized scales at the same stored budget.

Usage:  python benchmarks/compact_scales.py [--bits 3,3.5,4] [--out benchmarks/compact_scales.md]

Per stored budget (``--bits``, metadata counted) and scale storage (``--scales fp16``: an fp16 scale per block, what
the compact format stored before; ``--scales double``: a uint8 code per block times an fp16 super scale per output
channel): greedy allocation with a laplace posterior from ``models/lenet_calib.npz`` and the guard (a quarter held
out), then test accuracy on ``models/lenet_data.npz`` (onnxruntime), the stored bits per weight the report counts,
the payload and metadata bits per weight of the quantized layers, and the guard's measured held-out loss (the
allocation as first chosen, and what was written).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

import bq_onnx
from benchmarks.lenet_budgets import CALIB, DATA, MODEL, accuracy, write_report


def _row(bits: float, scales: str, x: np.ndarray, y: np.ndarray, tmp: Path) -> str:
    result = bq_onnx.optimize(MODEL, calib=str(CALIB), bits=bits, format="compact", scales=scales)
    out = tmp / "lenet.bq.onnx"
    result.save(out, force=True)
    r = result.report
    t, g = r["totals"], r.get("guard") or {}
    first = (g.get("first") or {}).get("measured_loss", float("nan"))
    return (f"| {bits:g} | {scales} | {accuracy(out, x, y):.4f} | {r['allocation']['achieved_bits']:.3f} | "
            f"{t['bits_per_weight']:.3f} | {t['metadata_bits'] / t['numel']:.3f} | {first:.6f} | "
            f"{g.get('measured_loss', float('nan')):.6f} | {g.get('result', '')} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="3,3.5,4", help="stored budgets, comma-separated")
    parser.add_argument("--out", help="write the markdown table here (default: print)")
    args = parser.parse_args()
    with np.load(DATA) as d:
        x, y = d["test_input"], d["test_labels"]
    lines = [f"`python benchmarks/compact_scales.py --bits {args.bits}` (bq-onnx {bq_onnx.__version__}); FP32 "
             f"accuracy {accuracy(MODEL, x, y):.4f} on {len(y)} test images", "",
             "| --bits | --scales | test accuracy | stored bits/weight | payload bits/weight | metadata bits/weight | "
             "held-out loss, allocation | held-out loss, written | guard |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for bits in (float(b) for b in args.bits.split(",")):
            for scales in ("fp16", "double"):
                lines.append(_row(bits, scales, x, y, Path(tmp)))
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
