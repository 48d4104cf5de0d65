"""Where ``optimize`` spends its CPU, function by function: cProfile over one in-process run.

Usage:  python -m benchmarks.profile_optimize [--model minilm-l3|lenet|PATH] [--calib-samples 128] [--top 25]
        [--out benchmarks/profile_optimize.md]

The model is optimized once with default options (verification on, as ``bq-onnx optimize`` does) after a warm-up
import, under :mod:`cProfile`; the report lists the functions with the most cumulative and the most own time, and
the quantizer design cache's hits and misses (:mod:`bq_onnx.quantizers.cache`). ``minilm-l3`` is
paraphrase-MiniLM-L3-v2 from its zoo wheel with template sentences (``benchmarks/zoo_models.py``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def inputs(model: str, samples: int) -> tuple[str, dict[str, np.ndarray] | str | None]:
    """(model path, calibration) for a name or a path."""
    if model == "minilm-l3":
        from benchmarks.zoo_models import ZOO

        return str(ZOO["minilm-l3"].path), ZOO["minilm-l3"].make("calib", samples)["feeds"]
    if model in ("lenet", "digits_mlp", "tiny_transformer"):
        return str(ROOT / "models" / f"{model}.onnx"), str(ROOT / "models" / f"{model}_calib.npz")
    return model, None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm-l3")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import bq_onnx
    from bq_onnx.quantizers import cache as design_cache

    path, calib = inputs(args.model, args.calib_samples)
    stats_seen: dict[str, int] = {}
    scope = design_cache.scope

    import contextlib

    @contextlib.contextmanager
    def counting_scope(spill=None):  # read the cache's counters before the run's scope empties them
        with scope(spill):
            try:
                yield
            finally:
                stats_seen.update(design_cache.stats())

    design_cache.scope = counting_scope
    import bq_onnx.pipeline

    bq_onnx.pipeline.design_cache = design_cache
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        profiler.enable()
        result = bq_onnx.optimize(path, calib=calib, calib_samples=args.calib_samples if calib is not None else None)
        result.save(Path(tmp) / "out.onnx")  # verified in onnxruntime, as the CLI does
        profiler.disable()
        wall = time.perf_counter() - start
    lines = [f"# Profile of `optimize` on {Path(path).name}", "",
             f"`python -m benchmarks.profile_optimize --model {args.model} --calib-samples {args.calib_samples} "
             f"--top {args.top}`", "",
             f"Default options, verification on; {wall:.1f} s wall under cProfile (load average "
             f"{os.getloadavg()[0]:.1f}; profiling slows pure-Python code more than numpy/onnxruntime calls). "
             f"Quantizer design cache: {stats_seen.get('hits', 0)} hits, {stats_seen.get('misses', 0)} misses.",
             ""]
    for key, title in (("cumulative", "most cumulative time"), ("tottime", "most own time")):
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).strip_dirs().sort_stats(key).print_stats(args.top)
        body = buf.getvalue()
        body = body[body.find("   ncalls"):] if "   ncalls" in body else body
        lines += [f"## {args.top} functions with the {title}", "", "```", body.rstrip(), "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
