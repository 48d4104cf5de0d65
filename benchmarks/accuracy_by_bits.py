"""Test accuracy of the shipped reference models at every fixed bit width, both formats.

Usage:  python benchmarks/accuracy_by_bits.py [--models lenet,digits_mlp] [--quantizer uniform]
        [--group-size 32] [--bits 2,3,4,5,6,7,8] [--out benchmarks/accuracy_by_bits.md]

Every number comes from running the written model in onnxruntime (exact precision settings) on the model's
held-out test split shipped in models/<name>_data.npz.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

import bq_onnx
from bq_onnx.runtimes import get_runtime
from bq_onnx.table import render

MODELS = Path(__file__).resolve().parent.parent / "models"


def evaluate(path: Path, data: dict, runtime: str = "onnxruntime") -> np.ndarray:
    session = get_runtime(runtime).session(path, exact=True)
    x = data["test_input"]
    return np.concatenate([session.run({"input": x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet,digits_mlp")
    p.add_argument("--quantizer", default="uniform")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--bits", default="2,3,4,5,6,7,8")
    p.add_argument("--formats", default="native,compact")
    p.add_argument("--out", help="also write the tables as Markdown to this file")
    args = p.parse_args(argv)
    bits_list = [int(b) for b in args.bits.split(",")]
    lines = [
        "# Accuracy by bit width",
        "",
        f"`python benchmarks/accuracy_by_bits.py --quantizer {args.quantizer} --group-size {args.group_size}`",
        "",
        f"bq-onnx {bq_onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}",
        "",
    ]
    for name in args.models.split(","):
        model = MODELS / f"{name}.onnx"
        with np.load(MODELS / f"{name}_data.npz") as f:
            data = {k: f[k] for k in f.files}
        labels = data["test_labels"]
        fp32 = evaluate(model, data)
        fp32_pred = fp32.argmax(1)
        rows = [["fp32", "-", f"{100 * (fp32_pred == labels).mean():.2f}", "100.00", "32.00", "-", "-"]]
        for fmt in args.formats.split(","):
            for bits in bits_list:
                start = time.perf_counter()
                result = bq_onnx.optimize(model, bits=bits, format=fmt, quantizer=args.quantizer,
                                          group_size=args.group_size)
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / f"{name}.onnx"
                    result.save(out)
                    elapsed = time.perf_counter() - start
                    pred = evaluate(out, data).argmax(1)
                    size = out.stat().st_size
                t = result.report["totals"]
                rows.append(
                    [
                        fmt,
                        bits,
                        f"{100 * (pred == labels).mean():.2f}",
                        f"{100 * (pred == fp32_pred).mean():.2f}",
                        f"{t['bits_per_weight_with_metadata']:.2f}",
                        f"{size / 1024:.1f}",
                        f"{elapsed:.2f}",
                    ]
                )
        headers = ["format", "bits", "accuracy %", "agree fp32 %", "bits/w+meta", "file KiB", "optimize s"]
        table = render(headers, rows)
        print(f"\n{name} ({len(labels)} test samples, quantizer {args.quantizer}, group {args.group_size})")
        print(table)
        lines += [f"## {name}", "", f"{len(labels)} test samples.", "", "```", table, "```", ""]
    if args.out:
        Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
