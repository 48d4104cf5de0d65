"""Posterior estimators on a reference model: per-layer curvature, ranking agreement, cost.

Usage:  python benchmarks/posterior_check.py [--model lenet] [--samples 500] [--out benchmarks/posterior_check.md]

Prints the mean curvature per layer for laplace, fisher-mc and hutchinson, the Spearman correlation of the
per-layer ranking between laplace and hutchinson (and fisher-mc), the cost of one per-sample gradient relative
to one forward pass (both at batch 1 in onnxruntime, exact settings), each estimator's wall time and the
process's peak resident memory.
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
from scipy.stats import spearmanr

import bq_onnx
from bq_onnx.calibration import load_calibration
from bq_onnx.estimate import (
    TempSessions,
    _forward,
    _gradient_graph,
    estimate_posterior,
    prepare,
    softmax,
    specialise,
)
from bq_onnx.model_io import copy_model
from bq_onnx.passes.loss import TARGET
from bq_onnx.table import render

MODELS = Path(__file__).resolve().parent.parent / "models"


def per_sample_cost(model_path: Path, calib_path: Path, count: int) -> tuple[float, float]:
    """Median seconds of one batch-1 forward and one batch-1 forward+gradient run."""
    prepared = prepare(model_path)
    calib = load_calibration(calib_path, prepared.model, count)
    sessions = TempSessions()
    try:
        outputs = _forward(sessions, prepared, None, calib)
        model = specialise(copy_model(prepared.model), next(calib.batches(1)))
        graph = _gradient_graph(prepared, "kl", None, [w.name for w in prepared.weights], as_inputs=False,
                                model=model)
        grad = sessions.open(graph.model)
        fwd_model = sessions.open(prepared.model)
        targets = softmax(outputs)
        fwd, bwd = [], []
        for i, feeds in enumerate(calib.batches(1)):
            t = time.perf_counter()
            fwd_model.run(feeds)
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            grad.run({**feeds, TARGET: targets[i : i + 1]})
            bwd.append(time.perf_counter() - t)
    finally:
        sessions.close()
    return float(np.median(fwd)), float(np.median(bwd))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--out", help="also write the results as Markdown to this file")
    args = p.parse_args(argv)
    model = MODELS / f"{args.model}.onnx"
    calib = MODELS / f"{args.model}_calib.npz"
    methods = {"laplace": {}, "fisher-mc": {"mc_samples": 4}, "hutchinson": {"probes": 4}}
    curv, times = {}, {}
    names: list[str] = []
    for method, options in methods.items():
        start = time.perf_counter()
        post = estimate_posterior(model, calib, method, calib_samples=args.samples, **options)
        times[method] = time.perf_counter() - start
        rows = post.summary()
        names = [r["name"] for r in rows]
        curv[method] = [r["mean_curvature"] for r in rows]
    table = render(["layer", *methods], [[n, *(f"{curv[m][i]:.4g}" for m in methods)] for i, n in enumerate(names)])
    rho_h = spearmanr(curv["laplace"], curv["hutchinson"]).statistic
    rho_f = spearmanr(curv["fisher-mc"], curv["hutchinson"]).statistic
    fwd, grad = per_sample_cost(model, calib, min(args.samples, 300))
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"# Posterior estimators on {args.model}",
        "",
        f"`python benchmarks/posterior_check.py --model {args.model} --samples {args.samples}`",
        "",
        f"bq-onnx {bq_onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}, {args.samples} calibration samples",
        "",
        "Mean curvature per layer (per sample; precision = N * curvature + prior):",
        "",
        "```",
        table,
        "```",
        "",
        f"- Spearman rank correlation of per-layer mean curvature, laplace vs hutchinson: {rho_h:.3f}",
        f"- Spearman rank correlation, fisher-mc vs hutchinson: {rho_f:.3f}",
        f"- one forward pass at batch 1: {1e3 * fwd:.3f} ms; one per-sample gradient (forward + backward graph): "
        f"{1e3 * grad:.3f} ms; ratio {grad / fwd:.2f}x",
        "- wall time: " + ", ".join(f"{m} {t:.2f} s" for m, t in times.items()),
        f"- peak resident memory of this process: {peak_mib:.0f} MiB",
        "",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
