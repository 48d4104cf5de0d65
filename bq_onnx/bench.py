"""``bq-onnx bench``: session-creation time, latency percentiles, throughput and peak memory per configuration.

Each configuration (model x runtime [x onnxruntime execution provider] x batch) is measured in a fresh Python
process (``python -m bq_onnx.bench --one CONFIG_JSON``), so the peak resident memory it reports
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that configuration alone. The first model is the
baseline (usually the FP32 original): every other model's rows carry latency and memory ratios against the
baseline's row with the same runtime, provider and batch.

Inputs are random (symbolic first dimension = batch, other symbolic dimensions = 16, seeded) or the first
``batch`` samples of ``calib`` (repeated when there are fewer). Runtimes run with their fast default settings
unless ``exact=True`` (onnxruntime ``accuracy_level 0``, OpenVINO f32), and the report says which.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from bq_onnx.config import BenchConfig
from bq_onnx.errors import EXIT_CODES, EXIT_LIMIT, BqError, UsageError
from bq_onnx.progress import progress

OTHER_SYMBOLIC_DIM = 16
_FLOAT = {"float32", "float16", "float64"}


def _rss_peak_mib() -> float:
    """Peak resident memory of this process. On Linux ``ru_maxrss`` survives ``execve`` (a child started by a big
    parent reports the parent's peak), so read ``VmHWM``, which belongs to the new address space."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def make_feeds(model_path: str, batch: int, calib: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Feeds for one run at ``batch``: random, or the first ``batch`` calibration samples (tiled when short)."""
    from bq_onnx.calibration import input_specs, load_calibration
    from bq_onnx.model_io import load_model

    model = load_model(model_path)
    if calib is not None:
        data = load_calibration(calib, model)
        return {k: np.ascontiguousarray(np.resize(v, (batch, *v.shape[1:]))) for k, v in data.arrays.items()}
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in input_specs(model):
        shape = [d if isinstance(d, int) else (batch if axis == 0 else OTHER_SYMBOLIC_DIM)
                 for axis, d in enumerate(spec.shape)]
        if spec.dtype.name in _FLOAT:
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif np.issubdtype(spec.dtype, np.integer):
            feeds[spec.name] = rng.integers(0, 4, size=shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = np.ones(shape, dtype=bool)
        else:
            feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
    return feeds


def measure_one(config: dict) -> dict:
    """Measure one configuration in this process (called in the child)."""
    from bq_onnx.runtimes import get_runtime

    rt = get_runtime(config["runtime"], config.get("provider"))
    feeds = make_feeds(config["model"], config["batch"], config.get("calib"))
    before = _rss_peak_mib()
    start = time.perf_counter()
    session = rt.session(config["model"], exact=config["exact"], threads=config.get("threads"))
    create_s = time.perf_counter() - start
    used = getattr(session, "providers", None)
    wanted = config.get("provider")
    if used is not None and wanted and wanted not in used:
        return {"status": "skipped", "reason": f"onnxruntime {wanted} has no usable device here (ran on "
                f"{', '.join(used)})"}
    for _ in range(config["warmup"]):
        session.run(feeds)
    times = []
    for _ in range(config["iterations"]):
        t0 = time.perf_counter()
        session.run(feeds)
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000.0
    peak = _rss_peak_mib()
    return {
        "status": "ok",
        "session_create_s": create_s,
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
                       "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean())},
        "throughput_per_s": config["batch"] * len(ms) / float(np.sum(times)) if np.sum(times) > 0 else None,
        "peak_rss_mib": peak,
        "model_rss_mib": max(peak - before, 0.0),
    }


def _run_child(config: dict, timeout: float | None) -> dict:
    cmd = [sys.executable, "-m", "bq_onnx.bench", "--one", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:g} s", "exit_code": EXIT_LIMIT}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = proc.stderr.strip().splitlines()
    why = err[-1] if err else f"child exited with {proc.returncode}"
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    code = proc.returncode if proc.returncode in EXIT_CODES and proc.returncode > 1 else 1  # the hard stop: 10
    return {"status": "failed", "reason": why.removeprefix("error: ")[:300], "exit_code": code}


def _child_main(config_json: str) -> int:
    from bq_onnx.budgets import set_max_memory
    from bq_onnx.limits import set_run_timeout

    config = json.loads(config_json)
    set_run_timeout(config.get("run_timeout"))  # the parent's run limits hold in the child
    set_max_memory(config.get("max_memory"))
    try:
        result = measure_one(config)
    except BqError as exc:
        result = {"status": "failed", "reason": str(exc), "exit_code": exc.exit_code}
    print(json.dumps(result))
    return 0


def benchmark(
    models: Sequence[str | os.PathLike],
    *,
    config: BenchConfig | None = None,
    calib: str | os.PathLike | None = None,
    timeout: float | None = 600,
    progress_bar: bool = False,
    **options: Any,
) -> dict:
    """Measure every model x runtime (x onnxruntime provider) x batch; the first model is the baseline.

    What is measured and how is a :class:`~bq_onnx.config.BenchConfig` (``config``, or its fields as keywords:
    ``runtimes``, ``providers``, ``batches``, ``threads``, ``warmup``, ``iterations``, ``exact``), parsed and
    checked as the CLI's flags are. ``providers`` are ``--ep`` names (``cpu``, ``cuda``, ``tensorrt``, ``rocm``,
    ``migraphx`` or full onnxruntime provider names) and apply to onnxruntime only; OpenVINO runs on CPU.
    Unavailable runtimes and providers are reported under ``skipped`` with the reason. ``progress_bar``: a bar on
    stderr counting the configurations measured, with the time left.
    """
    from bq_onnx.budgets import memory_budget
    from bq_onnx.calibration import load_calibration
    from bq_onnx.limits import run_timeout
    from bq_onnx.model_io import load_model
    from bq_onnx.runtimes import get_runtime
    from bq_onnx.runtimes.ort import provider_names

    config = BenchConfig(**options) if config is None else dataclasses.replace(config, **options)
    if not models:
        raise UsageError("bench needs at least one model")
    runtimes, batches, threads = config.runtimes, config.batches, config.threads
    warmup, iterations, exact = config.warmup, config.iterations, config.exact
    paths = [os.fspath(m) for m in models]
    for path in paths:  # one-line errors for missing/bad models and calibration data before any measuring
        model = load_model(path)
        if calib is not None:
            load_calibration(calib, model)
    calib = os.fspath(calib) if calib is not None else None
    eps = provider_names(list(config.providers) or None)
    targets = []  # (runtime name, provider or None, reason when unavailable)
    for name in runtimes:
        rt = get_runtime(name)
        if rt.name == "onnxruntime":
            for ep in eps:
                ok, why = get_runtime("onnxruntime", ep).available()
                targets.append((rt.name, ep, "" if ok else why))
        else:
            ok, why = rt.available()
            targets.append((rt.name, None, "" if ok else why))
    report: dict = {
        "settings": "exact (onnxruntime accuracy_level 0, OpenVINO f32)" if exact else
        "fast (runtime defaults: onnxruntime MatMulNBits accuracy_level 4, OpenVINO default precision)",
        "exact": exact,
        "baseline": paths[0],
        "batches": list(batches),
        "threads": threads,
        "warmup": warmup,
        "iterations": iterations,
        "inputs": f"calibration data {calib}" if calib else
        f"random (symbolic batch dimension = batch, other symbolic dimensions = {OTHER_SYMBOLIC_DIM})",
        "results": [],
        "skipped": [],
    }
    for runtime, ep, why in targets:
        if why:
            report["skipped"].append({"runtime": runtime, "provider": ep, "reason": why})
    available = [(r, ep) for r, ep, why in targets if not why]
    configurations = [(path, runtime, ep, batch) for path in paths for runtime, ep in available for batch in batches]
    for path, runtime, ep, batch in progress(configurations, "bench", progress_bar, unit="configurations"):
        config = {"model": path, "runtime": runtime, "provider": ep, "batch": int(batch),
                  "threads": threads, "warmup": warmup, "iterations": iterations, "exact": exact,
                  "calib": calib, "run_timeout": run_timeout(), "max_memory": memory_budget()}
        row = {"model": path, "runtime": runtime, "provider": ep, "batch": int(batch),
               **_run_child(config, timeout)}
        report["results"].append(row)
    base = {(r["runtime"], r["provider"], r["batch"]): r for r in report["results"]
            if r["model"] == paths[0] and r["status"] == "ok"}
    for row in report["results"]:
        ref = base.get((row["runtime"], row["provider"], row["batch"]))
        ok = row["status"] == "ok" and ref is not None
        row["latency_ratio"] = row["latency_ms"]["p50"] / ref["latency_ms"]["p50"] \
            if ok and ref["latency_ms"]["p50"] > 0 else None
        row["memory_ratio"] = row["peak_rss_mib"] / ref["peak_rss_mib"] if ok and ref["peak_rss_mib"] > 0 else None
    for row in list(report["results"]):
        if row["status"] == "skipped":  # a provider that is installed but has no device
            report["skipped"].append({"runtime": row["runtime"], "provider": row["provider"],
                                      "reason": row["reason"], "model": row["model"], "batch": row["batch"]})
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        sys.exit(_child_main(sys.argv[2]))
    sys.exit("usage: python -m bq_onnx.bench --one CONFIG_JSON (internal; use `bq-onnx bench`)")
