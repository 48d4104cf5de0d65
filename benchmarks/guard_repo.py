"""The guard on the repository's own models: greedy with calibration against uniform at equal stored budgets.

Usage:  python benchmarks/guard_repo.py [--bits 4,3.5,3] [--format compact] [--out benchmarks/guard_repo.md]

Per model (``models/lenet.onnx``, ``digits_mlp.onnx``, ``tiny_transformer.onnx``) and budget (stored bits per
weight): greedy with the model's calibration file (the guard holds out a quarter of it), the same with
``--no-guard``, and ``--allocator uniform`` (with a whole budget that is the fixed grid width, which stores more
than the budget: scales and zero points come on top; the guard's own uniform reference, the single width the
budget buys, is the "uniform measured" column). Test accuracy on the test split of ``models/<name>_data.npz`` (disjoint
from the calibration samples; onnxruntime, exact int4 MatMul), the stored bits per weight counted from the file
(``bq_onnx.counting``), and
the guard's figures: the loss the tables predicted (scaled by uniform's measured/predicted ratio), the loss
measured on the held-out samples, uniform's, the repair rounds and what was written.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bq_onnx
from bq_onnx.counting import count
from bq_onnx.errors import BqError

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("lenet", "digits_mlp", "tiny_transformer")


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(-1) == y).mean())


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bits", default="4,3.5,3", help="stored-bit budgets, comma-separated")
    parser.add_argument("--format", default="compact", choices=("compact", "native"))
    parser.add_argument("--out", help="write the markdown here (default: print)")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.bits.split(",") if b.strip()]
    runs = [("greedy", {}), ("greedy --no-guard", {"no_guard": True}), ("uniform", {"allocator": "uniform"})]
    lines = [f"`python benchmarks/guard_repo.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(
        " `", "`") + f" (bq-onnx {bq_onnx.__version__}, format {args.format}).", "",
        "| model | bits | allocation | test accuracy | stored bits/weight | predicted loss | measured loss | "
        "uniform measured | repairs | guard | s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model, calib = ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}_calib.npz"
            with np.load(ROOT / "models" / f"{name}_data.npz") as d:
                x, y = d["test_input"], d["test_labels"]
            lines.append(f"| {name} | fp32 | | {accuracy(model, x, y):.4f} | 32 | | | | | | |")
            for bits in budgets:
                for label, options in runs:
                    t0 = time.perf_counter()
                    try:
                        result = bq_onnx.optimize(model, calib=str(calib), bits=bits, format=args.format, **options)
                    except BqError as exc:
                        lines.append(f"| {name} | {bits:g} | {label} | error: {exc} | | | | | | | |")
                        continue
                    out = Path(tmp) / f"{name}.bq.onnx"
                    result.save(out, force=True)
                    seconds = time.perf_counter() - t0
                    g = result.report.get("guard") or {}
                    stored = count(out, model).bits_per_weight
                    uniform = g.get("uniform") or {}
                    lines.append(
                        f"| {name} | {bits:g} | {label} | {accuracy(out, x, y):.4f} | {stored:.3f} | "
                        f"{_num(g.get('predicted_loss_scaled'))} | {_num(g.get('measured_loss'))} | "
                        f"{_num(uniform.get('measured_loss'))} | {len(g.get('repairs', [])) if g else ''} | "
                        f"{g.get('result', '')} | {seconds:.1f} |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
