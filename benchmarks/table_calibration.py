"""Do the expected-loss tables price the low widths right? Predicted against measured loss per tensor.

Usage: ``python -m benchmarks.table_calibration --model efficientnet-lite0 --bits 4.0 [--calib 96] [--measure 64]
[--tensors 8] [--out benchmarks/table_calibration.md]``

One run of bq-onnx's default pipeline as ``benchmarks.gptq`` runs it (``bq nearest``: laplace posterior on the first
``--calib`` calibration samples, greedy allocation, compact format, group 64, the guard) gives the tables and the
allocation. For the ``--tensors`` weights with the most weights allocated at 2-3 bits, at 2, 3 and 4 bits:

* predicted: the table's loss of the whole tensor at that width (the sum over its blocks), rounded to nearest; and
  the table ``--rounding gptq`` builds for the same tensor (:class:`bq_onnx.stages.tables.TableRun` on the same
  posterior and calibration samples);
* measured: the tensor alone quantized with the same design (nearest codes, or GPTQ's codes), every other weight
  FP32, the model's loss against FP32 (KL on a classifier, the mse on an embedding) on ``--measure`` evaluation
  inputs disjoint from calibration (the last ones), put on the tables' scale as
  ``KL_TO_CLOSED_FORM * N * loss`` (:data:`bq_onnx.stages.tables.KL_TO_CLOSED_FORM`, N the posterior's samples).

The ratio measured / predicted says how optimistic the table is; its growth as the width falls (``r_b / r_4``)
is what misleads the allocator at low widths, its spread over tensors what misleads it between tensors.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers
from bq_onnx.table import render

WIDTHS = (2, 3, 4)


def _capture(spec: peers.ModelSpec, bits: float, n_calib: int, posterior: Path, rounding: str) -> dict[str, Any]:
    """Run the pipeline; keep the prepared model, the context and the samples the tables were made from."""
    import bq_onnx
    import bq_onnx.pipeline as pipeline

    seen: dict[str, Any] = {}
    original = pipeline.expected_loss_tables

    def tables(model, ctx, calibration=None, widths=None):
        seen.setdefault("model", model)
        seen["fit"] = calibration
        seen["tables"] = original(model, ctx, calibration, widths)
        return seen["tables"]

    pipeline.expected_loss_tables = tables
    try:
        result = bq_onnx.optimize(str(spec.path), bits=bits, allocator="greedy", rounding=rounding, format="compact",
                                  group_size=64, calib=peers.calib_feeds(spec, n_calib), posterior=str(posterior),
                                  bits_include_metadata=True)
    finally:
        pipeline.expected_loss_tables = original
    seen["ctx"] = result.context
    return seen


def _low_tensors(ctx, tables, most: int) -> list[tuple[str, dict[int, int]]]:
    """The weights with the most weights at 2-3 bits: (name, {width: weights allocated at it})."""
    per: dict[str, dict[int, int]] = {}
    for t in tables.blocks:
        width = ctx.allocation.bits.get(t.name)
        if width is not None:
            per.setdefault(t.weight, {})
            per[t.weight][width] = per[t.weight].get(width, 0) + t.numel
    low = sorted(per.items(), key=lambda kv: -sum(n for b, n in kv[1].items() if b <= 3))
    return [(name, dict(sorted(widths.items()))) for name, widths in low[:most] if any(b <= 3 for b in widths)]


def _predicted(blocks, name: str, bits: int) -> float:
    return float(sum(t.loss[t.bits.index(bits)] for t in blocks if t.weight == name and bits in t.bits))


def measure(spec: peers.ModelSpec, bits: float, n_calib: int, n_measure: int, most: int) -> dict[str, Any]:
    """Predicted and measured loss of the low-width tensors of one allocation (see the module doc)."""
    peers.ensure_model(spec)
    feeds, _ = peers.eval_feeds(spec)
    held = {k: v[-n_measure:] for k, v in feeds.items()}
    with tempfile.TemporaryDirectory() as tmp:  # the posterior reads its arrays from the file when used
        posterior = Path(tmp) / "posterior.npz"
        start = time.perf_counter()
        peers.run_posterior(spec, {}, posterior, n_calib)
        seen = _capture(spec, bits, n_calib, posterior, "nearest")
        return _compare(spec, bits, n_calib, n_measure, most, held, seen, start)


def _compare(spec: peers.ModelSpec, bits: float, n_calib: int, n_measure: int, most: int, held: dict,
             seen: dict[str, Any], start: float) -> dict[str, Any]:
    from bq_onnx.stages.moments import input_moments
    from bq_onnx.stages.quantize import compensated
    from bq_onnx.stages.tables import KL_TO_CLOSED_FORM, TableRun, _MonteCarlo
    from bq_onnx.weights import design, weight_view

    print(f"[{spec.name}] pipeline {time.perf_counter() - start:.1f} s", flush=True)
    model, ctx, fit = seen["model"], seen["ctx"], seen["fit"]
    tables = seen["tables"]  # as made, before any repair by the guard (which rescales what it measured)
    low = _low_tensors(ctx, tables, most)
    infos = {w.name: w for w in ctx.weights}
    # the gptq tables of the same tensors, on the same posterior and samples
    gctx = dataclasses.replace(ctx, config=ctx.config.replace(rounding="gptq"), moments=None, rounded={},
                               messages=[])
    run = TableRun(model, gctx, fit, None)
    gptq_blocks = [b for name, _ in low for b in run.tensor(infos[name]).blocks]
    run.close()
    a = ctx.config.allocation
    mc = _MonteCarlo(ctx, model, held, n_measure, a.output, a.loss)
    moments = input_moments(model, gctx, fit)
    scale = KL_TO_CLOSED_FORM * ctx.posterior.samples
    rows = []
    for name, widths in low:
        info = infos[name]
        view, importance = weight_view(ctx, info)
        whole = [(0, view.shape[1])]
        row: dict[str, Any] = {"weight": name, "numel": info.numel, "allocated": widths}
        for b in WIDTHS:
            qt = design(ctx, view, importance, b, name)
            near = mc.block_losses(info, view, qt.dequantize(), whole)
            row[f"pred_nearest_{b}"] = _predicted(tables.blocks, name, b) or None
            row[f"meas_nearest_{b}"] = None if near is None else scale * near[0]
            row[f"pred_gptq_{b}"] = _predicted(gptq_blocks, name, b) or None
            if name in moments:
                rounded = compensated(gctx, name, view, qt, moments[name], importance)
                comp = mc.block_losses(info, view, rounded.dequantize(), whole)
                row[f"meas_gptq_{b}"] = None if comp is None else scale * comp[0]
        rows.append(row)
        print(f"[{spec.name}] {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                  if isinstance(v, float)), flush=True)
    mc.close()
    return {"model": spec.name, "bits": bits, "calib": n_calib, "measure": n_measure, "rows": rows,
            "samples": ctx.posterior.samples, "guard": _guard_summary(ctx.guard)}


def _guard_summary(guard: dict | None) -> str:
    """What the guard wrote and the repairs it tried (its steps' kinds and results)."""
    if not guard:
        return "no guard"
    steps = "; ".join(f"{s.get('kind')}: {s.get('result', '')}".strip() for s in guard.get("steps") or [])
    return f"{guard.get('result')}" + (f" (steps: {steps})" if steps else "")


def _ratio(row: dict, rounding: str, b: int) -> float | None:
    p, m = row.get(f"pred_{rounding}_{b}"), row.get(f"meas_{rounding}_{b}")
    return m / p if p and m is not None and p > 0 else None


def report(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# Expected-loss tables against measured loss at low widths", "", f"Command: `{command}`", "",
             "Per tensor and width: predicted (the table) and measured (tensor alone quantized, loss against FP32 on "
             "held-out evaluation inputs, times 2 N) loss on the tables' scale, and their ratio. `r/r4`: the ratio "
             "over the same tensor's ratio at 4 bits (how much more optimistic the table is there than at 4 bits).",
             ""]
    for res in results:
        lines += [f"## {res['model']} at {res['bits']:g} bits ({res['calib']} calibration samples, N = "
                  f"{res['samples']}; measured on {res['measure']} evaluation inputs)", "",
                  f"Guard: {res['guard']}. Predicted = the tables as made, before any guard repair.", ""]
        for rounding in ("nearest", "gptq"):
            head = ["weight", "numel", "allocated (width: weights)"]
            body = []
            for r in res["rows"]:
                cells = [r["weight"], r["numel"], " ".join(f"{b}:{n}" for b, n in r["allocated"].items())]
                r4 = _ratio(r, rounding, 4)
                for b in WIDTHS:
                    ratio = _ratio(r, rounding, b)
                    pred, meas = r.get(f"pred_{rounding}_{b}"), r.get(f"meas_{rounding}_{b}")
                    cells += ["-" if pred is None else f"{pred:.3g}", "-" if meas is None else f"{meas:.3g}",
                              "-" if ratio is None else f"{ratio:.2f}",
                              "-" if ratio is None or not r4 else f"{ratio / r4:.2f}"]
                body.append(cells)
            for b in WIDTHS:
                head += [f"pred {b}", f"meas {b}", f"ratio {b}", f"r/r4 {b}"]
            lines += [f"### rounding {rounding}", "", "```", render(head, body), "```", ""]
            summary = []
            for b in WIDTHS:
                ratios = [x for r in res["rows"] if (x := _ratio(r, rounding, b))]
                rel = [x / r4 for r in res["rows"] if (x := _ratio(r, rounding, b)) and (r4 := _ratio(r, rounding, 4))]
                if ratios:
                    summary.append([b, len(ratios), f"{np.exp(np.mean(np.log(ratios))):.3g}",
                                    f"{min(ratios):.3g}..{max(ratios):.3g}",
                                    f"{np.exp(np.mean(np.log(rel))):.3g}" if rel else "-"])
            lines += ["```", render(["width", "tensors", "geo-mean ratio", "range", "geo-mean r/r4"], summary),
                      "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--bits", type=float, default=4.0)
    p.add_argument("--calib", type=int, default=96)
    p.add_argument("--measure", type=int, default=64, help="held-out evaluation inputs measured on (the last ones)")
    p.add_argument("--tensors", type=int, default=8)
    p.add_argument("--out", help="write the Markdown report here (appended to when it exists)")
    args = p.parse_args(argv)
    res = measure(peers.MODELS[args.model], args.bits, args.calib, args.measure, args.tensors)
    command = "python -m benchmarks.table_calibration " + " ".join(argv if argv is not None
                                                                    else __import__("sys").argv[1:])
    text = report([res], command.strip())
    print(text)
    if args.out:
        out = Path(args.out)
        out.write_text((out.read_text() + "\n" if out.exists() else "") + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
