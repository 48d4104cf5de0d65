"""``bq-onnx``: the command line. Errors print one line and exit with a documented code.

Over 500 lines: one handler and one human-readable summary per command (optimize, inspect, posterior, verify,
bench, validate) and the one error printer they share; the flags themselves are generated from
:mod:`bq_onnx.config`, and the work is done in the modules each handler calls.
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
from pathlib import Path

from bq_onnx import __version__
from bq_onnx.config import (
    BenchConfig,
    InputsConfig,
    LimitsConfig,
    OptimizeConfig,
    PosteriorConfig,
    VerificationConfig,
    WeightsConfig,
    concern_types,
    shared_options,
)
from bq_onnx.errors import (
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_UNSUPPORTED,
    EXIT_USAGE,
    BqError,
    Terminated,
    UsageError,
    exit_code_table,
)
from bq_onnx.escape import escape
from bq_onnx.flags import add_concern, add_group, given
from bq_onnx.table import human_bytes, render

EPILOG = "exit codes:\n" + exit_code_table()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, documented exit code
        self.exit(EXIT_USAGE, f"{self.prog}: error: {escape(message)}\n")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(
        prog="bq-onnx",
        description="Make ONNX models smaller without making them worse: low-bit weight quantization.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    p.add_argument("--version", action="version", version=f"bq-onnx {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    o = sub.add_parser(
        "optimize",
        help="quantize a model's weights (or every model of a folder) and write the smaller model",
        description="Quantize every weight (MatMul, Gemm, Conv, ConvTranspose, Gather tables) to low-bit storage, "
        "write the model atomically, then verify it against the numpy-dequantized reference in onnxruntime. "
        "MODEL may be a folder (an optimum export): every .onnx model in it is optimized into the output folder, "
        "other files copied, the folder appearing only when every model verified.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    o.add_argument("model", help="input .onnx file, or a folder (an optimum export): every .onnx model in it "
                   "optimized, other files copied (never modified; README: Folders and optimum exports)")
    o.add_argument("-o", "--output", help="output path (default: MODEL with .bq.onnx suffix; a folder, or a path "
                   "ending in /: FOLDER/<model>.bq.onnx); for a folder MODEL the output folder (default MODEL.bq), "
                   "never inside MODEL")
    o.add_argument("--shared-budget", action="store_true", help="MODEL is a folder: one --bits budget over the "
                   "weights of all its models, spent where it buys the most (default: each model its own)")
    o.add_argument("--no-verify", action="store_true", help="skip the post-write check in onnxruntime")
    o.add_argument("--force", action="store_true", help="overwrite an existing output file")
    o.add_argument("--plot", metavar="PNG", help="write bits and sensitivity per layer as a PNG (needs matplotlib)")
    o.add_argument("--config", metavar="RECIPE", help="a TOML recipe: options named as these flags without -- "
                   "(group_size = \"auto\"); flags given here override it (README: Recipes)")
    o.add_argument("--print-config", action="store_true",
                   help="print the recipe this run would use (the --config file and the flags) and exit")
    o.add_argument("--recipe-from", metavar="OUT.onnx", help="re-run the recipe an earlier output records; the "
                   "model (and --calib) must be the ones it was made from (README: Recipes)")
    c = o.add_argument_group("calibration (for the posterior, --tables mc and distillation) and seed")
    c.add_argument("--calib", metavar="DATA", action="append", help="calibration data: .npz keyed by input name "
                   "(samples stacked along each input's batch axis; N samples of a fixed-batch [1, ...] input: "
                   "[N, ...]), or a folder of .npz files (batches, or single samples without the batch axis); for a "
                   "folder MODEL: NAME=DATA per model (repeatable; NAME = the model's path without .onnx)")
    c.add_argument("--posterior", metavar="FILE", action="append", help="a posterior .npz (from `bq-onnx "
                   "posterior`, or external); for a folder MODEL: NAME=FILE per model (repeatable)")
    add_group(o, c.title, shared_options(), group=c)
    for concern in concern_types().values():
        add_concern(o, concern)
    _workers(o)
    _common(o)

    q = sub.add_parser(
        "posterior",
        help="estimate how uncertain every weight is, from calibration data",
        description="Estimate a diagonal Gaussian posterior over every quantizable weight from calibration data "
        "(gradients computed by a gradient graph that bq-onnx builds and onnxruntime runs) and save it.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    q.add_argument("model", help="input .onnx file")
    q.add_argument("--calib", metavar="DATA", required=True, help="calibration data (.npz keyed by input name)")
    q.add_argument("-o", "--output", help="output .npz (default posterior.npz; a folder: FOLDER/posterior.npz)")
    q.add_argument("--force", action="store_true", help="overwrite an existing output file")
    add_concern(q, WeightsConfig, only=("min_size",))
    add_concern(q, PosteriorConfig)
    add_concern(q, InputsConfig, only=("batch_axis",))
    d = _workers(q)
    d.add_argument("--shard", metavar="I/N", help="compute only sample range I of N (from 0; split on whole "
                   "batches) and write its sums as a shard file (default posterior.shard-I-of-N.npz), to be merged "
                   "with --merge; run it on any machine with the same model, --calib and options")
    d.add_argument("--merge", nargs="+", metavar="SHARD", help="merge shard files (all N of one split, any order) "
                   "into the posterior file: give the same model, --calib and options as the shards (a shard of "
                   "another model, calibration or options is refused)")
    _common(q)

    i = sub.add_parser(
        "inspect",
        help="show a model's weights: bits, format, bytes",
        description="Per-layer table of a model's weights (quantized by bq-onnx or still float) with totals.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    i.add_argument("model", help=".onnx file")
    i.add_argument("--reference", metavar="FP32.onnx",
                   help="the float model it was made from: count stored bits per weight of any quantizer's output "
                        "(onnxruntime's, NNCF's) on equal terms (bq-onnx outputs need none)")
    add_concern(i, WeightsConfig, only=("min_size",))
    _common(i)

    va = sub.add_parser(
        "validate",
        help="check a model against a target runtime's constraints (no runtime needed)",
        description="List every way MODEL breaks the target's profile (containers, zero points, block sizes and "
        "axes, int4 consumers, even last dimension, local functions, domains, opsets, codebook decodes). "
        "Exits 0 when there is none, 4 when there are some.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    va.add_argument("model", help=".onnx file")
    va.add_argument("--target", required=True, metavar="NAME", help="onnxruntime, tensorrt, rocm, openvino")
    _common(va)

    v = sub.add_parser(
        "verify",
        help="compare a candidate model with a reference on calibration data",
        description="Run REFERENCE and CANDIDATE on the calibration inputs in each runtime (exact precision "
        "settings) and report per output: top-1 agreement, accuracy with --labels, mean KL(reference || "
        "candidate) of the softmax over the last axis, relative error ||c - r|| / ||r||, mean per-sample cosine. "
        "Exits 6 when a threshold fails; a runtime that is not installed is skipped.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    v.add_argument("reference", help="reference .onnx (e.g. the FP32 original)")
    v.add_argument("candidate", help="candidate .onnx (e.g. the quantized model)")
    v.add_argument("--calib", metavar="DATA", required=True, help="inputs: .npz keyed by input name, or a folder")
    runs = tuple(n for n in VerificationConfig.options() if n not in VerificationConfig.THRESHOLDS)
    add_concern(v, VerificationConfig, only=runs, title="what runs")
    add_concern(v, InputsConfig, only=("batch_axis",))
    add_concern(v, VerificationConfig, only=VerificationConfig.THRESHOLDS)
    _common(v)

    b = sub.add_parser(
        "bench",
        help="measure session creation, latency, throughput and peak memory",
        description="For each model x runtime (x execution provider) x batch, measured in a fresh process: "
        "session-creation time, latency p50/p90/p99 after warm-up, throughput and peak memory. The first model "
        "is the baseline for the latency and memory ratios. Fast runtime settings unless --exact.",
        epilog=EPILOG,
        formatter_class=fmt,
    )
    b.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files; the first is the baseline")
    b.add_argument("--calib", metavar="DATA", help="use these inputs instead of random ones")
    add_concern(b, BenchConfig)
    _common(b)
    return p


def _workers(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """``--workers`` and ``--ray``: where the posterior's calibration shards and the tables' weights run (README:
    Sharding, workers, Ray)."""
    d = p.add_argument_group("distribution (the posterior and the tables over several processes; the same output "
                             "bytes)")
    d.add_argument("--workers", type=int, metavar="N", help="N local processes (this one included) share out the "
                   "posterior's calibration shards (of 256 samples) and optimize's expected-loss tables (by weight); "
                   "each reads the model from a file")
    d.add_argument("--ray", nargs="?", const="", metavar="ADDRESS", help="run the shards and tables as Ray tasks on "
                   "the cluster at ADDRESS (without one: a local Ray instance); needs pip install 'bq-onnx[ray]'")
    return d


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the report as JSON on stdout")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or summary")
    p.add_argument("--debug", action="store_true", help="show tracebacks for internal errors")
    add_concern(p, LimitsConfig)


def _cmd_optimize(args: argparse.Namespace) -> int:
    from bq_onnx.api import optimize
    from bq_onnx.writing import Protected, check_output, resolve_output

    src = Path(args.model)
    options: dict = {}
    for concern in concern_types().values():
        options.update(given(args, concern))
    config = None
    if args.config and args.recipe_from:
        raise UsageError("--recipe-from and --config: give one (flags still override either)")
    if args.config or args.print_config:
        from bq_onnx import provenance, recipe

        if args.recipe_from:
            config = recipe.config_from_text(provenance.recorded(args.recipe_from)["recipe"],
                                             f"--recipe-from {args.recipe_from}", **options)
        elif args.config:
            config = recipe.config_from(args.config, **options)
        else:
            config = OptimizeConfig().replace(**options)
        if args.print_config:
            print(recipe.dump(config), end="")
            return EXIT_OK
    if src.is_dir():
        return _cmd_optimize_folder(args, config, options)
    if args.shared_budget:
        raise UsageError("--shared-budget: MODEL is one file; it shares a budget across the models of a folder")
    for flag in ("calib", "posterior"):
        values = getattr(args, flag) or [None]
        if len(values) > 1:
            raise UsageError(f"--{flag} given {len(values)} times; one model takes one (NAME=FILE is for folders)")
        setattr(args, flag, values[0])
    out = resolve_output(args.output, src.name.removesuffix(".onnx") + ".bq.onnx", src.parent)
    protected = Protected([args.calib, args.posterior, args.config, args.recipe_from])
    protected.add_model(src)
    for concern in (InputsConfig, PosteriorConfig):
        for key in ("verify_inputs", "labels"):
            value = given(args, concern).get(key)
            if isinstance(value, str):
                protected.add(value)
    check_output(out, protected, args.force)  # fail before the work, not after
    plot = None
    if args.plot:  # refused before anything is written: no matplotlib, or a path that is an input or taken
        from bq_onnx.plot import require_matplotlib

        require_matplotlib()
        plot = resolve_output(args.plot, out.name.removesuffix(".onnx") + ".png", out.parent)
        if plot == out:
            raise UsageError(f"--plot {plot}: is the model output; choose another path")
        check_output(plot, protected, args.force)
    start = time.perf_counter()
    result = optimize(
        src,
        config,
        calib=args.calib,
        posterior=args.posterior,
        progress=not (args.quiet or args.json) and sys.stderr.isatty(),
        recipe_from=args.recipe_from,
        workers=args.workers,
        ray=args.ray,
        **options,
    )
    report = result.save(out, force=args.force, verify=not args.no_verify)
    if plot is not None:
        from bq_onnx.plot import plot_allocation
        from bq_onnx.writing import write_file

        write_file(plot, lambda tmp: plot_allocation(report, tmp), protected, args.force, suffix=".png")
    elapsed = time.perf_counter() - start
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        _print_optimize(report, elapsed)
    return EXIT_OK


def _cmd_optimize_folder(args: argparse.Namespace, config: OptimizeConfig | None, options: dict) -> int:
    """``optimize DIR``: every model of the folder, one report (:mod:`bq_onnx.folders`)."""
    from bq_onnx import folders

    if args.recipe_from:
        raise UsageError("--recipe-from re-runs one model; give each model of the folder with its own output")
    if args.plot:
        raise UsageError("--plot draws one model; give a model file")
    found = folders.survey(args.model)
    inputs = [v.partition("=")[2] if "=" in v and not Path(v).exists() else v
              for v in (*(args.calib or ()), *(args.posterior or ()))]
    protected = folders.protected_inputs(found, [*inputs, args.config])
    folders.check_folder_output(found, args.output, args.force, protected)  # fail before the work, not after
    start = time.perf_counter()
    result = folders.optimize_folder(args.model, config, calib=args.calib, posterior=args.posterior,
                             shared_budget=args.shared_budget, progress=not (args.quiet or args.json)
                             and sys.stderr.isatty(), **options)
    report = result.save(args.output, force=args.force, verify=not args.no_verify)
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        _print_folder(report, time.perf_counter() - start)
    return EXIT_OK


def _print_folder(report: dict, elapsed: float) -> None:
    """One row per model, the totals, each model's notes, what was copied."""
    rows = []
    for name, r in report["models"].items():
        t, al = r["totals"], r.get("allocation")
        rows.append([name, t["layers"], t["numel"], f"{al['achieved_bits']:.3f}" if al else "-",
                     human_bytes(t["original_bytes"]), human_bytes(t["stored_bytes"]),
                     human_bytes(r["output"]["file_bytes"]) if "output" in r else "-",
                     "yes" if r.get("verification", {}).get("passed") else "no"])
    t = report["totals"]
    footer = [f"total ({t['models']} models)", "", t["numel"],
              f"{t['achieved_bits']:.3f}" if t["achieved_bits"] is not None else "-",
              human_bytes(t["original_bytes"]), human_bytes(t["stored_bytes"]), "", ""]
    print(render(["model", "weights", "numel", "stored bits/w", "fp bytes", "stored", "file", "verified"], rows,
                 footer))
    if report["split"]:
        _say("shared budget: " + ", ".join(f"{n} {b:.3f}" for n, b in report["split"].items()) + " bits/weight")
    for name, r in report["models"].items():
        for msg in r["messages"]:
            _say(f"note: {name}: {msg}")
        if "guard" in r:
            _say(f"{name}:")
            _print_guard(r["guard"])
    for msg in report["messages"]:
        _say(f"note: {msg}")
    if report["copied"]:
        _say(f"copied {len(report['copied'])} file(s): {', '.join(report['copied'][:6])}"
             f"{', ...' if len(report['copied']) > 6 else ''}")
    for rel in report["skipped"]:
        _say(f"note: skipped {rel} (not a regular file)")
    out = report["output"]
    ratio = f" ({t['input_model_bytes'] / out['model_bytes']:.2f}x smaller)" if out["model_bytes"] else ""
    _say(f"wrote {out['path']}: models {human_bytes(out['model_bytes'])}{ratio} in {elapsed:.1f} s")


