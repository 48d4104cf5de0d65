"""Error-compensating rounding against rounding to nearest, and against GPTQ baselines, at equal stored bits.

Usage: ``python -m benchmarks.gptq [--models lenet,digits_mlp,minilm-l6,efficientnet-lite0] [--budgets 3.0,3.5,4.0]
[--calib N] [--eval N] [--out benchmarks/gptq.md]``

Per model and stored-bits budget (codes + every scale, zero point and codebook, counted on the written model by
``benchmarks.peers.stored_size``):

* ``bq auto``: bq-onnx's default (``--rounding auto``: GPTQ with the guard measuring nearest beside it);
* ``bq nearest`` / ``bq gptq`` / ``bq gptq-plain``: bq-onnx's default pipeline (posterior, greedy allocation, guard)
  with ``--rounding nearest``, ``gptq`` (posterior-weighted compensation, tables priced after it, the rounding of
  each tensor at widths up to 4 chosen by measurement on calibration samples ``A`` does not see) or ``gptq-plain``
  (GPTQ as published, its own metric);
* ``uniform gptq-plain``: the same width everywhere (``--allocator uniform`` under the same stored budget) with
  GPTQ rounding: the GPTQ baseline through bq-onnx's own code (Conv models included). One width rarely hits the
  budget (compact, group 64: 3 bits store 3.30, 4 bits 4.31), so this row stores FEWER bits than the budget;
* ``filled gptq-plain``: the equal-size GPTQ baseline: the widest uniform width that fits, then whole layers
  raised to wider common widths while the budget allows (``--allocator uniform`` with ``fill``, the guard's
  "uniform, filled" reference, :data:`bq_onnx.stages.allocate.FILLED_UNIFORM`; the layers raised are those the
  tables price best, a posterior-free choice would differ), GPTQ rounding;
* ``uniform nearest`` / ``filled nearest``: the same two allocations rounded to nearest (RTN);
* ``... +fp16``: the same row with 16 (fp16 values) among the widths (``--allowed-bits 2,3,4,5,6,7,8,16``);
  ``... +fp16tiny``: and every weight of at most :data:`TINY` elements forced to 16 (``--min-bits NAME=16``);
* ``bq nearest measured`` / ``bq gptq measured`` / ``bq gptq-plain measured``: ``bq nearest`` / ``bq gptq`` /
  ``bq gptq-plain`` with ``--tables measured`` (each tensor's table measured alone on the calibration samples at
  the three widths around the budget, rounded as it is written: GPTQ's codes under ``gptq``/``gptq-plain``);
* ``fixed nearest``: a whole budget read as the fixed grid width everywhere (no tables; ``--bits 8 --allocator
  uniform``), rounded to nearest: the ceiling of a width; ``+tinyfloat``: the weights of at most :data:`TINY`
  elements kept in float (``--keep-fp``; not counted in the stored bits);
* ``ort gptq4``: onnxruntime's ``MatMulNBitsQuantizer`` with its GPTQ config, 4 bits, block 128 (MatMul weights
  only; its own stored bits).

Every bq-onnx run: ``--format compact --group-size 64``, the first ``--calib`` calibration samples, and one laplace
posterior per model estimated on them with the model's loss (``benchmarks.peers.run_posterior``; the guard's held-out
quarter is then not unseen by the posterior, the same for every row). Scored on evaluation inputs disjoint from
calibration (``benchmarks.peers.eval_feeds``, the first ``--eval``): top-1 agreement with FP32 for classifiers (and
test accuracy with labels), mean cosine to FP32 for sentence embeddings. MiniLM and EfficientNet-Lite0 are built
into ``benchmarks/.cache`` as ``benchmarks/peers.py`` builds them (torch==2.13.0 CPU); a model that cannot be built
is listed as skipped.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peers

DEFAULT_MODELS = ("lenet", "digits_mlp", "minilm-l6", "efficientnet-lite0")
BUDGETS = (3.0, 3.5, 4.0)
FP16_WIDTHS = (2, 3, 4, 5, 6, 7, 8, 16)
"""``--allowed-bits`` of the ``+fp16`` rows: the default widths and 16 (the tensor stored as fp16 values)."""
_FILL: dict[str, Any] = {"allocator_options": {"fill": True}}
_FP16: dict[str, Any] = {"allowed_bits": FP16_WIDTHS}
TINY = 1024
"""``+fp16tiny`` rows: every weight of at most this many elements is stored as fp16 (``--min-bits NAME=16``)."""
_TINY: dict[str, Any] = {"fp16_below": TINY}
_MEASURED: dict[str, Any] = {"tables": "measured"}
Config = tuple[str, str, str, dict[str, Any]]
"""A row: its label, ``--allocator``, ``--rounding`` and further options."""
CONFIGS: tuple[Config, ...] = (
    ("bq nearest", "greedy", "nearest", {}), ("bq gptq", "greedy", "gptq", {}), ("bq auto", "greedy", "auto", {}),
    ("bq gptq-plain", "greedy", "gptq-plain", {}), ("uniform gptq-plain", "uniform", "gptq-plain", {}),
    ("filled gptq-plain", "uniform", "gptq-plain", _FILL), ("uniform nearest", "uniform", "nearest", {}),
    ("filled nearest", "uniform", "nearest", _FILL),
    ("bq nearest +fp16", "greedy", "nearest", _FP16), ("bq gptq +fp16", "greedy", "gptq", _FP16),
    ("filled gptq-plain +fp16", "uniform", "gptq-plain", {**_FILL, **_FP16}),
    ("uniform nearest +fp16tiny", "uniform", "nearest", {**_FP16, **_TINY}),
    ("bq nearest +fp16tiny", "greedy", "nearest", {**_FP16, **_TINY}),
    ("filled gptq-plain +fp16tiny", "uniform", "gptq-plain", {**_FILL, **_FP16, **_TINY}),
    ("bq nearest measured", "greedy", "nearest", _MEASURED), ("bq gptq measured", "greedy", "gptq", _MEASURED),
    ("bq gptq-plain measured", "greedy", "gptq-plain", _MEASURED),
    ("fixed nearest", "uniform", "nearest", {"bits_include_metadata": False}),
    ("fixed nearest +tinyfloat", "uniform", "nearest", {"bits_include_metadata": False, "float_below": TINY}),
)
DEFAULT_CONFIGS = ("bq nearest", "bq gptq", "bq gptq-plain", "uniform gptq-plain", "filled gptq-plain",
                   "uniform nearest")


def _bq(spec: peers.ModelSpec, out: Path, bits: float, allocator: str, rounding: str, n_calib: int,
        posterior: Path, extra: dict[str, Any] | None = None) -> dict:
    import bq_onnx

    # bits_include_metadata: with --allocator uniform a whole --bits is a stored budget, not the fixed grid width
    options: dict[str, Any] = {"bits_include_metadata": True, **(extra or {})}
    if "fp16_below" in options:  # force fp16 on every weight of at most that many elements
        tiny = _tiny_weights(spec.path, options.pop("fp16_below"))
        options["min_bits"] = tuple((_glob_literal(name), 16) for name in tiny)
    if "float_below" in options:  # keep every weight of at most that many elements in float
        options["keep_fp"] = tuple(_glob_literal(name) for name in _tiny_weights(spec.path, options.pop("float_below")))
    start = time.perf_counter()
    result = bq_onnx.optimize(
        str(spec.path), bits=bits, allocator=allocator, rounding=rounding, format="compact", group_size=64,
        calib=peers.calib_feeds(spec, n_calib), posterior=str(posterior), **options,
    )
    result.save(str(out), force=True, verify=False)
    return {"seconds": time.perf_counter() - start, **_widths(result.report)}


def _tiny_weights(path: Path, most: int) -> list[str]:
    """Initializers of 2+ dims with at least bq-onnx's ``--min-size`` (128) and at most ``most`` elements."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return [t.name for t in graph.initializer if len(t.dims) >= 2 and 128 <= int(np.prod(t.dims)) <= most]


