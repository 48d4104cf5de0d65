"""Golden outputs: a fixed set of commands on the shipped models and the sha256 of what each writes.

The redesign of issue 13 promises the same bytes for the same inputs and seed. The hashes in
``tests/golden_hashes.json`` were recorded before it began (commit 7ee689f) and ``tests/test_golden.py`` checks
them (where a change meant to alter outputs landed since, the git log of this file and of the hashes says
which and why). They depend on the numeric libraries, so the file records their versions and the test skips where
they differ. Re-record (only for a change that is *meant* to alter outputs) with ``python -m tests.golden --record``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
HASHES = Path(__file__).with_name("golden_hashes.json")
LIBRARIES = ("numpy", "scipy", "onnx", "onnx-ir", "onnxruntime")

M = "models/"
# (name, argv after "bq-onnx"); OUT is replaced by the output path. Each writes one file whose hash is kept.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("lenet-calib-6", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--bits", "6")),
    ("lenet-nocalib-compact", ("optimize", M + "lenet.onnx", "--bits", "3", "--format", "compact")),
    ("lenet-fixed-4", ("optimize", M + "lenet.onnx", "--bits", "4", "--allocator", "uniform")),
    ("digits-dp-tensor", ("optimize", M + "digits_mlp.onnx", "--calib", M + "digits_mlp_calib.npz", "--bits", "6",
                          "--allocator", "dp", "--granularity", "tensor")),
    ("digits-selective-meta", ("optimize", M + "digits_mlp.onnx", "--calib", M + "digits_mlp_calib.npz", "--bits",
                               "3", "--allocator", "selective", "--bits-include-metadata", "--format", "compact")),
    ("digits-quantile", ("optimize", M + "digits_mlp.onnx", "--calib", M + "digits_mlp_calib.npz", "--bits", "6",
                         "--allocator", "quantile-inform", "--quantizer", "lloyd")),
    ("digits-random-bits", ("optimize", M + "digits_mlp.onnx", "--calib", M + "digits_mlp_calib.npz", "--bits", "6",
                            "--allocator", "random-bits", "--seed", "3")),
    ("lenet-kfac-auto-group", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--method", "kfac",
                               "--bits", "3", "--group-size", "auto", "--format", "compact")),
    ("lenet-hutchinson-size", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--method",
                               "hutchinson", "--size-mb", "0.06", "--calib-samples", "64")),
    ("lenet-activations-nf", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--method",
                              "activations", "--bits", "5.5", "--quantizer", "nf")),
    ("lenet-fishermc-minbits", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--method",
                                "fisher-mc", "--bits", "6", "--min-bits", "fc3*=5", "--calib-samples", "64")),
    ("lenet-distill", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--bits", "6",
                       "--distill-steps", "3", "--calib-samples", "64")),
    ("lenet-mc-tables", ("optimize", M + "lenet.onnx", "--calib", M + "lenet_calib.npz", "--bits", "3",
                         "--tables", "mc", "--calib-samples", "32", "--allowed-bits", "2,3,4", "--bits-payload")),
    ("tiny-auto-compact", ("optimize", M + "tiny_transformer.onnx", "--calib", M + "tiny_transformer_calib.npz",
                           "--bits", "3", "--quantizer", "auto", "--format", "compact", "--calib-samples", "64")),
    ("tiny-target-ort", ("optimize", M + "tiny_transformer.onnx", "--calib", M + "tiny_transformer_calib.npz",
                         "--bits", "6", "--target", "onnxruntime", "--calib-samples", "64")),
    ("tiny-target-trt", ("optimize", M + "tiny_transformer.onnx", "--bits", "4", "--bits-payload", "--target",
                         "tensorrt")),
    ("tiny-vq-outliers", ("optimize", M + "tiny_transformer.onnx", "--bits", "3.5", "--quantizer", "vq",
                          "--outliers", "0.01", "--keep-fp", "*emb*")),
    ("lenet-posterior-laplace", ("posterior", M + "lenet.onnx", "--calib", M + "lenet_calib.npz")),
    ("tiny-posterior-kfac", ("posterior", M + "tiny_transformer.onnx", "--calib", M + "tiny_transformer_calib.npz",
                             "--method", "kfac", "--calib-samples", "64")),
)


def versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in LIBRARIES}


def file_hash(path: Path) -> str:
    """sha256 of an .onnx file; for a posterior .npz, of its arrays (zip entries carry timestamps)."""
    if path.suffix != ".npz":
        return hashlib.sha256(path.read_bytes()).hexdigest()
    h = hashlib.sha256()
    with np.load(path, allow_pickle=False) as data:
        for key in sorted(data.files):
            arr = data[key]
            h.update(f"{key}|{arr.dtype.str}|{arr.shape}|".encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def run_command(name: str, argv: tuple[str, ...], folder: Path) -> str:
    """Run one command in this process (from the repository root) and return the hash of what it wrote."""
    import os

    from bq_onnx.cli import main

    out = folder / (name + (".npz" if argv[0] == "posterior" else ".onnx"))
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = main([*argv, "-o", str(out), "--force", "-q", *(("--no-verify",) if argv[0] == "optimize" else ())])
    finally:
        os.chdir(cwd)
    if code != 0:
        raise RuntimeError(f"{name}: exit {code}")
    return file_hash(out)


def record() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        hashes = {name: run_command(name, argv, Path(tmp)) for name, argv in COMMANDS}
    return {"versions": versions(), "hashes": hashes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"write {HASHES.name}")
    args = parser.parse_args()
    result = record()
    if args.record:
        HASHES.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        print(f"wrote {HASHES}")
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