def _estimators_text(layers: list[dict]) -> str:
    """Which estimator gave each weight its curvature: ``laplace 12 weights; mean 2 (a, b)`` (names listed for
    the estimators that cover fewer weights than the most used one)."""
    by: dict[str, list[str]] = {}
    for r in layers:
        by.setdefault(r["source"], []).append(r["name"])
    top = max(len(v) for v in by.values())
    parts = []
    for source, names in sorted(by.items(), key=lambda kv: -len(kv[1])):
        listed = f" ({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})" if len(names) < top else ""
        parts.append(f"{source} {len(names)} weight{'s' if len(names) != 1 else ''}{listed}")
    return "; ".join(parts)


def _print_optimize(report: dict, elapsed: float) -> None:
    rows = [
        [
            r["name"],
            "x".join(map(str, r["shape"])),
            _bits(r["bits"]),
            r["method"],
            r["block_size"],
            human_bytes(r["original_bytes"]),
            human_bytes(r["stored_bytes"]),
            f"{r['bits_per_weight_with_metadata']:.2f}",
        ]
        for r in report["layers"]
    ]
    t = report["totals"]
    footer = [
        f"total ({t['layers']} layers)",
        "",
        f"{t['bits_per_weight']:.2f}",
        "",
        "",
        human_bytes(t["original_bytes"]),
        human_bytes(t["stored_bytes"]),
        f"{t['bits_per_weight_with_metadata']:.2f}",
    ]
    headers = ["weight", "shape", "bits", "quantizer", "block", "fp bytes", "stored", "bits/w+meta"]
    print(render(headers, rows, footer))
    for msg in report["messages"]:
        _say(f"note: {msg}")
    if report.get("posterior", {}).get("loss"):
        _say(f"loss: {_loss_text(report['posterior']['loss'])}")
    if report.get("posterior", {}).get("layers"):
        _say(f"estimators: {_estimators_text(report['posterior']['layers'])}")
    if "distillation" in report:
        d = report["distillation"]
        what = "KL" if "kl_before" in d else "loss"
        _say(f"distillation: {d['steps']} steps, mean {what} to FP32 on {d['held_out_samples']} held-out samples "
              f"{d[what.lower() + '_before']:.4g} -> {d[what.lower() + '_after']:.4g}")
    if "allocation" in report:
        al = report["allocation"]
        target = f" (budget {al['target_bits']:g})" if al["target_bits"] is not None else ""
        _say(f"allocation: {al['method']} over {al['blocks']} blocks ({al['granularity']}): "
              f"{al['achieved_bits']:.3f} stored bits/weight{target} (payload {al['achieved_payload_bits']:.3f}, "
              f"metadata {al['achieved_metadata_bits']:.3f}; budget counts {al['budget_counts']})")
    if "guard" in report:
        _print_guard(report["guard"])
    out = report["output"]
    size_in = report.get("input_file_bytes")
    ratio = f" ({size_in / out['file_bytes']:.2f}x smaller)" if size_in else ""
    _say(f"wrote {out['path']}: {human_bytes(out['file_bytes'])}{ratio} [{report['settings']['storage']['format']}]")
    if "verification" in report:
        worst = max((c["max_abs_error"] for c in report["verification"]["outputs"]), default=0.0)
        _say(f"verified in onnxruntime against the numpy reference (max abs error {worst:.2g})")
    _say(f"done in {elapsed:.1f} s")