def _glob_literal(name: str) -> str:
    """``name`` as a ``--min-bits`` glob matching only itself."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def _widths(report: dict[str, Any]) -> dict[str, Any]:
    """The fp16 tensors of the written allocation and its weights per width (``{bits: numel}``), from the report."""
    layers = report.get("layers") or []
    fp16 = [layer for layer in layers if layer.get("bits") == 16]
    by_bits: dict[str, int] = {}
    for layer in layers:
        k = layer["view"][0]
        for start, stop, width in layer.get("pieces") or [[0, layer["view"][1], layer["bits"]]]:
            by_bits[str(width)] = by_bits.get(str(width), 0) + k * (stop - start)
    return {"fp16_tensors": len(fp16), "fp16_weights": int(sum(layer.get("numel", 0) for layer in fp16)),
            "numel_by_bits": dict(sorted(by_bits.items(), key=lambda kv: int(kv[0])))}


def _ort_gptq(spec: peers.ModelSpec, out: Path, n_calib: int) -> dict:
    start = time.perf_counter()
    peers.run_ort(spec, {"algo": "gptq", "bits": 4, "block": 128}, out, n_calib)
    return {"seconds": time.perf_counter() - start}


def _score(spec: peers.ModelSpec, path: Path, feeds: dict, labels, ref: np.ndarray) -> dict[str, float]:
    return peers.metrics(spec.kind, ref, peers.predict(path, feeds), labels)


def bench_model(name: str, budgets: tuple[float, ...], n_calib: int, n_eval: int,
                configs: tuple[Config, ...] = CONFIGS, ort: bool = True,
                done: frozenset[tuple[float, str]] = frozenset()) -> dict[str, Any]:
    """One model's rows; ``done`` = (budget, config label) pairs an earlier run already printed (skipped)."""
    spec = peers.MODELS[name]
    try:
        peers.ensure_model(spec)
    except Exception as exc:  # noqa: BLE001 - a model that cannot be built here is reported, not fatal
        return {"model": name, "skipped": f"cannot build: {exc}"}
    feeds, labels = peers.eval_feeds(spec)
    feeds = {k: v[:n_eval] for k, v in feeds.items()}
    labels = None if labels is None else labels[:n_eval]
    ref = peers.predict(spec.path, feeds)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.onnx"
        posterior = Path(tmp) / "posterior.npz"
        start = time.perf_counter()
        peers.run_posterior(spec, {}, posterior, n_calib)  # once per model, every bq-onnx run reuses it
        print(f"[{name}] posterior {time.perf_counter() - start:.1f} s", flush=True)
        for bits in budgets:
            for label, allocator, rounding, extra in configs:
                if (bits, label) in done:
                    continue
                try:
                    info = _bq(spec, out, bits, allocator, rounding, n_calib, posterior, extra)
                except Exception as exc:  # noqa: BLE001 - e.g. a budget the format cannot meet: one line
                    rows.append({"config": label, "budget": bits, "error": str(exc).splitlines()[0][:120]})
                    continue
                rows.append({"config": label, "budget": bits, **info, **peers.stored_size(spec.path, out),
                             **_score(spec, out, feeds, labels, ref)})
                rows[-1].pop("quantized", None)
                print(f"[{name}] {bits} {label}: {json.dumps({k: v for k, v in rows[-1].items() if k != 'config'})}",
                      flush=True)
        if ort and spec.kind != "imagenet":
            try:
                info = _ort_gptq(spec, out, n_calib)
                rows.append({"config": "ort gptq4-b128", "budget": None, **info, **peers.stored_size(spec.path, out),
                             **_score(spec, out, feeds, labels, ref)})
                rows[-1].pop("quantized", None)
                print(f"[{name}] - ort gptq4-b128: "
                      f"{json.dumps({k: v for k, v in rows[-1].items() if k != 'config'})}", flush=True)
            except Exception as exc:  # noqa: BLE001
                rows.append({"config": "ort gptq4-b128", "budget": None, "error": str(exc).splitlines()[0][:120]})
    return {"model": name, "kind": spec.kind, "eval": len(ref), "calib": n_calib, "rows": rows}


