"""Sharded posteriors: two accumulators of one stage, fed two halves of the calibration samples and merged, give
what one accumulator fed all of them gives (the seam for distributed calibration, issue 19).

Tolerance, as ``max |merged - whole| / max |whole|`` per weight: 1e-12 wherever the per-batch statistics are the
same (float64 sums added in another order: measured 0 to 8e-16), which holds for every stage when the split falls
on a batch boundary, and for the one-sample-per-run stages (``fisher-mc``/``laplace`` loop, ``kfac``) and
``activations`` anywhere. The batched Fisher split inside a batch forms other batches, whose float32 per-batch
sums round differently: 1e-6 there (measured 6e-9 on LeNet, 8e-8 on the tiny transformer). Hutchinson's probe
vectors come from a generator keyed by each batch's first sample, so its shards agree when they split on a batch
boundary, in whichever order they run (here the second first).

An accumulator's ``state()`` (its sums as arrays: what a shard file or a worker's reply holds), read back by the
stage's ``restore``, merges to exactly what the accumulators in memory merge to.
"""

from __future__ import annotations

import numpy as np
import pytest

from bq_onnx.calibration import load_calibration
from bq_onnx.config import PosteriorConfig
from bq_onnx.estimators import REGISTRY, PosteriorPart, Problem, prepare
from bq_onnx.estimators.batched import BatchedFisherStage
from bq_onnx.posterior import Spill
from bq_onnx.runtimes.sessions import TempSessions
from tests.conftest import MODELS

SAMPLES = 24
EXACT, BATCH_SPLIT = 1e-12, 1e-6


def _problem(model: str, opts: PosteriorConfig, sessions: TempSessions) -> Problem:
    prepared = prepare(MODELS / f"{model}.onnx")
    calib = load_calibration(MODELS / f"{model}_calib.npz", prepared.model, SAMPLES)
    return Problem(prepared, calib, opts, sessions, np.random.default_rng(opts.seed))


def _assert_close(whole: PosteriorPart, merged: PosteriorPart, tolerance: float) -> None:
    assert whole.curvature.keys() == merged.curvature.keys()
    assert whole.sources == merged.sources
    pairs = [(name, whole.curvature[name], merged.curvature[name]) for name in whole.curvature]
    pairs += [(name, a, b) for name in whole.factors for a, b in zip(whole.factors[name], merged.factors[name])]
    for name, a, b in pairs:
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= tolerance * np.abs(a).max(), name


@pytest.mark.parametrize(("model", "method", "options", "split", "tolerance"), [
    ("lenet", "laplace", {"batch_size": 8}, 16, EXACT),  # batched, split on a batch boundary
    ("lenet", "laplace", {"batch_size": 8}, 13, BATCH_SPLIT),  # batched, split inside a batch
    ("tiny_transformer", "laplace", {"batch_size": 8}, 13, BATCH_SPLIT),  # embedding lookups included
    ("lenet", "laplace", {"batch_size": 1}, 13, EXACT),  # one sample per run
    ("lenet", "fisher-mc", {"batch_size": 1, "mc_samples": 2}, 13, EXACT),
    ("lenet", "kfac", {"batch_size": 8, "mc_samples": 2}, 13, EXACT),
    ("tiny_transformer", "kfac", {"batch_size": 8}, 13, EXACT),
    ("lenet", "activations", {"batch_size": 8}, 13, EXACT),
    ("lenet", "hutchinson", {"batch_size": 8, "probes": 1}, 16, EXACT),  # one generator, batch boundary
])
def test_two_merged_shards_give_the_one_pass_posterior(model, method, options, split, tolerance):
    opts = PosteriorConfig(method=method, seed=5, **options)
    sessions = TempSessions(), TempSessions()
    try:
        one, two = (REGISTRY[method](_problem(model, opts, s)) for s in sessions)  # same seed: same draws
        stages = 0
        for whole_stage, shard_stage in zip(one.stages(), two.stages()):
            whole = whole_stage.run().finalize()
            second = shard_stage.run(range(split, SAMPLES))
            first = shard_stage.run(range(0, split))
            restored = shard_stage.restore(first.state()).merge(shard_stage.restore(second.state())).finalize()
            merged = first.merge(second).finalize()
            _assert_close(whole, merged, tolerance)
            _assert_close(merged, restored, 0.0)
            stages += 1
        assert stages
    finally:
        for s in sessions:
            s.close()


def test_a_shard_on_disk_merges_with_one_in_memory():
    """The batched Fisher keeps some layers' inputs and output gradients on disk; merging such a shard with one
    that summed in memory gives the same sums."""
    opts = PosteriorConfig(method="fisher-mc", batch_size=8, mc_samples=2)
    sessions = TempSessions()
    try:
        stage = next(REGISTRY["fisher-mc"](_problem("lenet", opts, sessions)).stages())
        assert isinstance(stage, BatchedFisherStage)
        whole = stage.run().finalize()
        on_disk = stage.accumulator()
        on_disk.spill, on_disk.batches = Spill(), 0  # every layer kept on disk
        for batch in stage.batches(range(0, 16)):
            on_disk.update(batch)
        assert on_disk.stored and not on_disk.sums
        in_memory = stage.run(range(16, SAMPLES))
        _assert_close(whole, on_disk.merge(in_memory).finalize(), EXACT)
        assert not on_disk.stored
    finally:
        sessions.close()