def _print_guard(g: dict) -> None:
    """The held-out check in a few lines: measured against predicted and uniform, repairs, fidelity per output."""
    where = f"{g['samples']} {g['data']} sample{'s' if g['samples'] != 1 else ''}"
    if "measured_loss" not in g:
        _say(f"guard: {g['result']} ({g['why']})")
        return
    line = f"guard: loss measured {g['measured_loss']:.4g} on {where}"
    if g.get("predicted_loss_scaled") is not None:
        line += f" (tables predicted {g['predicted_loss_scaled']:.4g})"
    u = g.get("uniform")
    if u is not None:
        line += f"; uniform {u['width']}-bit ({u['stored_bits']:.2f} stored bits) {u['measured_loss']:.4g}"
    elif "uniform" in g:
        line += "; no uniform width fits the budget"
    _say(f"{line}: {g['result']}")
    for step in g["repairs"]:
        result = (f"{step['measured_loss']:.4g} ({step['stored_bits']:.2f} stored bits)" if "measured_loss" in step
                  else step["result"])
        how = (f"raised to {step['to_bits']} bits" if step.get("to_bits") is not None
               else "priced up to their measured loss")  # a tables repair: the tables scaled, the budget re-spent
        _say(f"  repair {step['step']}: {len(step['raised'])} tensor(s) {how} "
              f"({', '.join(step['raised'][:3])}{', ...' if len(step['raised']) > 3 else ''}) -> {result}")
    for name, f in g["fidelity"].items():
        parts = [f"{k.replace('_', ' ')} {f[k]:.4f}" for k in ("agreement", "cosine", "rel_error")
                 if f.get(k) is not None]
        _say(f"held-out fidelity of {name}: {', '.join(parts) or f.get('error', '')}")


