"""The posterior over several processes (issue 19): shard files merged, ``--workers`` and ``--ray`` give what one
process gives (the tables by weight: also ``tests/test_distributed_tables.py``).

Tolerances. ``--workers`` and ``--ray`` run the shards one process runs (of ``BQ_ONNX_SHARD_SAMPLES`` samples;
8 or 16 here so that LeNet's calibration makes several) and merge them in the same order, so the posterior is
compared with ``array_equal`` and the optimized model byte for byte. ``--shard I/N`` splits on other boundaries
than the one-process run (N ranges of whole batches) and adds the same per-batch float64 sums in another order:
``max |merged - whole| <= 1e-12 * max |whole|`` per array (float64 rounding is 1.1e-16 per add; LeNet's 48
samples are a few dozen adds, measured 3e-18), far below any difference a wrong sum would make.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import onnx
import pytest

from bq_onnx import distributed as dist
from bq_onnx.cli import main
from bq_onnx.distributed import estimate_posterior
from bq_onnx.errors import LimitError
from tests.conftest import MODELS

MODEL, CALIB = MODELS / "lenet.onnx", MODELS / "lenet_calib.npz"
FLOAT64_ORDER = 1e-12


def _run(argv, capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _arrays(path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files if k != "__header__"}


def _assert_close(whole: dict, merged: dict, tolerance: float) -> None:
    assert whole.keys() == merged.keys()
    for key in whole:
        a, b = whole[key].astype(np.float64), merged[key].astype(np.float64)
        assert np.abs(a - b).max() <= tolerance * np.abs(a).max(), key


@pytest.mark.parametrize(("method", "options"), [
    ("laplace", ["--batch-size", "8"]),  # the batched Fisher
    ("fisher-mc", ["--batch-size", "1", "--mc-samples", "2"]),  # one sample per run, two target draws
    ("kfac", ["--batch-size", "8"]),
    ("hutchinson", ["--batch-size", "8", "--probes", "1"]),  # probes keyed by batch: the same in every shard
    ("activations", ["--batch-size", "8"]),
])
def test_shards_merged_give_the_one_process_posterior(tmp_path, capsys, method, options):
    common = [MODEL, "--calib", CALIB, "--calib-samples", "48", "--method", method, "--seed", "3", *options, "-q"]
    assert _run(["posterior", *common, "-o", tmp_path / "whole.npz"], capsys)[0] == 0
    shards = []
    for i in range(3):
        shards.append(tmp_path / f"s{i}.npz")
        assert _run(["posterior", *common, "--shard", f"{i}/3", "-o", shards[-1]], capsys)[0] == 0
    merged = tmp_path / "merged.npz"
    code, text = _run(["posterior", *common, "--merge", *reversed(shards), "-o", merged], capsys)  # any order
    assert code == 0, text
    _assert_close(_arrays(tmp_path / "whole.npz"), _arrays(merged), FLOAT64_ORDER)


def test_mismatched_or_missing_shards_are_refused(tmp_path, capsys):
    common = [MODEL, "--calib", CALIB, "--calib-samples", "32", "--batch-size", "8", "-q"]
    for i in range(2):
        assert _run(["posterior", *common, "--shard", f"{i}/2", "-o", tmp_path / f"s{i}.npz"], capsys)[0] == 0
    assert _run(["posterior", *common, "--method", "kfac", "--shard", "1/2", "-o", tmp_path / "k1.npz"],
                capsys)[0] == 0
    assert _run(["posterior", *common, "--calib-samples", "16", "--shard", "0/3", "-o", tmp_path / "t.npz"],
                capsys)[0] == 2  # 16 samples make 2 shards of whole batches, not 3
    out = tmp_path / "post.npz"
    cases = [
        (["--merge", tmp_path / "s0.npz", tmp_path / "k1.npz"], "other options"),
        (["--method", "kfac", "--merge", tmp_path / "s0.npz", tmp_path / "s1.npz"], "other options"),
        (["--calib-samples", "24", "--merge", tmp_path / "s0.npz", tmp_path / "s1.npz"], "other calibration"),
        (["--merge", tmp_path / "s0.npz"], "1/2 missing"),
        (["--merge", tmp_path / "s0.npz", tmp_path / "s0.npz", tmp_path / "s1.npz"], "given twice"),
        (["--merge", CALIB], "not a posterior shard file"),
    ]
    for extra, why in cases:
        code, text = _run(["posterior", *common, *extra, "-o", out], capsys)
        assert code == 5, text
        assert why in text and len(text.strip().splitlines()) == 1, text
        assert not out.exists()
    other = tmp_path / "other.onnx"
    proto = onnx.load(MODEL)
    proto.doc_string = "another file"  # the same graph and weights; its sha256 differs
    onnx.save(proto, other)
    code, text = _run(["posterior", other, *common[1:], "--merge", tmp_path / "s0.npz", tmp_path / "s1.npz",
                       "-o", out], capsys)
    assert code == 5 and "another model" in text, text
    code, text = _run(["posterior", *common, "--merge", tmp_path / "s0.npz", tmp_path / "s1.npz", "-o",
                       tmp_path / "s1.npz", "--force"], capsys)  # never overwrites an input
    assert code == 7, text
    assert _run(["posterior", *common, "--merge", tmp_path / "s0.npz", tmp_path / "s1.npz", "-o", out],
                capsys)[0] == 0


def test_two_workers_give_the_same_bytes(tmp_path, capsys, monkeypatch):
    """Shards of 16 samples: 48 samples make 3, two run here, one in a spawned worker."""
    monkeypatch.setenv("BQ_ONNX_SHARD_SAMPLES", "16")
    common = [MODEL, "--calib", CALIB, "--calib-samples", "48", "--bits", "5", "-q"]
    assert _run(["optimize", *common, "-o", tmp_path / "one.onnx"], capsys)[0] == 0
    code, text = _run(["optimize", *common, "--workers", "2", "-o", tmp_path / "two.onnx"], capsys)
    assert code == 0, text
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
    assert not list(tmp_path.glob(".bq-tmp-*"))


def test_a_killed_worker_is_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("BQ_ONNX_SHARD_SAMPLES", "8")
    marker = tmp_path / "killed"
    options = {"calib_samples": 24, "batch_size": 8, "method": "kfac", "seed": 1}
    one = estimate_posterior(MODEL, CALIB, **options)
    monkeypatch.setenv(dist.FAULT_ENV, str(marker))
    two = estimate_posterior(MODEL, CALIB, workers=2, **options)
    assert marker.exists()  # the worker was killed once, then its shard ran again
    for name, wp in one.weights.items():
        assert np.array_equal(wp.curvature, two.weights[name].curvature), name
        assert np.array_equal(wp.kfac[0], two.weights[name].kfac[0]), name


def test_a_worker_that_keeps_dying_fails_the_run_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BQ_ONNX_SHARD_SAMPLES", "8")
    monkeypatch.setenv(dist.FAULT_ENV, "always")
    out = tmp_path / "post.npz"
    code, text = _run(["posterior", MODEL, "--calib", CALIB, "--calib-samples", "16", "--workers", "2", "-o", out],
                      capsys)
    assert code == LimitError.exit_code, text
    assert f"died {dist.RETRIES + 1} times" in text and len(text.strip().splitlines()) == 1, text
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_distribution_options_are_one_line_usage_errors(tmp_path, capsys):
    common = [MODEL, "--calib", CALIB, "-o", tmp_path / "p.npz"]
    for extra in (["--workers", "0"], ["--workers", "2", "--ray"], ["--shard", "3/3"], ["--shard", "x"],
                  ["--shard", "0/2", "--workers", "2"], ["--shard", "0/2", "--merge", tmp_path / "a.npz"]):
        code, text = _run(["posterior", *common, *extra], capsys)
        assert code == 2 and len(text.strip().splitlines()) == 1, (extra, text)
    assert not list(tmp_path.iterdir())


def test_ray_tasks_give_the_one_process_posterior_and_tables(tmp_path, monkeypatch):
    """A local Ray instance with 2 CPUs, started here; its first task is killed after its shard and Ray runs it
    again (the fault variable is set before Ray starts, so its workers see it). Then the marker is removed (armed
    again) and an optimize with that posterior runs its tables as Ray tasks (one per CPU), the first killed once:
    the model is the one-process model's bytes."""
    ray = pytest.importorskip("ray")
    import bq_onnx

    monkeypatch.setenv("BQ_ONNX_SHARD_SAMPLES", "8")
    options = {"calib_samples": 24, "batch_size": 8, "method": "laplace", "seed": 2}
    one = estimate_posterior(MODEL, CALIB, **options)
    one.save(tmp_path / "posterior.npz")
    outputs = {"one": bq_onnx.optimize(MODEL, posterior=tmp_path / "posterior.npz", bits=3)}
    marker = tmp_path / "killed"
    monkeypatch.setenv(dist.FAULT_ENV, str(marker))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        two = estimate_posterior(MODEL, CALIB, ray=True, **options)
        assert marker.exists()
        marker.unlink()
        outputs["ray"] = bq_onnx.optimize(MODEL, posterior=tmp_path / "posterior.npz", bits=3, ray=True)
        assert marker.exists()
    finally:
        ray.shutdown()
    for name, wp in one.weights.items():
        assert np.array_equal(wp.curvature, two.weights[name].curvature), name
    for key, result in outputs.items():
        result.save(tmp_path / f"{key}.onnx", verify=False)
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "ray.onnx").read_bytes()


