"""CPU seconds of the pieces of work ``optimize`` now does once or more cheaply on paraphrase-MiniLM-L3-v2, each
against the way it was done before, in one process (``time.process_time``: the CPU time of this process, much
less sensitive than wall time to a loaded shared machine; threads' CPU is summed, so the quantizer's thread
balance shows in wall time only).

Usage: ``python -m benchmarks.speed_reuse [--repeat 3]``; prints a markdown table (minimum over the repeats).

* squared-gradient sums: 96 per-sample updates of the model's weights' shapes, the word embedding's gradient
  zero outside 24 token rows (a calibration sentence), as :class:`~bq_onnx.posterior.SumAccumulator` ``update``
  of the squares (before) and :func:`~bq_onnx.estimators.squared_gradients.add_squares` (now);
* design-cache keys: the word embedding's view (float32) and importance (float64) hashed with blake2b (before)
  and :func:`bq_onnx.quantizers.cache.digest` (now), 10 times each;
* a session of the FP32 model created (what the guard's fit-split measure, and two candidates, no longer
  create: :class:`~bq_onnx.runtimes.sessions.TempSessions` shares them);
* the source read and prepared for verify's references (now once instead of twice);
* onnxruntime runs of the model (4 batches of 32 template sentences, 3 times) with idle intra-op threads spinning
  (before) and sleeping (now: :func:`bq_onnx.runtimes.ort.no_spinning`, the measuring sessions' setting);
* 9 rounds (one per spending of the budget on MiniLM-L3 at default options) of every weight's view and importance
  (a posterior of the weights and random precisions) with their design-cache digests, made every round (before)
  and kept for the run (now: :func:`bq_onnx.quantizers.cache.kept`).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import numpy as np


def cpu(fn: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    import onnx

    from benchmarks.zoo_models import ZOO
    from bq_onnx.config import OptimizeConfig
    from bq_onnx.context import Context
    from bq_onnx.estimators.squared_gradients import add_squares
    from bq_onnx.posterior import SumAccumulator
    from bq_onnx.quantizers import cache
    from bq_onnx.runtimes import get_runtime
    from bq_onnx.verify import prepared_reference

    path = ZOO["minilm-l3"].path
    proto = onnx.load(str(path))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    shapes = [a.shape for a in inits.values() if a.ndim == 2 and a.size >= 128 * 128]
    table = max(shapes, key=lambda s: s[0] * s[1])
    rng = np.random.default_rng(0)
    grads = []
    for _ in range(4):  # four distinct samples, cycled over the 96 updates
        sample = {f"w{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes) if s != table}
        g = np.zeros(table, dtype=np.float32)
        g[rng.choice(table[0], 24, replace=False)] = rng.standard_normal((24, table[1])).astype(np.float32)
        sample["table"] = g
        grads.append(sample)

    def sums_before() -> None:
        acc = SumAccumulator()
        for i in range(96):
            acc.update({w: np.square(g) for w, g in grads[i % 4].items()})

    def sums_now() -> None:
        acc = SumAccumulator()
        for i in range(96):
            add_squares(acc, grads[i % 4], 1)

    emb = next(a for a in inits.values() if a.shape == table).astype(np.float32)
    view, importance = np.ascontiguousarray(emb.T), rng.gamma(1.0, 1.0, emb.T.shape)

    def hash_before() -> None:
        for _ in range(10):
            for a in (view, importance):
                hashlib.blake2b(np.ascontiguousarray(a).view(np.uint8).reshape(-1), digest_size=16).digest()

    def hash_now() -> None:
        for _ in range(10):
            cache._recent.clear()
            cache.digest(view)
            cache.digest(importance)

    rt = get_runtime("onnxruntime")
    ctx = Context(OptimizeConfig())
    runs = _ort_runs(path)
    views_before, views_now = _view_rounds(path)
    rows = [
        ("squared-gradient sums, 96 samples", cpu(sums_before, args.repeat), cpu(sums_now, args.repeat)),
        ("design-cache keys, 10 x (view + importance)", cpu(hash_before, args.repeat), cpu(hash_now, args.repeat)),
        ("one FP32 session (3 no longer created)", cpu(lambda: rt.session(path, exact=True), args.repeat), 0.0),
        ("verify: source read and prepared", 2 * cpu(lambda: prepared_reference(path, ctx), args.repeat),
         cpu(lambda: prepared_reference(path, ctx), args.repeat)),
        ("onnxruntime: 12 runs of 32 sentences", cpu(runs(True), args.repeat), cpu(runs(False), args.repeat)),
        ("9 rounds of weight views + digests", cpu(views_before, args.repeat), cpu(views_now, args.repeat)),
    ]
    print("| piece | before (CPU s) | now (CPU s) |")
    print("|---|---:|---:|")
    for name, before, now in rows:
        print(f"| {name} | {before:.2f} | {now:.2f} |")
    return 0


def _ort_runs(path) -> Callable[[bool], Callable[[], None]]:
    """A function of ``spin`` that runs the model 12 times on template sentences in one session."""
    import onnxruntime as ort

    from benchmarks.zoo_models import ZOO
    from bq_onnx.runtimes.ort import no_spinning

    feeds = ZOO["minilm-l3"].make("calib", 128)["feeds"]
    batches = [{k: v[i:i + 32] for k, v in feeds.items()} for i in range(0, 128, 32)]

    def runs(spin: bool) -> Callable[[], None]:
        options = ort.SessionOptions()
        options.log_severity_level = 4
        if not spin:
            no_spinning(options)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, batches[0])

        def go() -> None:
            for _ in range(3):
                for b in batches:
                    session.run(None, b)

        return go

    return runs


def _view_rounds(path) -> tuple[Callable[[], None], Callable[[], None]]:
    """(before, now): 9 rounds of :func:`bq_onnx.weights.weight_view` and the digests of its arrays for every
    weight, without and with the arrays kept for the run."""
    from bq_onnx.config import OptimizeConfig
    from bq_onnx.context import Context
    from bq_onnx.model_io import load_model
    from bq_onnx.posterior import Posterior, WeightPosterior
    from bq_onnx.quantizers import cache
    from bq_onnx.stages.weights import find_weights
    from bq_onnx.weights import weight_view

    model = load_model(path)
    infos = find_weights(model, OptimizeConfig().weights).weights
    rng = np.random.default_rng(1)
    posterior = Posterior("laplace", 96, 1.0, {
        info.name: WeightPosterior(info.value.const_value.numpy(), None,
                                   rng.gamma(1.0, 1.0, info.value.const_value.shape), "test") for info in infos})
    ctx = Context(OptimizeConfig(), weights=infos, posterior=posterior)

    def rounds(keep: bool) -> Callable[[], None]:
        def go() -> None:
            kept = cache.MAX_KEPT_BYTES
            cache.MAX_KEPT_BYTES = kept if keep else -1
            try:
                with cache.scope():
                    for _ in range(9):
                        for info in infos:
                            view, importance = weight_view(ctx, info)
                            cache.digest(view)
                            cache.digest(importance)
            finally:
                cache.MAX_KEPT_BYTES = kept

        return go

    return rounds(False), rounds(True)


if __name__ == "__main__":
    raise SystemExit(main())