def _loss_text(terms: list[dict]) -> str:
    """The loss per output in one line: ``logits=kl (logits: a linear layer's output over 10 classes)``."""
    parts = []
    for t in terms:
        where = t["output"] + (f"@{t['last_axis_slice']}" if "last_axis_slice" in t else "")
        weight = f":{t['weight']:g}" if t["weight"] != 1.0 else ""
        reads = f"{t['reads']}; " if "reads" in t else ""
        axis = f"channel axis {t['channel_axis']}; " if t.get("channel_axis") is not None else ""
        parts.append(f"{where}={t['kind']}{weight} ({reads}{axis}{t.get('why', '')})")
    return " + ".join(parts)


def _cmd_posterior(args: argparse.Namespace) -> int:
    from bq_onnx.calibration import load_calibration
    from bq_onnx.distributed import distributed, parse_shard
    from bq_onnx.estimators import estimate_prepared, prepare
    from bq_onnx.writing import Protected, check_output, resolve_output, write_file

    protected = Protected([args.calib, *(args.merge or ())])
    protected.add_model(args.model)
    labels = given(args, PosteriorConfig).get("labels")
    if isinstance(labels, str):
        protected.add(labels)
    if args.shard and args.merge:
        raise UsageError("--shard and --merge: give one (compute a shard, or merge the shards)")
    if (args.shard or args.merge) and (args.workers or args.ray is not None):
        raise UsageError("--workers/--ray share out a whole estimate; --shard and --merge run in this process")
    shard = parse_shard(args.shard) if args.shard else None
    default = f"posterior.shard-{shard[0]}-of-{shard[1]}.npz" if shard else "posterior.npz"
    out = check_output(resolve_output(args.output, default, Path.cwd()), protected, args.force)
    start = time.perf_counter()
    config = PosteriorConfig(**given(args, PosteriorConfig))
    with distributed(args.workers, args.ray):  # checks the values before the work
        pass
    prepared = prepare(args.model, WeightsConfig(**given(args, WeightsConfig)))
    axes = dict(InputsConfig(**given(args, InputsConfig)).batch_axis)
    calib = load_calibration(args.calib, prepared.model, config.calib_samples, axes=axes)
    bar = not (args.quiet or args.json) and sys.stderr.isatty()
    if shard is not None or args.merge:
        from bq_onnx import distributed as dist
        from bq_onnx.provenance import calibration_sha256, file_sha256

        sums = {"model_sha256": file_sha256(args.model), "calibration_sha256": calibration_sha256(calib),
                "options": dist.options_text(config)}
        if shard is not None:
            arrays, header = dist.shard_state(prepared, calib, config, *shard, progress_bar=bar)
            header.update(sums)
            write_file(out, lambda tmp: dist.write_shard(tmp, arrays, header), protected, args.force,
                       suffix=".npz")
            if args.json:
                print(json.dumps({"output": str(out), "shard": header["shard"], "samples": header["samples"]},
                                 indent=2, sort_keys=True))
            elif not args.quiet:
                a, b = header["samples"]
                _say(f"wrote {out} (shard {shard[0]}/{shard[1]}: samples {a}-{b - 1} of {calib.num_samples}) in "
                     f"{time.perf_counter() - start:.1f} s")
            return EXIT_OK
        paths = dist.check_shards(args.merge, sums)
        posterior = dist.merge_shards(prepared, calib, config, paths, bar)
    else:
        with distributed(args.workers, args.ray):
            posterior = estimate_prepared(prepared, calib, config, progress_bar=bar)
    write_file(out, posterior.save, protected, args.force, suffix=".npz")
    elapsed = time.perf_counter() - start
    rows = posterior.summary()
    if args.json:
        print(json.dumps({"output": str(out), "method": posterior.method, "samples": posterior.samples,
                          "prior_precision": posterior.prior_precision, "notes": posterior.notes,
                          "loss": posterior.loss,
                          "layers": rows}, indent=2, sort_keys=True))
    elif not args.quiet:
        table = [[r["name"], r["numel"], r["source"], f"{r['mean_curvature']:.4g}", f"{r['mean_std']:.4g}",
                  f"{r['mean_informativeness']:.4g}"] for r in rows]
        print(render(["weight", "numel", "estimator", "mean curvature", "mean std", "mean |mu|/sigma"], table))
        for note in posterior.notes:
            _say(f"note: {note}")
        if posterior.loss:
            _say(f"loss: {_loss_text(posterior.loss)}")
        _say(f"wrote {out} ({posterior.method}, {posterior.samples} samples) in {elapsed:.1f} s")
    return EXIT_OK


