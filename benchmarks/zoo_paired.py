"""Two zoo outputs compared sample by sample: is one cell of ``benchmarks/zoo.py`` really worse than another?

Usage:  python -m benchmarks.zoo_paired --model silero-vad --pairs bq-calib-3.5:bq-uniform-stored-3.5[,A:B ...]
        [--setting compact-default] [--eval 384] [--out benchmarks/zoo_paired.md]

The zoo scores 96 evaluation samples and prints one figure per cell; two cells a point apart can be noise. Here the
outputs ``benchmarks/zoo.py`` left in ``benchmarks/.cache/zoo/MODEL/SETTING/CONFIG.onnx`` (nothing is quantized)
run on ``--eval`` samples of the same evaluation split (its first 96 are the zoo's), and for each pair A:B:

* the primary metric per sample (the model's own ``score`` on each sample alone), its mean for A and B and the
  paired difference A - B with its standard error (``std / sqrt(n)``): a difference within about two standard
  errors is not shown by these samples;
* one step of each model on calibration-style inputs (``calib_feeds`` of evaluation samples: for a model whose
  state is fed back, the FP32 state at every step), per float output: the relative squared error to FP32
  (``sum (y - y_fp32)^2 / sum y_fp32^2``). What the guard's held-out loss sees is one such step of the loss's
  output; a carried state's error, which builds up over a stream, is the other outputs' rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import exact_session as session  # noqa: E402
from zoo import OUT_CACHE  # noqa: E402
from zoo_models import ZOO  # noqa: E402

from benchmarks.lenet_budgets import write_report  # noqa: E402


def subset(value: Any, i: int, n: int) -> Any:
    """Sample ``i`` of a zoo data object or prediction (arrays and lists of ``n`` samples are indexed; a dict is
    subset member by member; anything else is kept)."""
    if isinstance(value, dict):
        return {k: subset(v, i, n) for k, v in value.items()}
    if isinstance(value, (np.ndarray, list)) and len(value) == n:
        return value[i:i + 1]
    return value


def per_sample(model, pred: Any, ref: Any, data: dict, n: int) -> np.ndarray:
    """The primary metric of each sample scored alone."""
    return np.array([model.score(subset(pred, i, n), subset(ref, i, n), subset(data, i, n))[model.primary]
                     for i in range(n)])


def one_step_errors(model, paths: dict[str, Path], n: int) -> dict[str, dict[str, float]]:
    """Per output name, each model's relative squared error to FP32 over one step on calibration-style feeds."""
    feeds = model.calib_feeds(model.make("eval", n))
    fp32 = session(model.path)
    names = [o.name for o in fp32.get_outputs()]
    ref = [fp32.run(None, f) for f in feeds]
    out: dict[str, dict[str, float]] = {}
    for label, path in paths.items():
        s = session(path)
        runs = [s.run(None, f) for f in feeds]
        for k, name in enumerate(names):
            r = [np.asarray(x[k], np.float64) for x in ref]
            if r[0].dtype.kind != "f":
                continue
            err = sum(float(((np.asarray(y[k], np.float64) - x) ** 2).sum()) for y, x in zip(runs, r))
            out.setdefault(name, {})[label] = err / max(sum(float((x ** 2).sum()) for x in r), 1e-30)
    return out


def compare(name: str, setting: str, pairs: list[tuple[str, str]], n: int) -> list[str]:
    model = ZOO[name]
    folder = OUT_CACHE / name / setting
    data = model.make("eval", n)
    ref = model.predict(session(model.path), data)
    configs = list(dict.fromkeys(c for pair in pairs for c in pair))
    paths = {c: folder / f"{c}.onnx" for c in configs}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise SystemExit(f"not in the cache (run benchmarks/zoo.py first): {', '.join(missing)}")
    scores = {c: per_sample(model, model.predict(session(p), data), ref, data, n) for c, p in paths.items()}
    lines = [f"## {name} ({setting}): {model.primary} on {n} evaluation samples", "",
             f"| A | B | A {model.primary} | B {model.primary} | A - B | standard error | A on the zoo's 96 | "
             f"B on the zoo's 96 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for a, b in pairs:
        d = scores[a] - scores[b]
        lines.append(f"| {a} | {b} | {scores[a].mean():.4f} | {scores[b].mean():.4f} | {d.mean():+.4f} | "
                     f"{d.std(ddof=1) / np.sqrt(n):.4f} | {scores[a][:96].mean():.4f} | {scores[b][:96].mean():.4f} |")
    steps = one_step_errors(model, paths, min(n, 32))
    lines += ["", f"One step on calibration-style feeds of {min(n, 32)} evaluation samples: relative squared error "
              "to FP32 per output.", "", "| output | " + " | ".join(configs) + " |",
              "|---|" + "---:|" * len(configs)]
    for output, row in steps.items():
        lines.append(f"| {output} | " + " | ".join(f"{row[c]:.5f}" for c in configs) + " |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, action="append", help="zoo model (repeatable)")
    p.add_argument("--pairs", required=True, help="A:B[,A:B ...] config names of cached outputs")
    p.add_argument("--setting", default="compact-default", help="the cache folder: FORMAT-TARGET[-OPTIONS]")
    p.add_argument("--eval", type=int, default=384, help="evaluation samples (the zoo's 96 are the first)")
    p.add_argument("--out", help="write the markdown report here (else stdout)")
    args = p.parse_args(argv)
    pairs = [tuple(pair.split(":", 1)) for pair in args.pairs.split(",")]
    command = "python -m benchmarks.zoo_paired" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    lines = [__doc__.split("\n\n")[0], "", f"Command: `{command}`", ""]
    for name in args.model:
        lines += compare(name, args.setting, pairs, args.eval)
    write_report(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