def test_shards_of_a_fixed_batch_model_hold_whole_runs(tmp_path, monkeypatch):
    """A model that takes 2 samples per run: shards of 3 samples are rounded up to 4 (two whole runs)."""
    from bq_onnx.calibration import load_calibration
    from bq_onnx.model_io import load_model
    from tests.test_calibration_any_graph import _images, fixed_model

    path = tmp_path / "two.onnx"
    onnx.save(fixed_model(batch=2), path)
    calib = load_calibration({"x": _images(8)}, load_model(path), axes={"x": 0})
    posteriors = []
    for size in ("3", "4"):
        monkeypatch.setenv("BQ_ONNX_SHARD_SAMPLES", size)
        posteriors.append(estimate_posterior(path, calib, "kfac", seed=0))
    for name, wp in posteriors[0].weights.items():
        assert np.array_equal(wp.curvature, posteriors[1].weights[name].curvature), name


def _job(tmp_path, samples: int, **options) -> dist.Job:
    """A worker's job for the test model's first ``samples`` calibration samples, written under ``tmp_path``."""
    from bq_onnx.calibration import load_calibration
    from bq_onnx.config import PosteriorConfig
    from bq_onnx.estimators import prepare

    prepared = prepare(MODEL)
    calib = load_calibration(CALIB, prepared.model, samples)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    return dist.write_job(prepared, calib, PosteriorConfig(**options), scratch)