def _say(text: object) -> None:
    """One line for people: names from the model escaped (:mod:`bq_onnx.escape`)."""
    print(escape(text))


def _bits(bits: float) -> str:
    """Whole widths as they are, mixed ones (several slices) as a 2-decimal average."""
    return str(int(bits)) if float(bits).is_integer() else f"{bits:.2f}"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from bq_onnx.inspect import inspect

    info = inspect(args.model, min_size=WeightsConfig(**given(args, WeightsConfig)).min_size,
                   reference=args.reference)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return EXIT_OK
    rows = [
        [
            r["name"],
            "x".join(map(str, r["shape"])),
            _bits(r["bits"]),
            r["kind"] if not r["method"] else r["method"],
            r["format"],
            r["block_size"] or "-",
            human_bytes(r["stored_bytes"]),
        ]
        for r in info["layers"]
    ]
    t = info["totals"]
    footer = [f"total ({t['layers']} layers)", "", f"{t['bits_per_weight']:.2f}", "", "", "",
              human_bytes(t["stored_bytes"])]
    print(render(["weight", "shape", "bits", "quantizer", "format", "block", "bytes"], rows, footer))
    if info["candidates"]:
        found = [[c["name"] + (f" (in {c['scope']})" if c["scope"] else ""), "x".join(map(str, c["shape"])),
                  ", ".join(c["read_by"]) or "-", "weight" if c["weight"] else c["skipped"]]
                 for c in info["candidates"]]
        print(render(["float tensor", "shape", "read by", "status"], found))
    who = f"quantized by bq-onnx ({info['format']})" if info["quantized_by"] else "not quantized by bq-onnx"
    _say(f"{info['model']}: {human_bytes(info['file_bytes'])}, opset {info['opset']}, {who}; "
          f"other tensors {human_bytes(t['other_initializer_bytes'])}")
    if info.get("invalid"):
        _say(f"warning: {info['invalid']}; counted as stored (a runtime may refuse it)")
    c = info["counted"]
    if c is not None and c.get("against") == "quantized ops":  # another tool's output (or a float model), alone
        _say(f"stored: {c['bits_per_weight']:.3f} bits per weight ({human_bytes(c['weight_bytes'])} for "
             f"{c['weight_numel']} weights: the codes its quantized ops read, their scales and zero points, and the "
             f"float weights left; --reference FP32.onnx counts every stored tensor)")
    elif c is not None:
        # one headline figure (what --bits bounds), and the parts it is made of, which add up to it
        codes, layers = t["bits_per_weight"], t["bits_per_weight_with_metadata"]
        _say(f"stored: {c['bits_per_weight']:.3f} bits per weight ({human_bytes(c['weight_bytes'])} for "
              f"{c['weight_numel']} weights: every stored tensor, counted independently, less the float model's "
              f"non-weight tensors) = codes {codes:.3f} + scales, zero points and codebooks {layers - codes:.3f} + "
              f"shared decode constants {c['bits_per_weight'] - layers:.3f}")
    made = info.get("provenance")
    if made:
        _say(f"made by bq-onnx {made.get('version', '?')} from model sha256 {made.get('model_sha256', '?')}, "
             f"calibration sha256 {made.get('calibration_sha256', '?')}; its recipe (re-run: bq-onnx optimize "
             f"MODEL --recipe-from {info['model']}):")
        for line in made.get("recipe", "").splitlines():
            if line and not line.startswith("#"):
                _say(f"  {line}")
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    import dataclasses

    from bq_onnx.runtimes.profiles import get_profile
    from bq_onnx.validate import validate

    profile = get_profile(args.target)
    violations = validate(args.model, profile)
    if args.json:
        print(json.dumps({"model": args.model, "target": profile.name, "passed": not violations,
                          "violations": [dataclasses.asdict(v) for v in violations]}, indent=2, sort_keys=True))
    elif not args.quiet:
        for v in violations:
            _say(v)
        _say(f"{args.model}: {len(violations) or 'no'} violation(s) for target {profile.name}")
    return EXIT_UNSUPPORTED if violations else EXIT_OK


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cmd_verify(args: argparse.Namespace) -> int:
    from bq_onnx.compare import failure_message, verify_models
    from bq_onnx.errors import VerificationError

    report = verify_models(
        args.reference,
        args.candidate,
        args.calib,
        config=VerificationConfig(**given(args, VerificationConfig)),
        batch_axis=dict(InputsConfig(**given(args, InputsConfig)).batch_axis),
    )
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        rows = []
        for r in report["runtimes"]:
            for o in r["outputs"]:
                if "error" in o:
                    rows.append([r["runtime"], o["output"], "-", "-", "-", "-", "-", "-", "-", "FAIL"])
                    continue
                rows.append([r["runtime"], o["output"], o["samples"], _fmt(o["agreement"], ".4f"),
                             _fmt(o["kl"], ".3g"), _fmt(o["rel_error"], ".3g"), _fmt(o["cosine"], ".6f"),
                             _fmt(o["accuracy_reference"] and 100 * o["accuracy_reference"], ".2f"),
                             _fmt(o["accuracy_candidate"] and 100 * o["accuracy_candidate"], ".2f"),
                             "ok" if o["passed"] else "FAIL: " + ",".join(o["failed"])])
        print(render(["runtime", "output", "samples", "agreement", "KL", "rel err", "cosine", "acc ref %",
                      "acc cand %", "status"], rows))
        for s in report["skipped"]:
            _say(f"skipped {s['runtime']}: {s['reason']}")
        limits = ", ".join(f"{k} {v:g}" for k, v in report["thresholds"].items() if v is not None) or "none"
        _say(f"{report['samples']} samples, {report['settings']}; thresholds: {limits}; "
              f"{'passed' if report['passed'] else 'FAILED'}")
    if not report["passed"]:
        raise VerificationError(failure_message(report))
    return EXIT_OK


