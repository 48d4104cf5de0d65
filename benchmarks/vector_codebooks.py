"""Scalar-only against scalar + vector codebooks + outliers: KL to FP32 and accuracy at 2.0 / 2.5 / 3.0 bits.

Usage:  python benchmarks/vector_codebooks.py [--models lenet,tiny_transformer] [--budgets 2.0,2.5,3.0]
        [--format compact] [--out benchmarks/vector_codebooks.md]

One laplace posterior per model (its shipped calibration split) serves every run; greedy allocation over
``rows:8`` blocks. Two budgets conventions per row: ``payload`` (``--bits`` counts codes and outliers, the default)
and ``stored`` (``--bits-include-metadata``: scales, zero points and codebooks count too, i.e. equal file size).
Configurations: ``uniform`` (scalar uniform only), ``lloyd`` (scalar Lloyd codebook only), ``vq`` (vector
codebooks only, the scalar codebook where none is allowed) and ``auto`` (uniform, Lloyd and vector codebooks,
with outliers none / 0.25 % / 1 %, chosen per tensor and width by the tables). Every model is written, verified,
and evaluated in onnxruntime (exact settings) on the held-out test split.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bq_onnx  # noqa: E402
from bq_onnx.estimators import estimate_posterior  # noqa: E402
from bq_onnx.runtimes import get_runtime  # noqa: E402
from bq_onnx.table import render  # noqa: E402

MODELS = Path(__file__).resolve().parent.parent / "models"
CONFIGS = {
    "uniform": {"quantizer": "uniform"},
    "lloyd": {"quantizer": "lloyd"},
    "vq": {"quantizer": "vq"},
    "auto": {"quantizer": "auto", "outliers": "auto"},
}


def logits_of(path: Path, name: str, x: np.ndarray) -> np.ndarray:
    session = get_runtime("onnxruntime").session(path, exact=True)
    return np.concatenate([session.run({name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over samples, from logits (float64)."""

    def log_softmax(z):
        z = z.astype(np.float64)
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    lp, lq = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=1)))


def run(model: Path, input_name: str, posterior, data: dict, ref: np.ndarray, budget: float, config: str,
        metadata: bool, fmt: str) -> dict:
    start = time.perf_counter()
    result = bq_onnx.optimize(model, bits=budget, posterior=posterior, format=fmt, bits_include_metadata=metadata,
                              **CONFIGS[config])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "q.onnx"
        result.save(out)
        elapsed = time.perf_counter() - start
        logits = logits_of(out, input_name, data["test_input"])
        size = out.stat().st_size
    t = result.report["totals"]
    families: dict[str, int] = {}
    for layer in result.report["layers"]:
        for method in layer["method"].split("+"):
            families[method] = families.get(method, 0) + 1
    return {
        "budget": budget, "config": config, "metadata": metadata,
        "bits": t["bits_per_weight"], "bits_meta": t["bits_per_weight_with_metadata"],
        "accuracy": float((logits.argmax(1) == data["test_labels"]).mean()),
        "agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
        "kl": kl(ref, logits), "file": size, "seconds": elapsed,
        "outliers": sum(layer["outliers"] for layer in result.report["layers"]),
        "layers": ", ".join(f"{r['name'].removesuffix('.weight')}:{r['method']}@{r['bits']:.2g}"
                            for r in result.report["layers"]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet,tiny_transformer")
    p.add_argument("--budgets", default="2.0,2.5,3.0")
    p.add_argument("--configs", default="uniform,lloyd,vq,auto")
    p.add_argument("--format", default="compact")
    p.add_argument("--out", help="also write the tables as Markdown to this file")
    args = p.parse_args(argv)
    lines = [
        "# Vector codebooks and outliers against scalar grids",
        "",
        f"`python benchmarks/vector_codebooks.py --models {args.models} --budgets {args.budgets} "
        f"--configs {args.configs} --format {args.format}`",
        "",
        f"bq-onnx {bq_onnx.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
        f"{platform.machine()}. Greedy allocation, rows:8 blocks, group size 32, laplace posterior. `budget` "
        "`payload`: --bits counts codes + outliers; `stored`: --bits-include-metadata (equal size on disk). KL = "
        "mean KL(FP32 || quantized) on the test split.",
        "",
    ]
    for name in args.models.split(","):
        model = MODELS / f"{name}.onnx"
        with np.load(MODELS / f"{name}_data.npz") as f:
            data = {k: f[k] for k in f.files}
        with np.load(MODELS / f"{name}_calib.npz") as f:
            input_name = f.files[0]
        start = time.perf_counter()
        posterior = estimate_posterior(model, MODELS / f"{name}_calib.npz", "laplace")
        posterior_seconds = time.perf_counter() - start
        ref = logits_of(model, input_name, data["test_input"])
        fp32 = float((ref.argmax(1) == data["test_labels"]).mean())
        rows = []
        for metadata in (False, True):
            for budget in [float(b) for b in args.budgets.split(",")]:
                for config in args.configs.split(","):
                    r = run(model, input_name, posterior, data, ref, budget, config, metadata, args.format)
                    rows.append(r)
                    print(f"{name} {'stored' if metadata else 'payload'} {budget:g} {config}: KL {r['kl']:.5f} "
                          f"acc {100 * r['accuracy']:.2f} ({r['seconds']:.1f} s)", file=sys.stderr)
        table = render(
            ["budget", "bits", "config", "bits", "bits+meta", "outliers", "accuracy %", "agree %", "KL", "file KiB",
             "seconds"],
            [[f"{r['budget']:g}", "stored" if r["metadata"] else "payload", r["config"], f"{r['bits']:.3f}",
              f"{r['bits_meta']:.3f}", r["outliers"], f"{100 * r['accuracy']:.2f}", f"{100 * r['agreement']:.2f}",
              f"{r['kl']:.5f}", f"{r['file'] / 1024:.1f}", f"{r['seconds']:.1f}"] for r in rows],
        )
        lines += [
            f"## {name}",
            "",
            f"FP32 test accuracy {100 * fp32:.2f} % on {len(ref)} samples; posterior on {posterior.samples} "
            f"calibration samples ({posterior_seconds:.1f} s, not in the times).",
            "",
            "```",
            table,
            "```",
            "",
            "Design per layer (`auto`, method@bits; several methods: slices differ):",
            "",
            *[f"* {'stored' if r['metadata'] else 'payload'} {r['budget']:g}: {r['layers']}" for r in rows
              if r["config"] == "auto"],
            "",
        ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