def test_a_worker_without_the_scratch_folder_reads_the_files_it_was_sent(tmp_path):
    """What a Ray worker on another machine (no shared filesystem) does with the files from the object store: the
    shard it computes is the one a worker reading the scratch folder computes."""
    from bq_onnx.estimators.driver import Task

    job = _job(tmp_path, 16, method="kfac", batch_size=8)
    files = dist.bundle(job)
    assert files is not None and "model.onnx" in files
    here = dist.run_shard(job, Task("main", 0), (8, 16))
    elsewhere = dataclasses.replace(job, key="other", model=str(tmp_path / "gone" / "model.onnx"),
                                    calib=str(tmp_path / "gone" / "calibration"), scratch=str(tmp_path / "gone"))
    moved = dist.materialized(elsewhere, {k: v for k, v in files.items()})
    assert os.path.exists(moved.model) and not moved.model.startswith(str(tmp_path))
    there = dist.run_shard(elsewhere, Task("main", 0), (8, 16), None, files)
    assert here.keys() == there.keys()
    assert all(np.array_equal(here[k], there[k]) for k in here)
    dist.run_shard(job, Task("main", 0), (0, 1))  # the worker drops the other job's state
    assert list(dist._WORKER) == [job.key]
    dist._WORKER.pop(job.key).close()


def test_workers_run_under_the_masters_limits(tmp_path):
    """A worker process creates sessions and runs the model too: the master's --run-timeout and --max-memory
    travel in the job and are set in the worker before anything runs."""
    from bq_onnx import budgets, limits
    from bq_onnx.estimators.driver import Task

    with limits.run_limits(timeout=7.5, max_memory="3G"):
        job = _job(tmp_path, 8, method="laplace", batch_size=8)
    assert (job.run_timeout, job.max_memory) == (7.5, 3 * 2**30)
    saved = budgets.max_memory_set()
    try:
        dist.run_shard(job, Task("main", 0), (0, 8))  # builds this process's worker from the job
        assert limits.run_timeout() == 7.5 and budgets.max_memory_set() == 3 * 2**30
    finally:
        dist._WORKER.pop(job.key).close()
        limits.set_run_timeout(None)
        budgets.set_max_memory(saved)


def test_ray_is_imported_only_when_asked(tmp_path):
    """``ray`` is an optional extra: the CLI, the API and the distributed module load without it, and a run with
    ``--workers`` never imports it (a fresh interpreter: this one may have imported it for the Ray test)."""
    import subprocess
    import sys

    code = ("import sys; import bq_onnx, bq_onnx.cli, bq_onnx.distributed; "
            "from bq_onnx.cli import main; "
            f"assert main(['posterior', {str(MODEL)!r}, '--calib', {str(CALIB)!r}, '--calib-samples', '16', "
            f"'--workers', '2', '-q', '-o', {str(tmp_path / 'p.npz')!r}]) == 0; "
            "print('ray' in sys.modules)")
    env = dict(os.environ, BQ_ONNX_SHARD_SAMPLES="8")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr
    assert (tmp_path / "p.npz").exists()
