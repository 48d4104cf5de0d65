"""Where the 4-bit damage goes on a zoo model: each weight quantized alone (the rest FP32), scored by the zoo's task
metric on the ``eval`` split, for bq-onnx's uniform widths and for its default allocation with calibration.

Usage:  python benchmarks/zoo_damage.py --model silero-vad-seq [--bits 4] [--widths 3,4] [--top 12] [--n-eval 32]
        [--format compact] [--option group_size=auto] [--out benchmarks/zoo_damage_silero-vad-seq.md]

Per configuration it prints the whole model's metric, then the tensors whose lone quantization costs the most
metric (points of the primary metric, FP32 minus quantized for higher-is-better metrics), with their size, their
width in the configuration (mean bits per weight over the tensor's blocks) and where they sit (graph output
reader, LSTM recurrent weight, embedding). Issue 15's diagnosis: is the damage in a few tensors (allocation), or
spread (rounding), or in the metadata the budget pays (group size)?
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.zoo_models import ZOO  # noqa: E402
from bq_onnx.onnx_proto import iter_graphs  # noqa: E402


def session(model: onnx.ModelProto):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def swapped(fp32: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """``fp32`` with the named initializers (any graph) replaced by ``values``."""
    out = onnx.ModelProto()
    out.CopyFrom(fp32)
    for g in iter_graphs(out.graph):
        for init in g.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(values[init.name].astype(numpy_helper.to_array(init).dtype),
                                                      init.name))
    return out


def decoded(result) -> dict[str, np.ndarray]:
    """Every quantized weight of an optimize result, decoded back to its initializer's shape."""
    ctx = result.context
    out = {}
    for name, q in ctx.quantized.items():
        info = ctx.weight(name)
        out[name] = info.layout.from_view(q.dequantize()).astype(np.float32)
    return out


def roles(fp32: onnx.ModelProto) -> dict[str, str]:
    """Where each initializer is read: LSTM W/R, Gather (embedding), a node writing a graph output (head)."""
    out: dict[str, str] = {}
    for g in iter_graphs(fp32.graph):
        outputs = {o.name for o in g.output}
        for node in g.node:
            for i, name in enumerate(node.input):
                if node.op_type in ("LSTM", "GRU", "RNN") and i in (1, 2):
                    out[name] = f"{node.op_type} {'W' if i == 1 else 'R'}"
                elif node.op_type == "Gather" and i == 0:
                    out.setdefault(name, "embedding")
                elif set(node.output) & outputs:
                    out.setdefault(name, f"head ({node.op_type})")
    return out


def metric(model, sess, data, ref) -> float:
    return float(model.score(model.predict(sess, data), ref, data)[model.primary])


def run(args: argparse.Namespace) -> list[str]:
    import bq_onnx

    model = ZOO[args.model]
    fp32 = onnx.load(str(model.path))
    data = model.make("eval", args.n_eval)
    ref = model.predict(session(fp32), data)
    base = metric(model, session(fp32), data, ref)
    sign = 1.0 if model.higher_is_better else -1.0
    where = roles(fp32)
    lines = [f"# Damage per tensor: {args.model}", "",
             f"Produced by `python benchmarks/zoo_damage.py {' '.join(args.argv)}`.", "",
             f"Metric `{model.primary}` on {args.n_eval} eval samples; FP32 {base:.4f}. Damage: points lost "
             f"(x100) with that tensor alone quantized as in the configuration, the rest FP32.", ""]
    configs: list[tuple[str, dict[str, Any]]] = [(f"uniform-{w}", {"bits": w, "allocator": "uniform"})
                                                 for w in args.widths]
    calib = model.calib_feeds(model.make("calib", args.n_calib))
    configs += [(f"calib-{args.bits:g}", {"bits": args.bits, "calib": calib})]
    if not args.no_nocalib:
        configs += [(f"nocalib-{args.bits:g}", {"bits": args.bits})]
    for label, opts in configs:
        t0 = time.time()
        result = bq_onnx.optimize(str(model.path), format=args.format, **args.options, **opts)
        values = decoded(result)
        ctx = result.context
        scores = model.score(model.predict(session(swapped(fp32, values)), data), ref, data)
        whole = float(scores[model.primary])
        bits: dict[str, float] = {}
        if ctx.tables is not None and ctx.allocation is not None:
            acc: dict[str, list[float]] = {}
            for t in ctx.tables.blocks:
                acc.setdefault(t.weight, [0.0, 0.0])
                acc[t.weight][0] += t.numel * ctx.allocation.bits[t.name]
                acc[t.weight][1] += t.numel
            bits = {k: a[0] / a[1] for k, a in acc.items()}
        g = result.report.get("guard") or {}
        stored = result.report.get("allocation", {}).get("achieved_bits")
        rows = []
        for name, v in values.items():
            m = metric(model, session(swapped(fp32, {name: v})), data, ref)
            rows.append((sign * (base - m) * 100, name, v.size, bits.get(name), where.get(name, "")))
        rows.sort(key=lambda r: -r[0])
        total = sum(r[0] for r in rows)
        lines += [f"## {label}", "",
                  f"Whole model: {model.primary} {whole:.4f} ({sign * (base - whole) * 100:+.1f} points); "
                  f"stored bits/weight {stored if stored is None else f'{stored:.3f}'}; guard "
                  f"{g.get('result')} (measured {g.get('measured_loss')}, uniform "
                  f"{(g.get('uniform') or {}).get('measured_loss')}, uniform width "
                  f"{(g.get('uniform') or {}).get('width')}); sum of lone damages {total:+.1f} points; "
                  f"{len(rows)} tensors; {time.time() - t0:.0f} s. All metrics: "
                  f"{', '.join(f'{k} {v:.4f}' for k, v in scores.items())}.", "",
                  "| tensor | elements | bits | role | damage (points) |", "|---|---:|---:|---|---:|"]
        for d, name, n, b, role in rows[:args.top]:
            lines.append(f"| `{name}` | {n} | {'' if b is None else f'{b:.2f}'} | {role} | {d:+.2f} |")
        lines.append("")
        print("\n".join(lines[-(min(args.top, len(rows)) + 6):]), flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, choices=sorted(ZOO))
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--widths", default="3,4", help="uniform widths measured")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--n-eval", type=int, default=32)
    ap.add_argument("--n-calib", type=int, default=32)
    ap.add_argument("--format", default="compact")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="an optimize keyword for every configuration (e.g. group_size=auto), repeatable")
    ap.add_argument("--no-nocalib", action="store_true", help="skip the configuration without calibration")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    args.widths = [int(w) for w in args.widths.split(",") if w]
    args.argv = argv
    args.options = dict(o.split("=", 1) for o in args.option)
    lines = run(args)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
