"""Posterior estimators on a reference model: per-layer curvature, ranking agreement, cost.

Usage:  OPENBLAS_NUM_THREADS=1 python benchmarks/posterior_check.py [--model lenet] [--samples 500] [--batch 32]
        [--threads 1] [--out FILE.md]

Prints the mean curvature per layer for laplace, fisher-mc and hutchinson, the Spearman correlation of the
per-layer ranking between laplace and hutchinson (and fisher-mc), the cost of one per-sample gradient relative
to one forward pass (onnxruntime, exact settings; batched and one-sample-per-run forms, against a forward pass
at batch 1 and at the same batch), each estimator's wall time and the process's peak resident memory.

Each cost is the median of a block of runs; the blocks of all four measurements are taken in turn, five times,
and the least disturbed block of each is reported (on a shared machine a burst of other work otherwise lands on
the forward pass or on the gradient and moves their ratio either way: single medians of one block each gave
3.2x to 4.7x for the same LeNet code within minutes).
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
from bq_onnx.autodiff.loss import TARGET
from bq_onnx.calibration import load_calibration
from bq_onnx.estimators import estimate_posterior, prepare
from bq_onnx.estimators.base import Batch
from bq_onnx.estimators.batched import BatchedFisher, BatchedGraph
from bq_onnx.estimators.prepared import fp32_outputs, gradient_graph
from bq_onnx.graph import specialise
from bq_onnx.model_io import copy_model
from bq_onnx.probabilities import softmax
from bq_onnx.runtimes.sessions import TempSessions
from bq_onnx.table import render

MODELS = Path(__file__).resolve().parent.parent / "models"


#: Timing blocks per measured function, taken in turn (see :func:`_block_seconds`).
ROUNDS = 5


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _block_seconds(fns: dict, rounds: int = ROUNDS) -> dict[str, float]:
    """Per function (``name -> (fn, repeats)``): the median seconds of a block of ``repeats`` calls (after 3
    warm-up calls), the smallest over ``rounds`` blocks taken in turn (all functions once, then again). On a
    shared machine other processes slow down some blocks; the block least disturbed is reported, for the
    forward pass and the gradient alike, so their ratio does not depend on which of them a burst of load hit."""
    best = {name: float("inf") for name in fns}
    for _ in range(rounds):
        for name, (fn, repeats) in fns.items():
            for _ in range(3):
                fn()
            best[name] = min(best[name], _median_seconds(fn, repeats))
    return best


def per_sample_cost(model_path: Path, calib_path: Path, count: int, batch: int, threads: int | None
                    ) -> dict:
    """Seconds per sample (median of a block of runs, the least disturbed of :data:`ROUNDS` blocks taken in
    turn): forward at batch 1 and at ``batch``; per-sample gradient one sample per run (the fallback loop) and
    batched (what laplace and fisher-mc use: ``BatchedFisher``)."""
    prepared = prepare(model_path)
    calib = load_calibration(calib_path, prepared.model, count)
    sessions = TempSessions(threads)
    try:
        outputs = fp32_outputs(sessions, prepared, None, calib)
        targets = softmax(outputs)
        model = specialise(copy_model(prepared.model), next(calib.batches(1)))
        graph = gradient_graph(prepared, "kl", None, [w.name for w in prepared.weights], as_inputs=False,
                                model=model)
        loop = sessions.open(graph.model)
        forward = sessions.open(prepared.model)
        batched = BatchedGraph.build(sessions, prepared, calib, "kl", None, batch)
        assert batched is not None, "no weight can be batched"
        fisher = BatchedFisher(batched, calib, [targets], "laplace")
        covered = set(batched.covered)
        rest = [w.name for w in prepared.weights if w.name not in covered]
        rest_loop = None
        if rest:  # what the estimator runs one sample at a time besides the batched graph
            model = specialise(copy_model(prepared.model), next(calib.batches(1)))
            rest_loop = sessions.open(gradient_graph(prepared, "kl", None, rest, as_inputs=False, model=model).model)
        one = next(calib.batches(1))
        many = next(calib.batches(batch))

        def batched_step() -> None:
            fisher.update(Batch(slice(0, batch), 0))
            if rest_loop is not None:
                for i in range(batch):
                    rest_loop.run({**calib.select(slice(i, i + 1)), TARGET: targets[i : i + 1]})

        for _ in range(20):  # warm-up
            forward.run(one)
            loop.run({**one, TARGET: targets[:1]})
            batched_step()
        repeats = count
        seconds = _block_seconds({
            "forward_1": (lambda: forward.run(one), repeats),
            "forward_b": (lambda: forward.run(many), max(repeats // 4, 10)),
            "loop": (lambda: loop.run({**one, TARGET: targets[:1]}), repeats),
            "batched": (batched_step, max(repeats // 4, 10)),
        })
        return {
            "forward_1": seconds["forward_1"],
            "forward_b": seconds["forward_b"] / batch,
            "loop": seconds["loop"],
            "batched": seconds["batched"] / batch,
            "covered": len(covered),
            "weights": len(prepared.weights),
            "rest": rest,
        }
    finally:
        sessions.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--batch", type=int, default=32, help="samples per batched gradient run (default 32, "
                   "the estimators' default --batch-size)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads for the cost measurement (default "
                   "1: stable on a shared machine; 0 = onnxruntime's default); run with OPENBLAS_NUM_THREADS set "
                   "to the same number so numpy matches")
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
    cost = per_sample_cost(model, calib, min(args.samples, 300), args.batch, args.threads or None)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        f"# Posterior estimators on {args.model}",
        "",
        f"`OPENBLAS_NUM_THREADS={args.threads} python benchmarks/posterior_check.py --model {args.model} "
        f"--samples {args.samples} --batch {args.batch} --threads {args.threads}`",
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
        f"- cost of one per-sample gradient (laplace, fisher-mc: batched, {args.batch} samples per run, each "
        f"sample's weight gradients formed from its layer inputs and output gradients; {cost['covered']} of "
        f"{cost['weights']} weights batched"
        + (f", {', '.join(cost['rest'])} one sample per run, included" if cost["rest"] else "") + "): "
        f"{1e6 * cost['batched']:.1f} us per sample = **{cost['batched'] / cost['forward_1']:.2f}x one forward "
        f"pass at batch 1** ({1e6 * cost['forward_1']:.1f} us) and {cost['batched'] / cost['forward_b']:.2f}x "
        f"one sample's share of a forward pass at batch {args.batch} ({1e6 * cost['forward_b']:.1f} us); each time "
        f"the median of a block of runs, the least disturbed of {ROUNDS} blocks taken in turn",
        f"- one sample per run (the fallback for weights the batched form does not cover): "
        f"{1e6 * cost['loop']:.1f} us = {cost['loop'] / cost['forward_1']:.2f}x one forward pass at batch 1",
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
