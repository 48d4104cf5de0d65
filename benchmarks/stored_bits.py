"""Is ``--bits`` what the file stores? Counted stored bits per weight of every output, per model, format and target.

Usage:  python benchmarks/stored_bits.py [--models lenet,...,ppocr-cls,...] [--bits 4,3]
        [--cells native,native:onnxruntime,compact] [--calib] [--out benchmarks/zoo_native_counted.md]

For each model (the repository's ``models/*.onnx`` and the zoo of ``benchmarks/zoo_models.py``), each cell (format,
and target after a colon; none: the default target, which must run in onnxruntime and OpenVINO) and each budget,
``bq_onnx.optimize(model, bits=B, format=..., target=...)`` without calibration (the default allocator and guard;
``--calib``: with the repository's ``models/NAME_calib.npz`` or the zoo's calibration split)
writes a file, and :func:`bq_onnx.counting.count` counts it against the FP32 model independently of the rewrite:
8 x (bytes of every stored tensor, initializers and ``Constant`` values in every graph - bytes of the FP32
model's non-weight tensors) / weight elements of the FP32 model (issue 16's figure, which ``bq-onnx inspect
--reference`` prints). ``within`` says whether it is at most the budget; ``packed`` how many layers the native
format stored packed (1..3-bit grids on a target without containers of their size, where no container
allocation meets the budget); a refusal is one line (exit 2 on the command line).

``--from-zoo-cache`` optimizes nothing: it counts the outputs ``benchmarks/zoo.py`` left in its cache for the same
format and target (``bq-calib-B`` and ``bq-nocalib-B``, with and without calibration), a few seconds per model.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPO_MODELS = ("lenet", "digits_mlp", "tiny_transformer")


def model_path(name: str) -> Path:
    """A repository model by name, else a zoo model's file in its installed wheel."""
    if name in REPO_MODELS:
        return ROOT / "models" / f"{name}.onnx"
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from zoo_models import ZOO

    return ZOO[name].path


def calibration(name: str) -> object:
    """The calibration data of ``--calib``: a repository model's ``models/NAME_calib.npz``, a zoo model's
    ``calib`` split (as ``benchmarks/zoo.py`` makes it, disjoint from its evaluation split)."""
    if name in REPO_MODELS:
        return str(ROOT / "models" / f"{name}_calib.npz")
    from zoo import N_CALIB  # model_path() put benchmarks/ on the path
    from zoo_models import ZOO

    model = ZOO[name]
    return model.calib_feeds(model.make("calib", N_CALIB))


def one(path: Path, bits: float, fmt: str, target: str | None, folder: Path, calib: object = None) -> dict:
    """Optimize, save and count one cell; a refusal or failure is its first line."""
    import bq_onnx
    from bq_onnx.counting import count

    started = time.time()
    out = folder / f"{fmt}-{target or 'default'}-{bits:g}.onnx"
    try:
        result = bq_onnx.optimize(str(path), bits=bits, format=fmt, target=target, calib=calib)
        result.save(str(out), force=True)
    except Exception as exc:  # noqa: BLE001 - a refusal is a result
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                "s": time.time() - started}
    counted = count(out, path).bits_per_weight
    return {"counted": counted, "within": counted <= bits, "file_bytes": out.stat().st_size,
            "reported": result.report["allocation"]["achieved_bits"],
            "packed": sum(1 for r in result.report["layers"] if r.get("packed_codes")),
            "layers": len(result.report["layers"]), "s": time.time() - started}


def cached(name: str, path: Path, bits: float, fmt: str, target: str | None) -> list[tuple[str, dict]]:
    """The zoo's cached outputs of one model, cell and budget, counted: (config, row) each."""
    from bq_onnx.counting import count

    folder = ROOT / "benchmarks" / ".cache" / "zoo" / name / f"{fmt}-{target or 'default'}"
    out = []
    for config in (f"bq-calib-{bits:g}", f"bq-nocalib-{bits:g}"):
        file = folder / f"{config}.onnx"
        if not file.is_file():
            out.append((config, {"error": f"not in the zoo cache ({file.relative_to(ROOT)})", "s": 0.0}))
            continue
        started = time.time()
        counted = count(file, path).bits_per_weight
        out.append((config, {"counted": counted, "within": counted <= bits, "file_bytes": file.stat().st_size,
                             "s": time.time() - started}))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet,digits_mlp,tiny_transformer,ppocr-cls,magika,silero-vad,ddddocr-rec")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--cells", default="native,native:onnxruntime", help="format[:target], comma-separated")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--from-zoo-cache", action="store_true", help="count benchmarks/zoo.py's cached outputs")
    ap.add_argument("--calib", action="store_true",
                    help="optimize with calibration (repository: models/NAME_calib.npz; zoo: its calib split)")
    args = ap.parse_args(argv)
    budgets = [float(b) for b in args.bits.split(",")]
    cells = [(c.split(":")[0], c.split(":")[1] if ":" in c else None) for c in args.cells.split(",")]
    rows = []
    started = time.time()
    def write(final: bool = False) -> None:
        """The report so far (rewritten after each model, so a stopped run leaves what it measured)."""
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        cache_flag = (" --from-zoo-cache" if args.from_zoo_cache else "") + (" --calib" if args.calib else "")
        lines = [
            "# Counted stored bits per weight against `--bits`",
            "",
            f"Produced by `python benchmarks/stored_bits.py --models {args.models} --bits {args.bits} --cells "
            f"{args.cells}{cache_flag}` ({(time.time() - started) / 60:.0f} min in all; bq-onnx commit {commit}, "
            f"onnxruntime {md.version('onnxruntime')}, {platform.machine()}).",
            "",
            *__doc__.split("\n\n", 2)[2].strip().splitlines(),
            "",
            "| model | run | format | target | --bits | counted bits/weight | within | reported | packed layers "
            "| file bytes | s | error |",
            "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---|",
        ]
        for name, config, fmt, target, bits, r in rows:
            head = f"| {name} | {config} | {fmt} | {target or 'default'} | {bits:g} |"
            if "error" in r:
                lines.append(f"{head}  | no |  |  |  | {r['s']:.0f} | {r['error']} |")
            else:
                reported = f"{r['reported']:.3f}" if "reported" in r else ""
                packed = f"{r['packed']}/{r['layers']}" if "packed" in r else ""
                lines.append(f"{head} {r['counted']:.3f} | {'yes' if r['within'] else 'NO'} | {reported} | {packed} | "
                             f"{r['file_bytes']} | {r['s']:.0f} |  |")
        text = "\n".join(lines) + "\n"
        if args.out:
            args.out.write_text(text)
        elif final:
            print(text)

    with tempfile.TemporaryDirectory(prefix="bq-stored-") as tmp:
        for name in args.models.split(","):
            path = model_path(name)
            calib = calibration(name) if args.calib and not args.from_zoo_cache else None
            for fmt, target in cells:
                for bits in budgets:
                    folder = Path(tmp) / name
                    folder.mkdir(exist_ok=True)
                    found = (cached(name, path, bits, fmt, target) if args.from_zoo_cache
                             else [("bq-calib" if args.calib else "bq-nocalib",
                                    one(path, bits, fmt, target, folder, calib))])
                    for config, r in found:
                        rows.append((name, config, fmt, target, bits, r))
                        print(f"[{name}] {config} {fmt} {target or 'default'} --bits {bits:g}: "
                              + (r["error"] if "error" in r else f"{r['counted']:.3f} counted, within {r['within']}")
                              + f" ({r['s']:.0f} s)", flush=True)
            write()
    write(final=True)
    return 0 if all("error" not in r and r["within"] for *_, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
