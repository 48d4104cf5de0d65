"""The guard on the repository's own models: greedy with calibration against uniform at equal stored budgets.

Usage:  python benchmarks/guard_repo.py [--bits 4,3.5,3] [--format compact] [--out benchmarks/guard_repo.md]

Per model (``models/lenet.onnx``, ``digits_mlp.onnx``, ``tiny_transformer.onnx``) and budget (stored bits per
weight): greedy with the model's calibration file (the guard holds out a quarter of it), the same with
``--no-guard``, ``--allocator uniform`` (with a whole budget that is the fixed grid width, which stores more
than the budget: scales and zero points come on top; the guard's own uniform reference, the single width the
budget buys, is the "uniform measured" column) and uniform within the stored budget (``bits_include_metadata``:
the single width whose stored size fits, on plain grids: what the issue's "uniform of equal stored size" means).
Test KL = the mean KL of the softmax from FP32's to the output's on the test split. Test accuracy on the test
split of ``models/<name>_data.npz`` (disjoint
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


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)


def kl(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean KL(FP32 || quantized) of the softmax over the last axis: the guard's loss, on the test split."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(ref), log_softmax(out)
    return float((np.exp(lp) * (lp - lq)).sum(-1).mean())


def _num(v: float | None) -> str:
    return "" if v is None else f"{v:.4g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bits", default="4,3.5,3", help="stored-bit budgets, comma-separated")
    parser.add_argument("--format", default="compact", choices=("compact", "native"))
    parser.add_argument("--out", help="write the markdown here (default: print)")
    args = parser.parse_args(argv)
    budgets = [float(b) for b in args.bits.split(",") if b.strip()]
    runs = [("greedy", {}), ("greedy --no-guard", {"no_guard": True}), ("uniform", {"allocator": "uniform"}),
            ("uniform, stored budget", {"allocator": "uniform", "bits_include_metadata": True})]
    lines = [f"`python benchmarks/guard_repo.py {' '.join(argv if argv is not None else sys.argv[1:])}`".replace(
        " `", "`") + f" (bq-onnx {bq_onnx.__version__}, format {args.format}).", "",
        "| model | bits | allocation | test accuracy | test KL | stored bits/weight | predicted loss | measured loss | "
        "uniform measured | repairs | guard | s |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model, calib = ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}_calib.npz"
            with np.load(ROOT / "models" / f"{name}_data.npz") as d:
                x, y = d["test_input"], d["test_labels"]
            ref = logits(model, x)
            lines.append(f"| {name} | fp32 | | {(ref.argmax(-1) == y).mean():.4f} | 0 | 32 | | | | | | |")
            for bits in budgets:
                for label, options in runs:
                    t0 = time.perf_counter()
                    try:
                        result = bq_onnx.optimize(model, calib=str(calib), bits=bits, format=args.format, **options)
                    except BqError as exc:
                        lines.append(f"| {name} | {bits:g} | {label} | error: {exc} | | | | | | | | |")
                        continue
                    out = Path(tmp) / f"{name}.bq.onnx"
                    result.save(out, force=True)
                    seconds = time.perf_counter() - t0
                    g = result.report.get("guard") or {}
                    stored = count(out, model).bits_per_weight
                    uniform = g.get("uniform") or {}
                    got = logits(out, x)
                    lines.append(
                        f"| {name} | {bits:g} | {label} | {(got.argmax(-1) == y).mean():.4f} | {kl(ref, got):.4g} | "
                        f"{stored:.3f} | "
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
