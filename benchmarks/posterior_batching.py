"""Which weights the posterior's batched per-sample gradients cover on the zoo's models, and how far the batched
posterior is from one sample per run, against how far two seeds of one sample per run are from each other (the
Laplace targets are drawn per batch, so batched and per-run estimates differ by that noise, not by a bias).

Usage: ``python -m benchmarks.posterior_batching [--models minilm-l3,ppocr-cls] [--samples 128]``
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.zoo import ZOO
from bq_onnx.calibration import load_calibration
from bq_onnx.config import WeightsConfig
from bq_onnx.estimators import estimate_posterior, prepare
from bq_onnx.graph import batch_major_weights
from bq_onnx.model_io import copy_model, load_model


def _distance(a, b) -> tuple[float, float]:
    """Relative L2 distance and the ratio of sums of two curvature arrays."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    norm = np.linalg.norm(y)
    return (float(np.linalg.norm(x - y) / norm) if norm else 0.0), (float(x.sum() / y.sum()) if y.sum() else 1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm-l3,ppocr-cls")
    p.add_argument("--samples", type=int, default=128)
    args = p.parse_args(argv)
    print("| model | batched weights | batched vs per run: rel. L2 (min..max) | sums | per run seed 1 vs seed 0: "
          "rel. L2 (min..max) | sums |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        spec = ZOO[name]
        feeds = spec.make("calib", args.samples)["feeds"]
        prepared = prepare(load_model(spec.path), WeightsConfig())
        calib = load_calibration(feeds, prepared.model)
        batched_names = batch_major_weights(copy_model(prepared.model), prepared.weights, calib)
        batched = estimate_posterior(spec.path, feeds, "laplace", seed=0)
        runs = [estimate_posterior(spec.path, feeds, "laplace", batch_size=1, seed=s) for s in (0, 1)]
        cells = []
        for other in (batched, runs[1]):
            d = [_distance(other.weights[w].curvature, runs[0].weights[w].curvature) for w in runs[0].weights]
            l2, sums = [x for x, _ in d], [y for _, y in d]
            cells += [f"{min(l2):.3f}..{max(l2):.3f}", f"{min(sums):.3f}..{max(sums):.3f}"]
        print(f"| {name} | {len(batched_names)} of {len(prepared.weights)} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
