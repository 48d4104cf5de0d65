"""Stored bits per weight of the zoo's bq-onnx outputs against the budget they were made for (issue 16).

Usage:  python -m benchmarks.zoo_counts [--models ppocr-cls,...] [--out benchmarks/zoo_counts.md]

Reads the outputs ``benchmarks/zoo.py`` left in ``benchmarks/.cache/zoo/MODEL/FORMAT-TARGET/CONFIG.onnx`` (run
it first; nothing is quantized here) and counts each file two ways against its FP32 model:

* **bq count**: :func:`bq_onnx.counting.count` (what ``bq-onnx inspect --reference`` prints): every stored tensor
  of the output less the FP32 model's tensors that are not weights (biases, norms, shapes), over the FP32 weights
  a weight quantizer quantizes. What ``--bits`` bounds: the quantized tensors, metadata, decode functions and
  every constant the rewrite adds;
* **all bytes**: the zoo's own count (``zoo.effective_bpw``): every stored tensor, biases included, over the
  float tensors of rank >= 2 with at least 16 elements. On small models the biases alone are a few tenths of a
  bit per weight, which no weight quantizer removes.

Only configurations whose budget is the stored size are listed (``bq-calib-B``, ``bq-nocalib-B``,
``bq-uniform-stored-B``; ``bq-uniform-B`` is a fixed B-bit grid with its scales on top). The file's date is
given: the cache keeps older runs' outputs.
"""

from __future__ import annotations

import argparse
import datetime
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from zoo import OUT_CACHE, effective_bpw  # noqa: E402
from zoo_models import ZOO, NotInstalled  # noqa: E402

from benchmarks.lenet_budgets import write_report  # noqa: E402
from bq_onnx.counting import count  # noqa: E402

BUDGETED = re.compile(r"^bq-(calib|nocalib|uniform-stored)-(\d+(?:\.\d+)?)$")


def rows(models: list[str]) -> list[dict]:
    """One row per budgeted output in the cache."""
    out = []
    for name in models:
        try:
            fp32 = ZOO[name].path
        except NotInstalled:
            continue
        for folder in sorted((OUT_CACHE / name).glob("*")):
            for path in sorted(folder.glob("bq-*.onnx")):
                match = BUDGETED.match(path.stem)
                if not match:
                    continue
                budget = float(match.group(2))
                try:
                    date = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
                    bq, every = count(path, fp32).bits_per_weight, effective_bpw(fp32, path)
                except FileNotFoundError:  # zoo.py is rewriting it
                    continue
                out.append({"model": name, "setting": folder.name, "config": path.stem, "budget": budget,
                            "bq_count": bq, "all_bytes": every, "within": bq <= budget + 1e-9,
                            "date": date.strftime("%Y-%m-%d %H:%M")})
    return out


def report(found: list[dict], command: str) -> list[str]:
    lines = [__doc__.split("\n\n")[0], "", f"Command: `{command}`", "",
             "| model | format-target | config | budget | bq count | within | all bytes | file date (UTC) |",
             "|---|---|---|---:|---:|---|---:|---|"]
    for r in found:
        lines.append(f"| {r['model']} | {r['setting']} | {r['config']} | {r['budget']:g} | {r['bq_count']:.3f} | "
                     f"{'yes' if r['within'] else '**no**'} | {r['all_bytes']:.3f} | {r['date']} |")
    over = [r for r in found if not r["within"]]
    lines += ["", f"{len(found) - len(over)} of {len(found)} outputs within their budget by the bq count."]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ZOO), help="comma-separated zoo model names")
    p.add_argument("--out", help="write the markdown report here (else stdout)")
    args = p.parse_args(argv)
    command = "python -m benchmarks.zoo_counts" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    write_report(report(rows(args.models.split(",")), command), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
