"""Calibration-only distillation: KL to FP32 on the held-out test split, before and after.

Usage:  python -m benchmarks.distillation [--model lenet] [--budgets 2.5,3.0] [--steps 200] [--out FILE]

Both models come from the same posterior, allocation and codes; the distilled one has its scales, offsets and
codebooks tuned on the calibration split. KL and accuracy are measured on the test split, which distillation
never sees.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import bq_onnx
from benchmarks.allocation import kl, logits_of
from bq_onnx.table import render

MODELS = Path(__file__).resolve().parent.parent / "models"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--budgets", default="2.5,3.0")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--out")
    args = p.parse_args(argv)
    model, calib = MODELS / f"{args.model}.onnx", MODELS / f"{args.model}_calib.npz"
    with np.load(MODELS / f"{args.model}_data.npz") as f:
        x, labels = f["test_input"], f["test_labels"]
    ref = logits_of(model, x)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for steps in (0, args.steps):
            start = time.perf_counter()
            result = bq_onnx.optimize(model, bits=budget, calib=calib, distill_steps=steps)
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "q.onnx"
                result.save(out)
                logits = logits_of(out, x)
            d = result.report.get("distillation", {})
            accuracy = 100 * (logits.argmax(1) == labels).mean()
            rows.append([f"{budget:g}", steps, f"{kl(ref, logits):.5f}", f"{accuracy:.2f}",
                         f"{d.get('kl_before', float('nan')):.5f}", f"{d.get('kl_after', float('nan')):.5f}",
                         f"{time.perf_counter() - start:.1f}"])
    table = render(["budget", "distill steps", "test KL", "test accuracy %", "calib held-out KL before",
                    "after", "seconds"], rows)
    text = "\n".join([f"# Distillation on {args.model}", "",
                      f"`python -m benchmarks.distillation --model {args.model} --budgets {args.budgets} "
                      f"--steps {args.steps}`", "", "```", table, "```", ""])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