def done_rows(paths: list[str], model: str) -> frozenset[tuple[float, str]]:
    """The (budget, config) rows of ``model`` that the logs of earlier runs hold (``--skip-done``)."""
    rows = next((r["rows"] for r in from_logs(paths, 0, 0) if r["model"] == model), [])
    return frozenset((float(r["budget"]), r["config"]) for r in rows if r.get("budget") is not None)


def from_logs(paths: list[str], n_calib: int, n_eval: int) -> list[dict[str, Any]]:
    """Results from the ``[model] budget config: {json}`` lines runs print as each row finishes, by budget and
    config."""
    import re

    found: dict[str, list[dict]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = re.match(r"\[([\w.-]+)\] (\S+) (.+?): (\{.*\})$", line)
            if m:
                row = {"config": m.group(3), **json.loads(m.group(4))}
                found.setdefault(m.group(1), []).append(row)
    order = {c[0]: i for i, c in enumerate(CONFIGS)}

    def key(row: dict) -> tuple[float, int]:
        return (float("inf") if row.get("budget") is None else row["budget"], order.get(row["config"], len(order)))

    return [{"model": name, "kind": peers.MODELS[name].kind, "eval": n_eval, "calib": n_calib,
             "rows": sorted(rows, key=key)} for name, rows in found.items()]


def _fmt(v: Any, nd: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def report(results: list[dict[str, Any]], command: str) -> str:
    lines = ["# GPTQ rounding: measured", "",
             f"Command: `{command}` (numbers below come from it; `python -m benchmarks.gptq --help` says what each "
             "row is).", ""]
    for res in results:
        lines += [f"## {res['model']}", ""]
        if "skipped" in res:
            lines += [f"skipped: {res['skipped']}", ""]
            continue
        primary = peers.PRIMARY[res["kind"]]
        extra = {"labels": ("agreement", "kl"), "imagenet": ("kl", "top5_overlap"),
                 "embedding": ("min_cosine", "nn10_overlap")}[res["kind"]]
        lines += [f"{res['eval']} evaluation inputs (disjoint from the {res['calib']} calibration samples); "
                  f"primary metric: {primary}.", "",
                  f"| budget | config | stored bits/weight | {primary} | {' | '.join(extra)} | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            if "error" in r:
                lines.append(f"| {_fmt(r['budget'], 1)} | {r['config']} | - | error: {r['error']} | | | |")
                continue
            bpw = "no MatMul weight" if not r["numel"] else _fmt(r["bpw"], 3)
            config = r["config"] + (f" ({r['fp16_tensors']} fp16 tensors, {r['fp16_weights']} weights)"
                                    if r.get("fp16_tensors") else "")
            lines.append(f"| {_fmt(r['budget'], 1)} | {config} | {bpw} | {_fmt(r.get(primary))} | "
                         + " | ".join(_fmt(r.get(e), 5) for e in extra) + f" | {_fmt(r['seconds'], 1)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    p.add_argument("--calib", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--eval", type=int, default=500, help="evaluation inputs, at most (default 500)")
    p.add_argument("--configs", default=",".join(c.replace(" ", "_") for c in DEFAULT_CONFIGS),
                   help="bq-onnx rows to run, spaces as _: " + ", ".join(c[0].replace(" ", "_") for c in CONFIGS)
                   + " (default: those without fp16 or filled nearest); and ort_gptq4 unless --no-ort")
    p.add_argument("--no-ort", action="store_true", help="skip onnxruntime's GPTQ")
    p.add_argument("--out", help="write the Markdown report here")
    p.add_argument("--skip-done", nargs="+", metavar="LOG", default=[],
                   help="skip the rows these logs of earlier runs already hold (resume a run stopped early)")
    p.add_argument("--from-log", nargs="+", metavar="LOG",
                   help="no run: rebuild the report from the per-row lines earlier runs printed (a run stopped early)")
    args = p.parse_args(argv)
    if args.from_log:
        text = report(from_logs(args.from_log, args.calib, args.eval),
                      "python -m benchmarks.gptq " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
        print(text)
        if args.out:
            Path(args.out).write_text(text)
        return 0
    budgets = tuple(float(b) for b in args.budgets.split(","))
    wanted = set(args.configs.split(","))
    unknown = wanted - {c[0].replace(" ", "_") for c in CONFIGS}
    if unknown:
        p.error(f"unknown --configs {', '.join(sorted(unknown))}")
    configs = tuple(c for c in CONFIGS if c[0].replace(" ", "_") in wanted)
    results = [bench_model(m, budgets, args.calib, args.eval, configs, not args.no_ort, done_rows(args.skip_done, m))
               for m in args.models.split(",")]
    command = "python -m benchmarks.gptq " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    text = report(results, command.strip())
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
