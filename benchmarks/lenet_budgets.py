"""LeNet at stored-bit budgets in both formats: what `--bits` buys since it counts stored bits.

Usage:  python benchmarks/lenet_budgets.py [--out benchmarks/lenet_budgets.md]

Greedy allocation with a laplace posterior from `models/lenet_calib.npz`; test accuracy on the held-out split of
`models/lenet_data.npz` (onnxruntime, exact MatMulNBits); stored bits per weight as the report counts them, and the
file size, and what the guard wrote (kept, repaired or uniform). Rows with `--bits-payload` read the budget as payload
bits (the papers' reading, and this repository's before session 4).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

import bq_onnx

ROOT = Path(__file__).resolve().parent.parent
MODEL, CALIB, DATA = (ROOT / "models" / n for n in ("lenet.onnx", "lenet_calib.npz", "lenet_data.npz"))
RUNS = [
    {"bits": 5.5}, {"bits": 6},
    {"bits": 3, "format": "compact"}, {"bits": 3.5, "format": "compact"}, {"bits": 4, "format": "compact"},
    {"bits": 5, "group_size": "auto"}, {"bits": 3, "bits_payload": True},
    # 0-bit blocks on request: the only way the native format meets 3-4 stored bits (the guard measures them)
    {"bits": 4, "allowed_bits": "0,2,3,4,5,6,7,8"}, {"bits": 3, "allowed_bits": "0,2,3,4,5,6,7,8"},
]


def accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return float((session.run(None, {session.get_inputs()[0].name: x})[0].argmax(-1) == y).mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown table here (default: print)")
    args = parser.parse_args()
    with np.load(DATA) as d:
        x, y = d["test_input"], d["test_labels"]
    lines = [f"`python benchmarks/lenet_budgets.py` (bq-onnx {bq_onnx.__version__}); FP32 accuracy "
             f"{accuracy(MODEL, x, y):.4f} on {len(y)} test images", "",
             "| options | test accuracy | stored bits/weight | payload bits/weight | file bytes | guard |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for options in RUNS:
            result = bq_onnx.optimize(MODEL, calib=str(CALIB), **options)
            out = Path(tmp) / "lenet.bq.onnx"
            result.save(out, force=True)
            a = result.report["allocation"]
            flags = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in options.items())
            lines.append(f"| `{flags}` | {accuracy(out, x, y):.4f} | {a['achieved_bits']:.3f} | "
                         f"{a.get('achieved_payload_bits', float('nan')):.3f} | {out.stat().st_size} | "
                         f"{(result.report.get('guard') or {}).get('result', '')} |")
    write_report(lines, args.out)
    return 0


def write_report(lines: list[str], out: str | None) -> None:
    """The markdown lines to ``out``, or to stdout without one."""
    text = "\n".join(lines) + "\n"
    if out:
        Path(out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    sys.exit(main())
