"""Start-up time of the CLI (issue 13 item 6): wall time of short commands and what they import.

Each command runs as ``python -m bq_onnx ...`` (what the ``bq-onnx`` script runs) in a fresh process, best of
``--repeat``; with ``--baseline REV`` the same commands run against that git revision too (extracted to a temporary
folder with ``passes/`` and ``runtimes/`` placed as setuptools places them), interleaved so that both see the same
machine load. The heavy modules each command leaves in ``sys.modules`` and the import time of ``bq_onnx.inspect``
(``python -X importtime``) are reported per tree.

    python benchmarks/startup.py --baseline d1d6e27 --out benchmarks/startup.md
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("numpy", "onnx", "onnx_ir", "ml_dtypes", "sympy", "onnxruntime")


#: The repository's float models; the zoo's (``benchmarks/zoo_models.py``) are added where their wheels are installed.
FLOAT_MODELS = ("lenet.onnx", "tiny_transformer.onnx")
ZOO_MODELS = ("ppocr-rec", "ddddocr-rec", "silero-vad", "minilm-l3")


def _zoo_models() -> list[tuple[str, Path]]:
    """The zoo's larger float models that are installed here, as (label, path)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from zoo_models import ZOO, NotInstalled
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    found = []
    for name in ZOO_MODELS:
        try:
            found.append((f"zoo {name}", ZOO[name].path))
        except NotInstalled:
            continue
    return found


def _tree(rev: str, where: Path) -> Path:
    """Revision ``rev`` of the repository as an importable tree (no install needed)."""
    archive = subprocess.run(["git", "archive", rev, "bq_onnx", "passes", "runtimes"], cwd=REPO,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(where, filter="data")
    for sub in ("passes", "runtimes"):
        shutil.move(where / sub, where / "bq_onnx" / sub)
    return where


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def _run(argv: list[str], tree: Path, **kwargs: object) -> subprocess.CompletedProcess:
    """``python ARGV`` importing bq_onnx from ``tree``: run outside the repository, whose folder would come first
    on ``sys.path``."""
    return subprocess.run([sys.executable, *argv], env=_env(tree), cwd=tree.parent if tree != REPO else "/",
                          capture_output=True, check=True, **kwargs)


def _wall(argv: list[str], tree: Path) -> float:
    start = time.perf_counter()
    _run(["-m", "bq_onnx", *argv], tree)
    return time.perf_counter() - start


def _heavy(argv: list[str], tree: Path) -> list[str]:
    code = (f"import sys\nfrom bq_onnx.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
            f"assert sys.modules['bq_onnx.cli'].__file__.startswith({str(tree)!r})\n"
            f"print('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = _run(["-c", code], tree, text=True).stdout
    line = [x for x in out.splitlines() if x.startswith("HEAVY=")][-1]
    return [m for m in line.removeprefix("HEAVY=").split(",") if m]


def _import_ms(module: str, tree: Path) -> float:
    """Cumulative import time of ``module`` (``-X importtime``), in ms."""
    err = _run(["-X", "importtime", "-c", f"import {module}"], tree, text=True).stderr
    for line in err.splitlines():
        match = re.match(rf"import time:\s+\d+ \|\s+(\d+) \|\s*{re.escape(module)}$", line)
        if match:
            return int(match.group(1)) / 1000
    raise RuntimeError(f"no import time for {module}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", metavar="REV", help="git revision to compare with (e.g. main)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", help="write the markdown here (default: stdout)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        quantized = Path(tmp) / "lenet.bq.onnx"
        subprocess.run([sys.executable, "-m", "bq_onnx", "optimize", "models/lenet.onnx", "-o", str(quantized),
                        "--no-verify", "-q"], cwd=REPO, check=True, env=_env(REPO))
        trees = {"this tree": REPO}
        if args.baseline:
            trees[f"baseline {args.baseline}"] = _tree(args.baseline, Path(tmp) / "baseline")
        commands = {
            "bq-onnx --help": ["--help"],
            "bq-onnx inspect --help": ["inspect", "--help"],
            "bq-onnx verify --help": ["verify", "--help"],
            "bq-onnx inspect lenet.bq.onnx (a bq-onnx output)": ["inspect", str(quantized)],
        }
        external = Path(tmp) / "lenet_ext.onnx"
        subprocess.run([sys.executable, "-c", "import onnx, sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2], "
                        "save_as_external_data=True, size_threshold=64)", str(REPO / "models/lenet.onnx"),
                        str(external)], check=True)
        for label, path in [*((f"models/{m}", REPO / "models" / m) for m in FLOAT_MODELS),
                            ("lenet with external data", external), *_zoo_models()]:
            commands[f"bq-onnx inspect {label} (float, {path.stat().st_size / 1e6:.1f} MB)"] = ["inspect", str(path)]
        best = {(c, t): float("inf") for c in commands for t in trees}
        for _ in range(args.repeat):
            for c, argv in commands.items():
                for t, tree in trees.items():
                    best[c, t] = min(best[c, t], _wall(argv, tree))
        heavy = {(c, t): _heavy(argv, tree) for c, argv in commands.items() for t, tree in trees.items()}
        imports = {t: min(_import_ms("bq_onnx.inspect", tree) for _ in range(3)) for t, tree in trees.items()}
    names = list(trees)
    lines = [
        "# Start-up time of the CLI",
        "",
        f"Produced by `python benchmarks/startup.py{' --baseline ' + args.baseline if args.baseline else ''} "
        f"--out benchmarks/startup.md`: wall time of `python -m bq_onnx ARGS` (what `bq-onnx ARGS` runs) in a "
        f"fresh process, best of {args.repeat}, the trees interleaved. `lenet.bq.onnx` is `bq-onnx optimize "
        "models/lenet.onnx --no-verify` (the defaults: 4 stored bits per weight, greedy, native).",
        "",
        f"Machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs (absolute "
        f"times vary with the load; compare within a row). Python {platform.python_version()}.",
        "",
        "| command | " + " | ".join(f"{n} s" for n in names) + " | heavy modules loaded (" + " / ".join(names) + ") |",
        "|---|" + "---:|" * len(names) + "---|",
    ]
    for c in commands:
        loaded = " / ".join(", ".join(heavy[c, t]) or "none" for t in names)
        lines.append(f"| `{c}` | " + " | ".join(f"{best[c, t]:.2f}" for t in names) + f" | {loaded} |")
    lines += ["", "`python -X importtime -c 'import bq_onnx.inspect'`, cumulative, best of 3: "
              + "; ".join(f"{t} {imports[t]:.0f} ms" for t in names) + "."]
    lines += ["", "Every model is read with onnx's protobuf classes alone (`bq_onnx/onnx_proto.py`: the generated "
              "module loaded without `onnx/__init__.py`, which imports numpy and ml_dtypes) and checked as loading "
              "it would be (onnx's C++ checker loaded the same way, tensor sizes, external data). A bq-onnx output "
              "is counted by `bq_onnx/counting.py`; a float model's weights are surveyed on a read-only view of the "
              "protobuf (`bq_onnx/proto_graph.py`) with the rules `optimize` uses on onnx-ir "
              "(`bq_onnx/weight_rules.py`; `tests/test_fast_start.py` checks both give the same listing). What is "
              "left of a float model's time beyond the `--help` rows is parsing and checking the file, which grows "
              "with its size. The bq-onnx output row of this tree includes those checks, which the baseline skipped "
              "there (issue 13 review); the load of the shared machine (load average over 20 during the last run) "
              "makes each figure several times its idle value."]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