def _cmd_bench(args: argparse.Namespace) -> int:
    from bq_onnx.bench import benchmark

    report = benchmark(args.models, config=BenchConfig(**given(args, BenchConfig)), calib=args.calib,
                       progress_bar=not (args.quiet or args.json) and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    elif not args.quiet:
        rows = []
        for r in report["results"]:
            where = r["runtime"] + (f" ({r['provider'].removesuffix('ExecutionProvider')})" if r["provider"] else "")
            if r["status"] != "ok":
                rows.append([Path(r["model"]).name, where, r["batch"], "-", "-", "-", "-", "-", "-", "-", "-",
                             f"{r['status']}: {r['reason']}"])
                continue
            lat = r["latency_ms"]
            rows.append([Path(r["model"]).name, where, r["batch"], f"{r['session_create_s']:.3f}",
                         f"{lat['p50']:.3f}", f"{lat['p90']:.3f}", f"{lat['p99']:.3f}",
                         f"{r['throughput_per_s']:.1f}", f"{r['peak_rss_mib']:.1f}",
                         _fmt(r["latency_ratio"], ".2f"), _fmt(r["memory_ratio"], ".2f"), "ok"])
        print(render(["model", "runtime", "batch", "create s", "p50 ms", "p90 ms", "p99 ms", "samples/s",
                      "peak MiB", "lat/base", "mem/base", "status"], rows))
        for s in report["skipped"]:
            if "model" not in s:
                _say(f"skipped {s['runtime']}{' ' + s['provider'] if s['provider'] else ''}: {s['reason']}")
        _say(f"settings: {report['settings']}; inputs: {report['inputs']}; baseline {report['baseline']}; "
              f"{report['warmup']} warm-up + {report['iterations']} timed runs per configuration")
    failed = [r for r in report["results"] if r["status"] == "failed"]
    if failed:
        print(escape(f"error: {Path(failed[0]['model']).name} in {failed[0]['runtime']}: {failed[0]['reason']}"),
              file=sys.stderr)
        return failed[0].get("exit_code", EXIT_INTERNAL)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler = {"optimize": _cmd_optimize, "inspect": _cmd_inspect, "posterior": _cmd_posterior,
               "verify": _cmd_verify, "bench": _cmd_bench, "validate": _cmd_validate}[args.command]
    signalled: list[int] = []
    previous = _signals_as_exceptions(signalled)
    try:
        from bq_onnx.budgets import set_max_memory
        from bq_onnx.limits import set_run_timeout

        limits = LimitsConfig(**given(args, LimitsConfig))
        set_max_memory(limits.max_memory)
        set_run_timeout(limits.run_timeout)
        return handler(args)
    except (Terminated, KeyboardInterrupt) as exc:
        return _interrupted(signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)
    except BqError as exc:
        if signalled:  # an interrupt some library turned into another error on its way up
            return _interrupted(signalled[0])
        print(f"error: {escape(exc)}", file=sys.stderr)
        return exc.exit_code
    except Exception as exc:  # noqa: BLE001  anything else is our bug: one line unless --debug
        if signalled:  # e.g. "ImportError: initialization failed" when the signal came inside a C extension's import
            return _interrupted(signalled[0])
        if getattr(args, "debug", False):
            raise
        print(f"internal error: {type(exc).__name__}: {escape(exc)} (rerun with --debug for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL
    finally:
        for signum, handler_before in previous.items():
            signal.signal(signum, handler_before)


def _interrupted(signum: int) -> int:
    """The one line and exit code of an interrupt: 143 for SIGTERM, 130 for SIGINT (Ctrl-C). A signal held back
    while an output was renamed into place arrives after it: the line then names what was written (complete and
    verified) instead of claiming nothing was."""
    writing = sys.modules.get("bq_onnx.writing")
    committed = list(writing.COMMITTED) if writing is not None else []
    done = (f"{escape(committed[-1])} was written (verified) before it arrived" if len(committed) == 1 else
            f"{len(committed)} outputs were written (verified) before it arrived, the last {escape(committed[-1])}"
            if committed else "nothing was written")
    if signum == signal.SIGTERM:
        print(f"error: terminated (SIGTERM); {done}", file=sys.stderr)
        return 143
    print(f"error: interrupted; {done}", file=sys.stderr)
    return 130


def _signals_as_exceptions(signalled: list[int]) -> dict:
    """SIGTERM unwinds like Ctrl-C (every ``finally`` runs: staging and scratch folders are removed) instead of
    ending the process where it stands; both signals are noted in ``signalled``, so an interrupt that a library
    turned into another exception (an import interrupted inside a C extension) still reads as one. Returns the
    previous handlers (none off the main thread)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}

    def on_signal(signum, frame):
        signalled.append(signum)
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    return {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}


#: Cyclic-garbage collection thresholds: a graph of 1e6 nodes is millions of onnx-ir objects, and Python's
#: default (a young collection every 700 allocations) spent a fifth of a large graph's CPU time re-scanning them.
GC_THRESHOLDS = (50_000, 20, 20)


def entry() -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    sys.exit(main())


if __name__ == "__main__":
    entry()
