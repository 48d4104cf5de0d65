"""Allocation checks on the reference models: greedy against the exact DP, closed-form tables against mc.

Usage:  python -m benchmarks.tables_check [--models lenet,digits_mlp,tiny_transformer] [--method M] [--out FILE]

For each model: a posterior (``--method``, default hutchinson) from its calibration split; expected-loss
tables (rows:8 blocks, widths 0..8); greedy and dp at budgets 2.5..4.0 on the same tables. Objective: total
expected loss, and the loss reduction from the cheapest allocation (greedy / dp; 1.0 = optimal). Then the
measured (``mc``) tables, the KL to FP32 with only one block quantized, and the Spearman correlation of the
block rankings, closed form vs mc, at each width and over all (block, width) entries.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import bq_onnx
from bq_onnx import allocation
from bq_onnx.estimators import estimate_posterior
from bq_onnx.table import render

MODELS = Path(__file__).resolve().parent.parent / "models"


def tables(model: Path, posterior, calib: Path, mode: str, granularity: str):
    result = bq_onnx.optimize(model, bits=4, posterior=posterior, calib=calib, tables=mode, granularity=granularity)
    return result.context.tables.blocks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="lenet,digits_mlp,tiny_transformer")
    p.add_argument("--budgets", default="2.5,3.0,3.5,4.0")
    p.add_argument("--method", default="hutchinson", help="posterior estimator for the closed-form tables")
    p.add_argument("--out")
    args = p.parse_args(argv)
    greedy_rows, rank_rows = [], []
    for name in args.models.split(","):
        model, calib = MODELS / f"{name}.onnx", MODELS / f"{name}_calib.npz"
        posterior = estimate_posterior(model, calib, args.method)
        closed = tables(model, posterior, calib, "closed", "rows:8")
        blocks = [allocation.Block(t.name, t.numel, t.bits, t.loss, t.cost, layer=t.weight) for t in closed]
        numel = sum(b.numel for b in blocks)
        start = float(sum(b.loss[0] for b in blocks))
        for budget in [float(b) for b in args.budgets.split(",")]:
            g = allocation.allocate("greedy", blocks, budget * numel)
            plain = allocation.allocate_greedy(blocks, budget * numel, refine=False)
            d = allocation.allocate("dp", blocks, budget * numel)
            greedy_rows.append([name, f"{budget:g}", len(blocks), f"{g.loss:.6g}", f"{plain.loss:.6g}", f"{d.loss:.6g}",
                                f"{(start - g.loss) / (start - d.loss):.5f}",
                                f"{(start - plain.loss) / (start - d.loss):.5f}", d.details.get("exact")])
        mc = {t.name: t for t in tables(model, posterior, calib, "mc", "tensor")}
        closed_t = {t.name: t for t in tables(model, posterior, calib, "closed", "tensor")}
        names = sorted(mc)
        for j, width in enumerate(closed_t[names[0]].bits):
            if width in (0, 8):
                continue
            a = [closed_t[n].loss[j] for n in names]
            b = [mc[n].loss[j] for n in names]
            rank_rows.append([name, width, len(names), f"{spearmanr(a, b).statistic:.3f}"])
        every_a = np.concatenate([closed_t[n].loss for n in names])
        every_b = np.concatenate([mc[n].loss for n in names])
        rank_rows.append([name, "all", len(every_a), f"{spearmanr(every_a, every_b).statistic:.3f}"])
    t1 = render(["model", "budget", "blocks", "greedy loss", "greedy (paper rule) loss", "dp loss",
                 "greedy / dp reduction", "paper rule / dp", "dp exact"], greedy_rows)
    t2 = render(["model", "width", "entries", "Spearman closed vs mc"], rank_rows)
    text = "\n".join([
        "# Allocation checks", "",
        f"`python -m benchmarks.tables_check --models {args.models} --method {args.method}`", "",
        "Greedy (default: hull greedy + fill + swap refinement; paper rule: hull greedy + fill) against the exact "
        f"multiple-choice knapsack on the same {args.method} tables:", "", "```", t1, "```", "",
        "Closed-form tables against measured (mc) KL per tensor block (same posterior, same quantizer designs):",
        "", "```", t2, "```", "",
    ])
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
