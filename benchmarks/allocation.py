"""Bit allocators on a reference model: budget achieved, accuracy, agreement and KL to FP32, optimize time.

Usage:  python benchmarks/allocation.py [--model lenet] [--budgets 2.5,3.0,3.5,4.0]
        [--allocators uniform,greedy,dp,quantile-inform,random-bits,selective] [--method laplace]
        [--granularity rows:8] [--format compact] [--out benchmarks/allocation_lenet.md]

One posterior (``--method``, from the model's shipped calibration split) serves every run. Every model is
written, verified, and evaluated in onnxruntime (exact settings) on the held-out test split. ``uniform`` at a
fractional budget can only use the whole width below it, so each budget also gets a ``greedy@uniform`` row:
greedy at exactly the size uniform reached (the equal-size comparison).
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
from bq_onnx.estimators import estimate_posterior
from bq_onnx.runtimes import get_runtime
from bq_onnx.table import render

MODELS = Path(__file__).resolve().parent.parent / "models"


def logits_of(path: Path, x: np.ndarray) -> np.ndarray:
    session = get_runtime("onnxruntime").session(path, exact=True)
    return np.concatenate([session.run({"input": x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over samples, from logits (float64)."""
    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def run(model: Path, posterior, data: dict, ref: np.ndarray, budget: float, allocator: str, args) -> dict:
    start = time.perf_counter()
    result = bq_onnx.optimize(model, bits=budget, allocator=allocator, posterior=posterior,
                              granularity=args.granularity, format=args.format, group_size=args.group_size)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        result.save(out)
        elapsed = time.perf_counter() - start
        logits = logits_of(out, data["test_input"])
        size = out.stat().st_size
    pred = logits.argmax(1)
    t = result.report["totals"]
    return {
        "allocator": allocator,
        "budget": budget,
        "bits": t["bits_per_weight"],
        "bits_meta": t["bits_per_weight_with_metadata"],
        "accuracy": float((pred == data["test_labels"]).mean()),
        "agreement": float((pred == ref.argmax(1)).mean()),
        "kl": kl(ref, logits),
        "file": size,
        "seconds": elapsed,
        "layer_bits": {r["name"]: r["bits"] for r in result.report["layers"]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--budgets", default="2.5,3.0,3.5,4.0")
    p.add_argument("--allocators", default="uniform,greedy,dp,quantile-inform,random-bits,selective")
    p.add_argument("--method", default="laplace", help="posterior estimator (default laplace)")
    p.add_argument("--granularity", default="rows:8")
    p.add_argument("--format", default="compact")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--out", help="also write the tables as Markdown to this file")
    args = p.parse_args(argv)
    model = MODELS / f"{args.model}.onnx"
    with np.load(MODELS / f"{args.model}_data.npz") as f:
        data = {k: f[k] for k in f.files}
    start = time.perf_counter()
    posterior = estimate_posterior(model, MODELS / f"{args.model}_calib.npz", args.method)
    posterior_seconds = time.perf_counter() - start
    ref = logits_of(model, data["test_input"])
    fp32_acc = float((ref.argmax(1) == data["test_labels"]).mean())
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        results = [run(model, posterior, data, ref, budget, a, args) for a in args.allocators.split(",")]
        uniform = next((r for r in results if r["allocator"] == "uniform"), None)
        if uniform is not None and uniform["bits"] < budget:
            same = run(model, posterior, data, ref, uniform["bits"], "greedy", args)
            same["allocator"] = "greedy@uniform"
            results.append(same)
        rows += results
    table = render(
        ["budget", "allocator", "bits", "bits+meta", "accuracy %", "agree %", "KL", "file KiB", "seconds"],
        [[f"{r['budget']:g}", r["allocator"], f"{r['bits']:.3f}", f"{r['bits_meta']:.3f}",
          f"{100 * r['accuracy']:.2f}", f"{100 * r['agreement']:.2f}", f"{r['kl']:.5f}",
          f"{r['file'] / 1024:.1f}", f"{r['seconds']:.2f}"] for r in rows],
    )
    layer_table = render(
        ["budget", "allocator", *rows[0]["layer_bits"]],
        [[f"{r['budget']:g}", r["allocator"], *(f"{b:.2f}" if isinstance(b, float) else b
                                              for b in r["layer_bits"].values())] for r in rows],
    )
    lines = [
        f"# Bit allocation on {args.model}",
        "",
        f"`python benchmarks/allocation.py --model {args.model} --budgets {args.budgets} --method {args.method} "
        f"--granularity {args.granularity} --format {args.format} --group-size {args.group_size}`",
        "",
        f"bq-onnx {bq_onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}. FP32 test accuracy {100 * fp32_acc:.2f} % on {len(ref)} samples. Posterior: "
        f"{args.method} on {posterior.samples} calibration samples ({posterior_seconds:.2f} s, not in the times "
        "below).",
        "",
        "```",
        table,
        "```",
        "",
        "Bits per layer:",
        "",
        "```",
        layer_table,
        "```",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
