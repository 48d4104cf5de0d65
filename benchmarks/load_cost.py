"""What opening a bq-onnx output costs in onnxruntime and OpenVINO: session-creation time and peak memory of the
same model written by this tree and by an earlier commit, against FP32.

Usage:  python -m benchmarks.load_cost --before 95afd6e [--models lenet,minilm-l6,ppocr-rec]
        [--configs native:3,compact:3] [--out benchmarks/load_cost.md]

Packed layers (compact, and native layers at 1..3 bits where containers cannot meet the budget) are decoded by
standard ops that the runtimes fold to constants when the session is created; onnxruntime keeps every folded
intermediate until its folding pass ends, so the decode graph's intermediate sizes are what loading costs. Each
model is optimized by both trees with the same options (no calibration, ``--no-guard``: the decode is what differs,
not the allocation; the stored bits are printed to show it), then ``bq-onnx bench`` (a fresh process per model and
runtime, fast settings) measures creation time and peak memory, and the two outputs are run on the same random
inputs in onnxruntime with exact settings: the largest difference of their outputs shows the decode is the same
arithmetic where the allocations are the same (the decode's shared constants count in the budget, so a small
model's allocation can move by a block); each output's own check against the numpy decode (``optimize``'s
verification, largest error) is printed too. Models: ``lenet`` (``models/``), ``minilm-l6`` (``python
models/build_minilm.py --only l6 --out-dir benchmarks/.cache/models``), zoo names (``benchmarks/zoo_models.py``,
their wheels installed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.speed import before_tree  # noqa: E402


def model_path(name: str) -> Path:
    if name == "lenet":
        return ROOT / "models" / "lenet.onnx"
    if name == "minilm-l6":
        return ROOT / "benchmarks" / ".cache" / "models" / "minilm_l6.onnx"
    from zoo_models import ZOO

    return ZOO[name].path


def optimize(tree: Path, model: Path, fmt: str, bits: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "bq_onnx", "optimize", str(model), "-o", str(out), "--force", "--format", fmt,
           "--bits", bits, "--no-guard", "--json", "-q"]
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(tree)))
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    report = json.loads(proc.stdout)
    checked = report.get("verification") or {}
    return {"stored_bits": report.get("allocation", {}).get("achieved_bits"), "bytes": out.stat().st_size,
            "verify_error": max((o["max_abs_error"] for o in checked.get("outputs", [])), default=None)}


def bench(paths: list[Path]) -> list[dict]:
    """``bq-onnx bench`` per runtime (one that cannot run the model on random inputs is an error row, not the end
    of the run)."""
    rows = []
    for runtime in ("onnxruntime", "openvino"):
        cmd = [sys.executable, "-m", "bq_onnx", "bench", *map(str, paths), "--runtime", runtime, "--warmup", "1",
               "--iterations", "5", "--json", "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            error = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            rows += [{"runtime": runtime, "status": f"error: {error[:160]}"} for _ in paths]
        else:
            rows += json.loads(proc.stdout)["results"]
    return rows


def largest_difference(a: Path, b: Path) -> float:
    """Largest absolute difference of every float output, both models on the same random inputs (exact settings)."""
    import onnxruntime as ort

    from bq_onnx.bench import make_feeds

    def session(path: Path):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    sa, sb = session(a), session(b)
    feeds = make_feeds(str(a), 1)
    worst = 0.0
    for x, y in zip(sa.run(None, feeds), sb.run(None, feeds), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if x.dtype.kind == "f":
            worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y))) if x.size else 0.0)
    return worst


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--before", required=True, help="commit whose code writes the 'before' outputs")
    p.add_argument("--models", default="lenet,minilm-l6,ppocr-rec")
    p.add_argument("--configs", default="native:3,compact:3", help="FORMAT:BITS, comma-separated")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    old = before_tree(args.before)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            fp32 = model_path(name)
            for config in args.configs.split(","):
                fmt, bits = config.split(":")
                outs = {}
                made = {}
                for label, tree in (("before", old), ("after", ROOT)):
                    out = Path(tmp) / f"{name}.{fmt}{bits}.{label}.onnx"
                    made[label] = optimize(tree, fp32, fmt, bits, out)
                    if "error" not in made[label]:
                        outs[label] = out
                    print(f"[{name} {config}] {label}: {made[label]}", flush=True)
                if len(outs) < 2:
                    rows.append({"model": name, "config": config, "made": made})
                    continue
                results = bench([fp32, outs["before"], outs["after"]])
                try:
                    diff = largest_difference(outs["before"], outs["after"])
                except Exception as exc:  # noqa: BLE001 - random inputs a model cannot take: no comparison
                    print(f"[{name} {config}] outputs not compared: {str(exc).splitlines()[0][:200]}", flush=True)
                    diff = float("nan")
                rows.append({"model": name, "config": config, "made": made, "bench": results, "diff": diff})
                print(f"[{name} {config}] largest output difference before/after: {diff:g}", flush=True)
    text = report(rows, args, argv)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


def report(rows: list[dict], args, argv: list[str]) -> str:
    import onnxruntime
    import openvino

    lines = ["# Opening a bq-onnx output: session-creation time and peak memory, before and after", "",
             f"Produced by `python -m benchmarks.load_cost {' '.join(argv)}`.", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared: times vary with the load; compare within "
             f"a row), onnxruntime {onnxruntime.__version__}, OpenVINO {openvino.__version__}; before = commit "
             f"{args.before}, after = this tree. `bq-onnx bench`, fast settings, batch 1, a fresh process per model "
             "and runtime; peak = the process's peak resident memory.", "",
             "| model | output | runtime | stored bits before / after | file MB before / after | create s FP32 / "
             "before / after | peak MiB FP32 / before / after | p50 ms FP32 / before / after | outputs differ by | "
             "verification error before / after |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        made = row["made"]
        if "bench" not in row:
            lines.append(f"| {row['model']} | {row['config']} | | {made} | | | | | |")
            continue
        by = {}
        for r in row["bench"]:
            by.setdefault(r["runtime"], []).append(r)
        bits = " / ".join(f"{made[k]['stored_bits']:.3f}" if made[k].get("stored_bits") else "?" for k in
                          ("before", "after"))
        size = " / ".join(f"{made[k]['bytes'] / 1e6:.2f}" for k in ("before", "after"))
        checks = " / ".join(f"{made[k]['verify_error']:g}" if made[k].get("verify_error") is not None else "-"
                            for k in ("before", "after"))
        for runtime, rs in by.items():
            if any(r.get("status", "").startswith("error") for r in rs):
                lines.append(f"| {row['model']} | {row['config'].replace(':', ' ')} bits | {runtime} | {bits} | "
                             f"{size} | {rs[0]['status']} | | | {row['diff']:g} | {checks} |")
                continue

            def col(get, fmt: str, rs=rs) -> str:
                return " / ".join(format(get(r), fmt) if r.get("status") == "ok" else r.get("status", "-")
                                  for r in rs)

            lines.append(f"| {row['model']} | {row['config'].replace(':', ' ')} bits | {runtime} | {bits} | {size} | "
                         f"{col(lambda r: r['session_create_s'], '.2f')} | {col(lambda r: r['peak_rss_mib'], '.0f')} "
                         f"| {col(lambda r: r['latency_ms']['p50'], '.2f')} | {row['diff']:g} | {checks} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
